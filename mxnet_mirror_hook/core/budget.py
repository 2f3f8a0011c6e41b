"""Memory budgets: what ``memory_budget=`` accepts and how it is checked."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import BudgetError
from .units import GB, KB, MB

__all__ = ["Budget", "parse_budget", "BudgetLike"]

BudgetLike = Union[None, str, int, float, "Budget"]

_UNITS = {"": 1, "B": 1, "KB": KB, "K": KB, "KIB": KB, "MB": MB, "M": MB, "MIB": MB, "GB": GB, "G": GB,
          "GIB": GB, "TB": GB << 10, "TIB": GB << 10}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*|%)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed memory budget.

    Exactly one of the forms is set: ``kind == 'auto'`` (no budget: the lowest
    memory whose estimated overhead stays within one extra forward pass),
    ``'min'``, ``'fraction'`` (of the unmirrored plan), ``'bytes'``, or
    ``'overhead'``: the lowest memory whose estimated overhead is within
    ``value`` (a fraction of one iteration).  The last is not something
    ``memory_budget=`` accepts: planning under ``max_overhead`` asks the
    one-level planners for it (:meth:`within_overhead`; NOTE [ the one-level
    plan within an overhead limit ] in planning/one_level.py).
    """

    kind: str
    value: float = 0.0

    @classmethod
    def within_overhead(cls, limit: float) -> "Budget":
        """The budget of the least memory whose estimated overhead is at most ``limit``."""
        if not math.isfinite(limit) or limit < 0:
            raise BudgetError(f"an overhead limit must be a finite fraction >= 0, got {limit!r}")
        return cls("overhead", float(limit))

    @property
    def overhead_limit(self) -> Optional[float]:
        """The most estimated overhead a plan may have under this budget, if it caps it."""
        return self.value if self.kind == "overhead" else None

    @property
    def is_limit(self) -> bool:
        """Whether the budget is a fixed limit (a fraction or a size)."""
        return self.kind in ("fraction", "bytes")

    def limit_mb(self, baseline_mb: float) -> Optional[float]:
        """The budget in MB for a symbol whose unmirrored plan is ``baseline_mb``.

        Returns ``None`` for ``'auto'``, ``'min'`` and ``'overhead'``, which have no fixed limit.
        """
        if self.kind == "fraction":
            return self.value * baseline_mb
        if self.kind == "bytes":
            return self.value / MB
        return None

    @property
    def key(self) -> str:
        """A stable text form, used in cache keys."""
        if self.kind in ("auto", "min"):
            return self.kind
        return f"{self.kind}:{self.value!r}"

    def __str__(self) -> str:
        if self.kind == "fraction":
            return f"{self.value:g} of baseline"
        if self.kind == "bytes":
            return f"{self.value / MB:.0f} MB"
        if self.kind == "overhead":
            return f"least memory within +{100 * self.value:g}% overhead"
        return self.kind


def parse_budget(budget: BudgetLike) -> Budget:
    """Turn a user's ``memory_budget`` into a :class:`Budget`.

    Parameters
    ----------
    budget : None, 'min', float in (0, 1], int bytes, or str with a unit
        ``None`` asks for the lowest memory the planner finds; ``'min'`` for the
        lowest reachable; a float in (0, 1] is a fraction of the unmirrored
        plan; an int is bytes; ``'512MB'``, ``'4GB'``, ``'0.5'`` and ``'60%'``
        (the same as ``0.6``) are accepted.

    Raises
    ------
    TypeError
        For a value of the wrong type (a bool, a list...).
    BudgetError
        For a value of the right type that makes no sense (negative, zero,
        a fraction above 1, an unknown unit).
    """
    if isinstance(budget, Budget):
        return budget
    if budget is None:
        return Budget("auto")
    if isinstance(budget, bool) or not isinstance(budget, (str, numbers.Real)):
        raise TypeError(
            f"memory_budget must be None, 'min', a fraction in (0, 1], a number of bytes or a "
            f"string such as '60%' or '4GB'; got {budget!r} of type {type(budget).__name__}")
    if isinstance(budget, str):
        text = budget.strip()
        if text.lower() in ("min", "minimum"):
            return Budget("min")
        if text.lower() in ("none", "auto", ""):
            return Budget("auto")
        match = _SIZE.match(text)
        if not match:
            raise BudgetError(
                f"memory_budget {budget!r} is not understood; write a size such as '512MB' or "
                f"'4GB', a fraction such as '0.6' or '60%', or 'min'")
        number, unit = float(match.group(1)), match.group(2).upper()
        if unit == "%":
            if not 0 < number <= 100:
                raise BudgetError(f"memory_budget {budget!r} is a percentage of the unmirrored memory; "
                                  f"it must be above 0% and at most 100%")
            return Budget("fraction", number / 100.0)
        if unit == "":
            return parse_budget(number if "." in match.group(1) else int(number))
        if unit not in _UNITS:
            raise BudgetError(
                f"memory_budget {budget!r} has unknown unit {match.group(2)!r}; use B, KB, MB, GB or TB")
        return parse_budget(int(number * _UNITS[unit]))
    value = float(budget)
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"memory_budget must be positive, got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if value < MB:
            raise BudgetError(
                f"memory_budget {budget!r} is read as bytes, which is under 1 MB; write a fraction "
                f"such as 0.5 or a size such as '{int(value)}MB'")
        return Budget("bytes", value)
    if value > 1.0:
        raise BudgetError(
            f"memory_budget {budget!r} is a float above 1; a float is a fraction of the unmirrored "
            f"memory in (0, 1] (or write a percentage such as '60%'). Pass an int for bytes or a "
            f"string such as '4GB'")
    return Budget("fraction", value)
