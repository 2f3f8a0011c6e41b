"""Planning for the device's memory: ``device_memory='16GB'`` counts the whole footprint.

# NOTE [ planning for the device's memory ]
# ``memory_budget`` limits the activations (MXNet's static plan, the figure every
# planner works on); ``device_memory`` limits the whole footprint
# (``MirrorPlan.footprint``: parameters, gradients, optimizer state, auxiliary
# states, inputs, workspace and activations).  Everything but the activations is
# fixed by the network, the inputs and the optimizer, so the device's memory minus
# that part is an activation budget in bytes, and the planners that take a budget
# plan the least recomputation that fits it: the one-level planners under
# ``'mirror'``, the selective segment program (``max_overhead`` at its widest,
# NOTE [ planning under an overhead limit ]) under ``'segments'``, and under
# ``'auto'`` both, the one of less estimated overhead kept.  A segment chain's
# temporary-space copies grow with its executor count (on a CPU), so the footprint
# of the plan made is checked again and, when over, the activation budget is
# lowered by the excess and planned once more.  When nothing fits, one
# ``DeviceMemoryError`` line gives the smallest footprint reachable (the
# ``'min'`` plan of the same backend) and about the largest batch that would fit:
# the batch-proportional parts (activations, inputs, head gradients, MKLDNN's
# buffers) scaled down until the total fits, the rest held fixed.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Dict, List, Optional

from ..core.footprint import Footprint
from ..core.units import MB
from ..errors import BackendError, BudgetUnreachableError, DeviceMemoryError, OptionError
from ..options import MirrorOptions
from .dropout import plan_dropout_variants
from .footprint import FootprintSource
from .result import PLAN_LOGGER, MirrorPlan
from .segments import plan_with_segments
from .setup import PlanningSetup

__all__ = ["plan_request", "plan_for_device", "largest_fitting_batch",
           "WIDEST_OVERHEAD"]

logger = logging.getLogger(PLAN_LOGGER)

#: ``max_overhead`` given to the selective segment program under ``device_memory`` (its widest: the
#: program then finds the least recomputation that fits the activation budget).
WIDEST_OVERHEAD = 10.0


def _dispatch(setup: PlanningSetup, options: MirrorOptions, started: float) -> MirrorPlan:
    """The plan under ``options.backend`` (the dispatch of ``plan_mirror``)."""
    if options.backend == "mirror":
        return plan_dropout_variants(setup, options, started)
    return plan_with_segments(setup, options, started)


def plan_request(setup: PlanningSetup, options: MirrorOptions, started: float,
                 source: FootprintSource) -> MirrorPlan:
    """The plan of ``setup`` under ``options``, with its footprint source; under ``device_memory``
    the least recomputation whose footprint fits (NOTE [ planning for the device's memory ])."""
    if options.device_memory is None:
        return dataclasses.replace(_dispatch(setup, options, started), footprint_source=source)
    return plan_for_device(setup, options, started, source)


def _budgeted(options: MirrorOptions, backend: str, activation_mb: float) -> MirrorOptions:
    """``options`` planning ``backend`` within ``activation_mb`` of activations."""
    changes: Dict[str, Any] = {"device_memory": None, "backend": backend,
                               "memory_budget": int(activation_mb * MB)}
    if backend != "mirror" and options.max_overhead is None:
        changes["max_overhead"] = WIDEST_OVERHEAD
    return options.replace(**changes)


def plan_for_device(setup: PlanningSetup, options: MirrorOptions, started: float,
                    source: FootprintSource) -> MirrorPlan:
    """The least-recomputation plan whose whole footprint fits ``options.device_memory``.

    Raises
    ------
    DeviceMemoryError
        When none fits (one line: the smallest footprint reachable, about the largest batch).
    """
    device_mb = options.device_memory_mb
    assert device_mb is not None  # planned for a device only under device_memory
    fixed_mb = source.footprint(0.0).total
    backends = ["mirror", "segments"] if options.backend == "auto" else [options.backend]
    fitting: List[MirrorPlan] = []
    for backend in backends:
        activation_mb = device_mb - fixed_mb
        for _ in range(2):  # once more when a chain's temporary-space copies push it over
            if activation_mb < 1:
                break
            try:
                plan = _dispatch(setup, _budgeted(options, backend, activation_mb), started)
            except (BudgetUnreachableError, OptionError, BackendError) as error:
                if isinstance(error, BackendError) and options.backend != "auto":
                    raise
                logger.debug("device_memory: %s cannot fit %.0f MB of activations: %s", backend,
                             activation_mb, error)
                break
            plan = dataclasses.replace(plan, footprint_source=source, budget=f"device {device_mb:.0f} MB")
            footprint = plan.footprint
            assert footprint is not None  # the plan has a footprint source
            excess = footprint.total - device_mb
            if excess <= 0:
                fitting.append(plan)
                break
            activation_mb -= excess
    if not fitting:
        raise _unreachable(setup, options, started, source, device_mb, fixed_mb)
    chosen = min(fitting, key=lambda plan: plan.overhead)  # the one-level plan first on a tie
    logger.info("device_memory %.0f MB: %s", device_mb, chosen.summary())
    return chosen


def largest_fitting_batch(found: Footprint, batch: int, device_mb: float) -> int:
    """About the largest batch whose footprint fits ``device_mb``, scaling the batch-proportional
    parts of ``found`` (made at ``batch``) and holding the rest (NOTE [ planning for the device's
    memory ])."""
    growing = found.activations + found.inputs + found.head_gradients + found.mkldnn_copies
    fixed = found.total - growing
    if device_mb <= fixed:
        return 0
    if growing <= 0:
        return batch
    return int(math.floor(batch * (device_mb - fixed) / growing))


def _unreachable(setup: PlanningSetup, options: MirrorOptions, started: float, source: FootprintSource,
                 device_mb: float, fixed_mb: float) -> DeviceMemoryError:
    """The error when no plan fits: the ``'min'`` plan's footprint and the batch that would fit."""
    smallest: Optional[Footprint] = None
    baseline_mb = float("nan")
    try:
        least = _dispatch(setup, options.replace(device_memory=None, memory_budget="min"),
                          time.perf_counter())
        least = dataclasses.replace(least, footprint_source=source)
        smallest, baseline_mb = least.footprint, least.baseline_mb
    except Exception as error:  # the error line says what is known without it
        logger.debug("device_memory: the 'min' plan failed: %s", error)
    shapes = setup.input_shapes
    batch = int(shapes[0][1][0]) if shapes and shapes[0][1] else None
    largest = 0 if fixed_mb >= device_mb else None
    if batch is not None and smallest is not None:
        largest = largest_fitting_batch(smallest, batch, device_mb)
    parts = None if smallest is None else (smallest.total, smallest.activations, smallest.beside_activations)
    return DeviceMemoryError(device_mb, parts, fixed_mb, baseline_mb, batch, largest, source.optimizer_label)
