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

from typing import Optional, Tuple

__all__ = [
    "MirrorHookError",
    "ShapeError",
    "BudgetError",
    "BudgetUnreachableError",
    "DeviceMemoryError",
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


class DeviceMemoryError(BudgetUnreachableError):
    """No plan's whole footprint fits ``device_memory``.

    Attributes
    ----------
    device_mb : float
        The device memory asked for, in MB.
    footprint_mb : float or None
        The smallest whole footprint reachable (the ``'min'`` plan's), in MB; None when the
        ``'min'`` plan could not be made.
    largest_batch : int or None
        About the largest batch that would fit (0: none; None: no batch axis known).
    batch : int or None
        The batch that was planned.
    """

    def __init__(self, device_mb: float, smallest: Optional[Tuple[float, float, float]], fixed_mb: float,
                 baseline_mb: float, batch: Optional[int], largest_batch: Optional[int],
                 optimizer: str) -> None:
        # smallest: (total, activations, everything beside the activations) of the 'min' plan, MB.
        super().__init__(device_mb, smallest[1] if smallest else float("nan"), baseline_mb)
        self.device_mb, self.batch, self.largest_batch = device_mb, batch, largest_batch
        self.footprint_mb = smallest[0] if smallest is not None else None
        reach = (f"the smallest footprint reachable is {smallest[0]:.0f} MB ({smallest[1]:.0f} MB of "
                 f"activations + {smallest[2]:.0f} MB of parameters, gradients, optimizer state, inputs "
                 f"and workspace)" if smallest is not None
                 else f"parameters, gradients, optimizer state, inputs and workspace alone take "
                      f"{fixed_mb:.0f} MB")
        if largest_batch is None:
            advice = "reduce the batch"
        elif largest_batch < 1:
            advice = "no batch fits: the parts that do not grow with the batch leave no room"
        else:
            advice = f"the largest batch that would fit is about {largest_batch}" + \
                (f" (this one is {batch})" if batch else "")
        self.args = (f"device_memory {device_mb:.0f} MB: no plan fits with {optimizer}; {reach}; "
                     f"{advice}",)


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
