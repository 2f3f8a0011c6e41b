"""One-level planning: MXNet's mirror, one decision for the whole symbol, through the cache."""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mxnet as mx

from .. import env
from ..cache import MirrorEntry, get_cache
from ..core.budget import Budget
from ..core.cost import recompute_overhead
from ..core.graph import Graph
from ..core.liveness import drop_unread_copies, kept_bytes
from ..core.planners import get_planner
from ..core.planners.base import NullProgress
from ..core.units import MB
from ..mx.bind import planned_mb_in_process
from ..options import MirrorOptions
from ..progress import PlanProgress
from .cached import cached_plan
from .result import PLAN_LOGGER, MirrorPlan
from .setup import PlanningSetup

__all__ = ["plan_one_level", "nothing_to_gain", "unmirrored_plan", "SMALL_ACTIVATIONS_BYTES"]

logger = logging.getLogger(PLAN_LOGGER)

#: Under the default budget, a network whose activations backward keeps (liveness model,
#: unmirrored) stay under this many bytes is not mirrored (NOTE [ deciding without candidates ]).
SMALL_ACTIVATIONS_BYTES = 1 * MB


def nothing_to_gain(graph: Graph, budget: Budget) -> Optional[str]:
    """Why mirroring cannot help ``graph`` under ``budget``, or None when it may.

    # NOTE [ deciding without candidates ]
    # Planning binds candidates in worker processes (seconds on a new process),
    # which a network gains nothing from when no operator may be recomputed, or
    # when, under the default budget, the outputs backward keeps are under 1 MB
    # (MXNet reports whole MB, so no plan could show a saving; an MNIST MLP at
    # batch 100 keeps ~0.1 MB).  Then the plan is the unmirrored symbol, decided
    # from the graph alone and measured by one bind in this process (tens of
    # milliseconds for such a network).  An explicit budget ('min', a fraction,
    # a size) always plans.
    """
    if not any(node.can_mirror for node in graph.op_nodes):
        return "no operator may be recomputed"
    if budget.kind == "auto" and kept_bytes(graph) < SMALL_ACTIVATIONS_BYTES:
        return f"backward keeps under {SMALL_ACTIVATIONS_BYTES / MB:.0f} MB of activations"
    return None


def plan_one_level(setup: PlanningSetup, options: MirrorOptions,
                   started: Optional[float] = None) -> MirrorPlan:
    """The one-level mirror plan of ``setup``'s symbol under ``options``, through the cache.

    Parameters
    ----------
    setup : PlanningSetup
        From :func:`~.setup.prepare_planning`.
    options : MirrorOptions
        Planner, budget, cache directory and ``recompute_dropout`` (a key field only:
        the dropout variants are :mod:`.dropout`'s).
    started : float, optional
        ``time.perf_counter()`` when planning began (default: now).
    """
    started = time.perf_counter() if started is None else started

    def use(entry: MirrorEntry) -> Optional[MirrorPlan]:
        graph = setup.graph
        if not all(name in graph and graph.node(name).can_mirror for name in entry.mirrored):
            return None
        return _finish(setup, options, started, entry.mirrored, entry.baseline_mb,
                       entry.planned_mb, entry.overhead, from_cache=True)

    return cached_plan(get_cache(options.cache_dir), setup.key(options), MirrorEntry, use,
                       lambda: _plan_now(setup, options, started))


def _plan_now(setup: PlanningSetup, options: MirrorOptions,
              started: float) -> Tuple[MirrorPlan, MirrorEntry]:
    """Plan with the chosen planner (or decide without candidates); the plan and its entry."""
    graph, budget = setup.graph, options.budget
    reason = nothing_to_gain(graph, budget)
    if reason is not None:
        # NOTE [ deciding without candidates ]: one in-process bind of the
        # unmirrored symbol (no worker process to start) gives MXNet's figure.
        baseline_mb = planned_mb_in_process(setup.template.build(frozenset()), setup.context,
                                            setup.measure.shapes, setup.measure.types, setup.requests)
        logger.debug("not mirroring: %s", reason)
        plan = _finish(setup, options, started, (), baseline_mb, baseline_mb, 0.0, from_cache=False,
                       candidates=[{"label": f"unmirrored ({reason})", "planned_mb": baseline_mb,
                                    "overhead": 0.0, "mirrored_count": 0}])
        return plan, MirrorEntry((), baseline_mb, baseline_mb, 0.0, "unmirrored")
    label = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape, _ in setup.all_inputs)
    # A BudgetUnreachableError comes out unchained, with one smallest-reachable figure:
    # auto's search under a limit runs outside its except block (core/planners/auto).
    try:
        with PlanProgress(label) as progress:
            setup.measure.progress = progress
            outcome = get_planner(options.planner).plan(graph, budget, setup.measure)
    finally:
        setup.measure.progress = NullProgress()
    chosen = outcome.chosen
    order = [n.name for n in graph.nodes if n.name in chosen.decision.mirrored]
    plan = _finish(setup, options, started, order, outcome.baseline_mb, chosen.planned_mb,
                   recompute_overhead(graph, order), from_cache=False,
                   candidates=[{"label": c.decision.label, "planned_mb": c.planned_mb,
                                "overhead": c.overhead, "mirrored_count": len(c.decision.mirrored)}
                               for c in outcome.candidates])
    return plan, MirrorEntry(tuple(order), plan.baseline_mb, plan.planned_mb, plan.overhead,
                             chosen.decision.label)


def _finish(setup: PlanningSetup, options: MirrorOptions, started: float, mirrored: Sequence[str],
            baseline_mb: float, planned_mb: float, overhead: float, from_cache: bool,
            candidates: Optional[List[Dict[str, Any]]] = None) -> MirrorPlan:
    """The plan for a decision, whether just planned or from the cache."""
    mirrored = _runnable(setup.graph, mirrored, planned_mb)
    plan = MirrorPlan(
        symbol=setup.template.build(frozenset(mirrored)), baseline_mb=baseline_mb,
        planned_mb=planned_mb, mirrored=tuple(mirrored), planner=options.planner, overhead=overhead,
        budget=str(options.budget), context=setup.context.device_type,
        kept_count=len(setup.graph.op_nodes) - len(mirrored),
        planning_seconds=time.perf_counter() - started, from_cache=from_cache,
        candidates=candidates or [], inputs=setup.input_shapes)
    logger.info("%s", plan.summary())
    return plan


def unmirrored_plan(setup: PlanningSetup, options: MirrorOptions, started: float, baseline_mb: float,
                    candidates: Optional[List[Dict[str, Any]]] = None) -> MirrorPlan:
    """The plan that recomputes nothing (what every backend falls back to rather than plan above it)."""
    return _finish(setup, options, started, (), baseline_mb, baseline_mb, 0.0, False, candidates)


def _runnable(graph: Graph, mirrored: Sequence[str], planned_mb: float) -> Sequence[str]:
    """``mirrored`` without the copies nothing reads when this process cannot run them."""
    if _cpu_runs_unread_copies():
        return mirrored
    runnable = drop_unread_copies(graph, mirrored)
    if len(runnable) < len(mirrored):
        logger.warning(
            "MKLDNN is off in this process: %d recomputed nodes whose copy nothing reads are "
            "not recomputed (MXNet's convolution without MKLDNN refuses such copies; NOTE "
            "[ copies nothing reads ]); the planned %.0f MB was measured with them",
            len(mirrored) - len(runnable), planned_mb)
        mirrored = [name for name in mirrored if name in runnable]
    return mirrored


def _cpu_runs_unread_copies() -> bool:
    """Whether this process's CPU operators run a recomputed copy nothing reads: with MKLDNN
    (this build's default) they do; without it MXNet's convolution checks its output request
    and fails (NOTE [ copies nothing reads ] in core/liveness.py).  cuDNN's convolution on the
    GPU writes the copy's own (allocated) block and does not check."""
    if env.mkldnn_switched_off():
        return False
    try:
        return bool(mx.runtime.Features().is_enabled("MKLDNN"))
    except (AttributeError, RuntimeError, mx.base.MXNetError):
        return False
