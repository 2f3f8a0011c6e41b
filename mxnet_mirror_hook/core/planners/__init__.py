"""Planners, registered by name.

Every planner has one entry point, :meth:`Planner.plan`, with the same
signature: the forward graph, a parsed budget, and a callback that measures a
decision (in MB).  The registry here is the one place ``planner=`` and
``--planner`` look names up.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from ...errors import UnknownPlannerError
from .base import Candidate, Decision, MeasureFn, Planner, PlanOutcome, select_candidate

__all__ = ["Candidate", "Decision", "MeasureFn", "Planner", "PlanOutcome", "select_candidate",
           "register_planner", "get_planner", "list_planners"]

_REGISTRY: Dict[str, Callable[[], Planner]] = {}


def register_planner(name: str) -> Callable[[Callable[[], Planner]], Callable[[], Planner]]:
    """Class decorator that adds a planner to the registry under ``name``."""
    def decorate(factory: Callable[[], Planner]) -> Callable[[], Planner]:
        if name in _REGISTRY:
            raise ValueError(f"a planner named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorate


def get_planner(name: str) -> Planner:
    """A new instance of the planner registered as ``name``.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    UnknownPlannerError
        If no planner has that name; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"planner must be a name (str), one of {list_planners()}; got {name!r}")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownPlannerError(
            f"unknown planner {name!r}; choose one of {', '.join(list_planners())}") from None
    return factory()


def list_planners() -> List[str]:
    """Names of the registered planners, sorted."""
    return sorted(_REGISTRY)


# Registration happens on import of each planner module.
from . import none as _none  # noqa: E402,F401
from . import memonger as _memonger  # noqa: E402,F401
from . import frontier as _frontier  # noqa: E402,F401
from . import selective as _selective  # noqa: E402,F401
from . import dp as _dp  # noqa: E402,F401
from . import auto as _auto  # noqa: E402,F401
