"""``MirrorOptions``: the one options object every surface takes.

The same five choices (which planner, what memory budget, where the plan cache
lives, where plans are measured, which operator types are never recomputed)
reach :func:`~mxnet_mirror_hook.plan_mirror` from ``MirroredModule``,
``MirroredBucketingModule``, the Gluon surfaces, the script runner and the
command line.  They are validated once, here, when the object is made, so a bad
planner name or budget fails where the user wrote it, not at the first bind.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

from .core.budget import Budget, BudgetLike, parse_budget
from .core.planners import get_planner

__all__ = ["MirrorOptions", "OPTION_NAMES"]

#: The option names, as keyword arguments of every surface.
OPTION_NAMES = ("planner", "memory_budget", "cache_dir", "cost_ctx", "keep_ops")


@dataclass(frozen=True)
class MirrorOptions:
    """What to plan and how; validated when made.

    Parameters
    ----------
    planner : str
        A registered planner name (``'auto'`` by default; see
        :func:`~mxnet_mirror_hook.list_planners`).
    memory_budget : None, 'min', float, int or str
        See :func:`~mxnet_mirror_hook.parse_budget` (``'60%'``, ``0.6``,
        ``'4GB'``...).  Kept as given; :attr:`budget` is the parsed form.
    cache_dir : str, None or False
        Plan cache directory (``None``: ``$MXNET_MIRROR_HOOK_CACHE_DIR`` or
        ``~/.cache/mxnet_mirror_hook``; ``False``: memory only).
    cost_ctx : mx.Context or str, optional
        Where plans are measured (CPU by default: a CPU bind plans the same
        graph without allocating it).
    keep_ops : iterable of str
        Operator types never to recompute (their outputs are kept); stored
        sorted and without duplicates.

    Raises
    ------
    TypeError, UnknownPlannerError, BudgetError
        For a value of the wrong type, an unknown planner or a budget that
        makes no sense.
    """

    planner: str = "auto"
    memory_budget: BudgetLike = None
    cache_dir: Union[None, str, bool] = None
    cost_ctx: Any = None
    keep_ops: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        get_planner(self.planner)  # TypeError / UnknownPlannerError naming the known ones
        object.__setattr__(self, "_budget", parse_budget(self.memory_budget))
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, bool)) \
                and not hasattr(self.cache_dir, "__fspath__"):
            raise TypeError(f"cache_dir must be a directory path, None (the default directory) or "
                            f"False (memory only); got {self.cache_dir!r}")
        if self.cache_dir is True:
            raise TypeError("cache_dir=True is ambiguous: pass None for the default directory, a "
                            "path, or False for memory only")
        keep = self.keep_ops
        if isinstance(keep, str):
            keep = [part for part in keep.split(",") if part.strip()]
        if keep is None:
            keep = ()
        if not all(isinstance(op, str) for op in keep):
            raise TypeError(f"keep_ops must be operator type names such as ['BatchNorm']; got "
                            f"{self.keep_ops!r}")
        object.__setattr__(self, "keep_ops", tuple(sorted({op.strip() for op in keep})))

    @property
    def budget(self) -> Budget:
        """The parsed :attr:`memory_budget`."""
        return self._budget  # type: ignore[attr-defined]

    @classmethod
    def coerce(cls, options: Optional["MirrorOptions"] = None, **kwargs: Any) -> "MirrorOptions":
        """An options object from ``options`` and/or keyword arguments.

        Keyword arguments that are not ``None`` override the fields of
        ``options``; with neither, the defaults.

        Raises
        ------
        TypeError
            For an unknown keyword or an ``options`` that is not a
            :class:`MirrorOptions`.
        """
        unknown = set(kwargs) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown mirror option(s) {sorted(unknown)}; the options are "
                            f"{', '.join(OPTION_NAMES)}")
        if options is None:
            return cls(**{k: v for k, v in kwargs.items() if v is not None})
        if not isinstance(options, MirrorOptions):
            raise TypeError(f"options must be a MirrorOptions, got {type(options).__name__}")
        changes = {k: v for k, v in kwargs.items() if v is not None}
        return dataclasses.replace(options, **changes) if changes else options

    def replace(self, **changes: Any) -> "MirrorOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def plan_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~mxnet_mirror_hook.plan_mirror` for these options."""
        return {"planner": self.planner, "memory_budget": self.memory_budget,
                "cache_dir": self.cache_dir, "ctx": self.cost_ctx, "keep_ops": self.keep_ops}

    def as_dict(self) -> Dict[str, Any]:
        """The five fields by name (the keyword arguments of every surface)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "MirrorOptions":
        """Options from a mapping that may hold other keys too (only the option names are read)."""
        return cls.coerce(**{k: values[k] for k in OPTION_NAMES if k in values})


def normalize_keep_ops(keep_ops: Optional[Iterable[str]]) -> Tuple[str, ...]:
    """``keep_ops`` as :class:`MirrorOptions` stores it (sorted, unique)."""
    return MirrorOptions(keep_ops=tuple(keep_ops or ())).keep_ops
