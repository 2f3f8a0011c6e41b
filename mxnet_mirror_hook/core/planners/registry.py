"""The registry of planners by name: the one place ``planner=`` and ``--planner`` are looked up."""
from __future__ import annotations

from typing import Callable, Dict, List

from ...errors import UnknownPlannerError
from .base import Planner

__all__ = ["register_planner", "get_planner", "list_planners"]

_REGISTRY: Dict[str, Callable[[], Planner]] = {}


def register_planner(name: str) -> Callable[[Callable[[], Planner]], Callable[[], Planner]]:
    """Class decorator that adds a planner to the registry under ``name``.

    Raises
    ------
    ValueError
        If a planner of that name is registered already.
    """
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
