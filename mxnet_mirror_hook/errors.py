"""Exceptions of mxnet-mirror-hook.

Every error derives from :class:`MirrorHookError` and from the built-in
exception a caller would already catch for the same failure: ``ValueError`` for
a value that makes no sense (shapes, budgets, options, planner names, a backend
that cannot train the network), ``TypeError`` for an object of the wrong kind
(a Gluon ``Block`` that is not hybridizable), ``RuntimeError`` for what fails
while running (MXNet cannot bind or measure, a mirrored block used in a way
mirroring cannot follow).  Each message says what was wrong and what to do.
"""
from __future__ import annotations

__all__ = [
    "MirrorHookError",
    "ShapeError",
    "BudgetError",
    "BudgetUnreachableError",
    "UnknownPlannerError",
    "MeasurementError",
    "GluonMirrorError",
    "UnsupportedBlockError",
    "BackendError",
    "OptionError",
]


class MirrorHookError(Exception):
    """Base class of every error raised by mxnet-mirror-hook."""


class ShapeError(MirrorHookError, ValueError):
    """Input shapes or dtypes do not fit the symbol."""


class BudgetError(MirrorHookError, ValueError):
    """A memory budget could not be understood."""


class BudgetUnreachableError(BudgetError):
    """No plan fits the requested memory budget.

    Attributes
    ----------
    budget_mb : float
        The budget that was asked for, in MB.
    min_reachable_mb : float
        The smallest planned memory any candidate reached, in MB.
    """

    def __init__(self, budget_mb: float, min_reachable_mb: float, baseline_mb: float) -> None:
        self.budget_mb = budget_mb
        self.min_reachable_mb = min_reachable_mb
        self.baseline_mb = baseline_mb
        super().__init__(
            f"memory budget {budget_mb:.0f} MB is below the smallest reachable plan "
            f"({min_reachable_mb:.0f} MB; unmirrored {baseline_mb:.0f} MB). Raise the budget to at "
            f"least {min_reachable_mb:.0f} MB, use memory_budget='min', or reduce the batch size.")


class UnknownPlannerError(MirrorHookError, ValueError):
    """A planner name is not in the registry."""


class MeasurementError(MirrorHookError, RuntimeError):
    """MXNet could not bind the symbol, or its memory report could not be read."""


class GluonMirrorError(MirrorHookError, RuntimeError):
    """A mirrored Gluon block was used in a way mirroring cannot follow.

    Raised at a mirrored block's forward or backward (an output that cannot be
    traced to a symbol, an input that is itself the output of recorded
    operations, a forward overwritten before its backward); the message says
    what to do.
    """


class UnsupportedBlockError(GluonMirrorError, TypeError):
    """:func:`mxnet_mirror_hook.gluon.mirror` was given a block it cannot mirror.

    A plain ``gluon.Block`` runs Python code at every call and has no graph to
    plan; make it a ``HybridBlock``, or mirror its hybridizable children.
    """


class OptionError(MirrorHookError, ValueError):
    """An option's value is out of range (an unknown backend, a segment count below one...)."""


class BackendError(MirrorHookError, ValueError):
    """The chosen execution backend cannot train this network exactly.

    Executor segments re-run a segment's forward pass during backward; a
    network that draws random numbers in its forward pass (Dropout, samplers)
    would draw new ones there and get the gradients of other masks.
    """
