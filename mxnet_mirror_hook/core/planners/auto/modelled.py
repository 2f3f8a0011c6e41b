"""``auto``'s strategy on the allocator model: score every candidate, search, bind the few best.

NOTE [ replaying MXNet's memory plan ] in core/allocator.py: the model gives
MXNet's figure for any mirror set in milliseconds, so the seed's grid and the
programs are scored on it instead of bound; a walk searches from the best one
(NOTE [ searching against the allocator ]) and MXNet's bind confirms only the
searched plan and the :data:`CONFIRMED_BY_BIND` best.
"""
from __future__ import annotations

import logging
from typing import Dict, FrozenSet, List, Optional, Tuple

from ...allocator import AllocatorModel, search_allocator_plan
from ...budget import Budget
from ...cost import recompute_overhead
from ...graph import Graph
from ...units import MB_SHIFT
from ..base import ONE_FORWARD, CandidateEvaluator, Decision, Measurement, PlanOutcome, Progress
from .candidates import CandidateSets
from .measured import FRONTIER_FALLBACK_RATIO

__all__ = ["allocator_model", "plan_on_model", "allocator_search", "ALLOCATOR_SEARCH_WORK",
           "ALLOCATOR_SEARCH_SAFETY_SECONDS", "ALLOCATOR_MODEL_MAX_OPERATORS", "CONFIRMED_BY_BIND",
           "OVERHEAD_SEARCH_STARTS", "search_starts"]

logger = logging.getLogger(__name__)

#: Work of the allocator-guided search, in executed operators replayed: the
#: evaluations it makes are this over the size of the starting plan's executed graph
#: (2-3 s on the bench networks here, ~5 us per operator per evaluation).  A count,
#: not a time, so every machine and every run plans the same (distributed workers too).
ALLOCATOR_SEARCH_WORK = 600_000
#: A safety net only: far above what :data:`ALLOCATOR_SEARCH_WORK` takes on any bench
#: network (a few seconds); hitting it is logged as a warning, since the plan then
#: depends on the machine.
ALLOCATOR_SEARCH_SAFETY_SECONDS = 300.0
#: Above this many forward operators a model evaluation (~20 us per executed
#: operator) costs about as much as a bind in a worker: every candidate is bound.
ALLOCATOR_MODEL_MAX_OPERATORS = 2000
#: Plans the allocator model ranks best that are bound to confirm it, besides the searched one.
#: One: the model gives MXNet's figure to the MB where it is used (it must reproduce the
#: unmirrored bind first), so a second-ranked plan is never chosen; with two, every bench
#: network and the six LSTM buckets got the same plans (measured side by side), one bind more each.
CONFIRMED_BY_BIND = 1
#: Searches under an overhead limit (from the best-ranked starts; :func:`search_starts`).
OVERHEAD_SEARCH_STARTS = 2


def allocator_model(measurement: Measurement) -> Optional[AllocatorModel]:
    """The allocator model of the unmirrored bind, if the measuring side can capture it and
    the model reproduces MXNet's operator order and figure for it."""
    executed = measurement.executed_graph()
    if executed is None:
        return None
    model = AllocatorModel(executed)
    if not model.replays_capture():
        logger.info("the allocator model does not replay MXNet's operator order for this symbol; "
                    "binding every candidate instead")
        return None
    if executed.measured_mb is None or not model.agrees_with(executed.measured_mb):
        logger.info("the allocator model gives %.0f MB for the unmirrored graph, MXNet %s MB; "
                    "binding every candidate instead", model.planned_mb(), executed.measured_mb)
        return None
    return model


def overhead_cap(budget: Budget) -> float:
    """The most estimated overhead a plan may have (``select_candidate``'s rule)."""
    if budget.overhead_limit is not None:
        return budget.overhead_limit + 1e-9
    return ONE_FORWARD + 1e-9 if budget.kind == "auto" else float("inf")


def search_starts(budget: Budget) -> int:
    """Best-ranked candidates the allocator search starts from: one, and
    :data:`OVERHEAD_SEARCH_STARTS` under an overhead limit, whose few starts (the programs within
    the limit, the longest prefix within it) lead to different plans (resnet50_v1b, batch 32,
    within +6%: 2012 MB from the prefix, 2098 MB from the program; within +8%: 1841 and 1798 MB)."""
    return OVERHEAD_SEARCH_STARTS if budget.overhead_limit is not None else 1


def plan_on_model(sets: CandidateSets, budget: Budget, evaluator: CandidateEvaluator,
                  model: AllocatorModel, programs: List[Decision],
                  search_evaluations: Optional[int] = None) -> PlanOutcome:
    """Rank every candidate with the allocator model, search from the best, bind the few best."""
    graph = sets.graph
    baseline, _ = evaluator.evaluate_with_baseline()
    cap = overhead_cap(budget)
    scored: Dict[FrozenSet[str], Tuple[float, Decision]] = {}

    def score(decision: Decision) -> float:
        effective = evaluator.effective(decision)
        if effective.mirrored not in scored:
            scored[effective.mirrored] = (model.planned_mb(effective.mirrored), effective)
        return scored[effective.mirrored][0]

    for decision in sets.refined(score) + programs:
        score(decision)
    if not scored or min(v for v, _ in scored.values()) > FRONTIER_FALLBACK_RATIO * baseline.planned_mb:
        for decision in sets.fallback():
            score(decision)
    overhead = {key: recompute_overhead(graph, key) for key in scored}
    ranked = sorted(((value, overhead[key], len(key), decision.label), decision)
                    for key, (value, decision) in scored.items() if overhead[key] <= cap)
    if not ranked:
        return evaluator.outcome(budget, baseline)
    confirm = [decision for _, decision in ranked[:CONFIRMED_BY_BIND]]
    starts = [decision for _, decision in ranked[:search_starts(budget)]]
    # The best ranked are bound in the workers while this thread searches; the candidates
    # are still recorded searched-first, as if bound after the search.
    evaluator.prefetch(confirm)
    try:
        confirm[:0] = [allocator_search(graph, model, start, cap, search_evaluations,
                                        evaluator.measurement.progress) for start in starts]
        confirmed = evaluator.evaluate_many(confirm)
    except BaseException:
        evaluator.close(wait=False)  # Ctrl-C during the search: do not wait for the binds
        raise
    evaluator.close()
    for candidate in confirmed:
        if candidate is None:
            continue
        modelled = model.planned_mb(candidate.decision.mirrored)
        if not model.agrees(modelled, candidate.planned_mb):
            logger.info("allocator model and MXNet disagree on %s: %.0f MB modelled, %.0f bound",
                        candidate.decision.label, modelled, candidate.planned_mb)
    return evaluator.outcome(budget, baseline)


def allocator_search(graph: Graph, model: AllocatorModel, start: Decision, cap: Optional[float],
                     evaluations: Optional[int] = None,
                     progress: Optional[Progress] = None) -> Decision:
    """The allocator-guided search from ``start`` (NOTE [ searching against the allocator ]).

    Parameters
    ----------
    graph : Graph
        The forward graph.
    model : AllocatorModel
        The unmirrored bind's allocator model.
    start : Decision
        Where the walk starts.
    cap : float, optional
        Most estimated overhead a plan may have (None or inf: no cap).
    evaluations : int, optional
        Model evaluations (default :data:`ALLOCATOR_SEARCH_WORK` over the executed
        graph's size, at least 100).
    progress : Progress, optional
        Told the evaluations done.
    """
    movable = [n.name for n in graph.op_nodes if n.can_mirror]
    bound = cap if cap is not None and cap != float("inf") else None
    accept = (lambda mirrored: recompute_overhead(graph, mirrored) <= bound) if bound is not None else None
    executed = len(model.graph.nodes) + len(start.mirrored)
    count = evaluations or max(100, ALLOCATOR_SEARCH_WORK // executed)
    report = None
    if progress is not None:
        progress.phase("allocator search", count)
        report = lambda done: progress.advance(100)  # called every 100 evaluations
    result = search_allocator_plan(model, start.mirrored, movable, accept=accept,
                                   time_limit=ALLOCATOR_SEARCH_SAFETY_SECONDS,
                                   max_evaluations=count, progress=report)
    if result.timed_out:
        logger.warning("the allocator search stopped at its %.0f s safety limit after %d of %d "
                       "evaluations: this plan depends on how fast this machine is",
                       ALLOCATOR_SEARCH_SAFETY_SECONDS, result.evaluations, count)
    logger.info("allocator search from %s: %d -> %d MB modelled in %d evaluations (%.1f s)",
                start.label, result.start_bytes >> MB_SHIFT, result.planned_bytes >> MB_SHIFT,
                result.evaluations, result.seconds)
    return Decision(result.mirrored, f"allocator search from {start.label}")
