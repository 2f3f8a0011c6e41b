"""The default planner: the seed's search on automatically found stage nodes, refined.

# NOTE [ why cut points are the right stages ]
# The threshold heuristic only pays off when a kept stage output really
# separates the graph: recomputation restarts from kept outputs, so a kept
# node inside a residual block still leaves the shortcut's producer to be
# recomputed from further back.  gluoncv models carry no ``mirror_stage``
# marks; the seed then recomputes everything and memory grows.  Nodes that
# every path from the data to the loss passes through (``Graph.cut_points``)
# are exactly where a chain of segments can be cut, so they become stages of
# their own.  User marks, when present, win: the user knows the model.
#
# After the seed's grid, the planner refines around the best threshold it
# measured (the bracket between its neighbours), which costs a few more binds
# and can only lower the result.  The selective decisions (keep expensive
# outputs, recompute cheap ones: MXNet's own MXNET_BACKWARD_DO_MIRROR rule) are
# measured only when everything else saves less than 30% (unrolled RNNs, where
# they help; on CNNs MXNet 1.9 keeps the inputs of the kept convolutions anyway,
# NOTE [ what backward keeps ] in liveness.py), together with cuts where several
# tensors cross together: the seed's heuristic over them (NOTE [ frontier cuts ]
# in frontier.py) and the least-memory program with up to 8 crossing tensors.  The dynamic
# programs of dp.py are measured with the seed's grid: the least-memory one
# always, the least-compute sweep when the budget is a fixed limit (then the
# cheapest plan that fits wins).
#
# For 'min' and the default budget all of these are scored on the allocator
# model instead of bound, when it reproduces MXNet for the unmirrored graph
# (NOTE [ replaying MXNet's memory plan ] in core/allocator.py); a search
# walks from the best one (NOTE [ searching against the allocator ]) and
# MXNet binds only the searched plan and the two best candidates.
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, FrozenSet, List, Optional, Tuple

from ...errors import BudgetUnreachableError
from ..allocator import AllocatorModel, search_allocator_plan
from ..budget import Budget
from ..cost import recompute_overhead
from ..graph import Graph
from . import register_planner
from .base import ONE_FORWARD, CandidateEvaluator, Decision, MeasureFn, Planner, PlanOutcome
from .dp import WIDE_FRONTIER_VARIANTS, least_compute_decisions, least_memory_decisions
from .frontier import frontier_decisions
from .selective import selective_decisions
from .memonger import MB_SHIFT, search_thresholds, threshold_plan, user_stages

#: Below this fraction of the baseline, single-node cuts are good enough.
FRONTIER_FALLBACK_RATIO = 0.7
#: Modelled memory levels (fractions of the unmirrored model) of the least-compute
#: sweep, run when the budget is a fixed limit.
SWEEP_FRACTIONS = (0.3, 0.45, 0.6, 0.75, 0.9)

#: Work of the allocator-guided search (NOTE [ searching against the allocator ]), in
#: executed operators replayed: the evaluations it makes are this over the size of the
#: starting plan's executed graph (2-3 s on the bench networks here, ~5 us per operator
#: per evaluation).  A count, not a time, so every machine and every run plans the same
#: (distributed workers too).
ALLOCATOR_SEARCH_WORK = 600_000
#: Seconds after which the search stops anyway (a very slow or loaded machine).
ALLOCATOR_SEARCH_SECONDS = 6.0
#: Above this many forward operators a model evaluation (~20 us per executed
#: operator) costs about as much as a bind in a worker: every candidate is bound.
ALLOCATOR_MODEL_MAX_OPERATORS = 2000
#: Least-memory programs scored on the allocator model (the search starts from the best
#: candidate, so fewer variants are needed than when each is bound; these two were the
#: best starts on the bench networks).
MODELLED_LEAST_MEMORY_VARIANTS = ((1, 0.5), (2, 0.0))
#: Plans the allocator model ranks best that are bound to confirm it, besides the searched one.
CONFIRMED_BY_BIND = 2

__all__ = ["AutoPlanner", "auto_stages", "allocator_model"]

logger = logging.getLogger(__name__)


def allocator_model(measure: MeasureFn) -> Optional[AllocatorModel]:
    """The allocator model of the unmirrored bind, if the measurement callback can capture it
    (``measure.executed_graph()``) and the model reproduces MXNet's figure for it."""
    capture = getattr(measure, "executed_graph", None)
    executed = capture() if capture is not None else None
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


def auto_stages(graph: Graph) -> Dict[str, str]:
    """Stage marks for ``graph``: the user's if any, else one stage per cut point."""
    marks = user_stages(graph)
    if marks:
        return marks
    return {name: "True" for name in graph.cut_points()}


def unit_shift_for(graph: Graph) -> int:
    """Threshold unit: MB as in the seed, KB for graphs under 256 MB of activations.

    With MB steps a small graph's thresholds all round to 0 and the search
    degenerates to "keep every stage".
    """
    total = sum(n.planned_bytes for n in graph.op_nodes)
    return MB_SHIFT if total >= (256 << MB_SHIFT) else 10


@register_planner("auto")
class AutoPlanner(Planner):
    """Seed search on cut-point stages plus a local refinement of the threshold."""

    name = "auto"

    def __init__(self, ntrial: int = 6, refine_steps: int = 2, max_frontier: int = 8,
                 search_seconds: float = ALLOCATOR_SEARCH_SECONDS,
                 search_evaluations: Optional[int] = None) -> None:
        self.ntrial = ntrial
        self.refine_steps = refine_steps
        self.max_frontier = max_frontier
        self.search_seconds = search_seconds
        self.search_evaluations = search_evaluations

    def plan(self, graph: Graph, budget: Budget, measure: MeasureFn) -> PlanOutcome:
        evaluator = CandidateEvaluator(graph, measure)
        modelled = self.search_seconds > 0 and len(graph.op_nodes) <= ALLOCATOR_MODEL_MAX_OPERATORS
        if modelled and not budget.is_limit:
            # The capture (a bind in a worker process, which may have to start)
            # runs while this thread computes the candidates it will score.
            capture = _InBackground(lambda: allocator_model(measure))
            stages = auto_stages(graph)
            grid = self._grid(graph, stages) if stages else []
            programs = least_memory_decisions(graph, MODELLED_LEAST_MEMORY_VARIANTS)
            model = capture.result()
            if model is not None:
                return self._plan_on_model(graph, budget, evaluator, model, stages, grid, programs)
        try:
            return self._plan_measured(graph, budget, evaluator)
        except BudgetUnreachableError:
            # Nothing bound fits the limit: search against the allocator from the
            # lowest plan measured, then choose again (raises if still nothing fits).
            model = allocator_model(measure) if modelled else None
            if model is None:
                raise
            best = min(evaluator.candidates, key=lambda c: (c.planned_mb, c.overhead))
            evaluator.evaluate_many([self._search(graph, model, best.decision, None)])
            return evaluator.outcome(budget, evaluator.candidates[0])

    def _plan_measured(self, graph: Graph, budget: Budget, evaluator: CandidateEvaluator) -> PlanOutcome:
        """Every candidate bound (no allocator model, or a fixed limit)."""
        stages = auto_stages(graph)
        unmirrored = Decision(frozenset(), "unmirrored")
        # A fixed limit: the cheapest plan under it may keep whole stretches
        # (NOTE [ the cut-set chain ] in dp.py); trace the Pareto curve.
        sweep = least_compute_decisions(graph, SWEEP_FRACTIONS) if budget.is_limit else []
        least_memory = least_memory_decisions(graph)
        programs = sweep + least_memory
        if not stages:
            baseline = evaluator.evaluate_many(
                [unmirrored] + selective_decisions(graph) + programs
                + least_memory_decisions(graph, WIDE_FRONTIER_VARIANTS)
                + frontier_decisions(graph, self.max_frontier, self.ntrial))[0]
            return evaluator.outcome(budget, baseline)
        grid = self._grid(graph, stages)
        grid_decisions = [d for _, d in grid]
        if budget.is_limit:
            # The seed's plans and the least-memory programs recompute nearly the
            # whole forward pass; when a plan of the sweep already fits with less
            # estimated recomputation than any of them, none of them can be
            # chosen: skip their binds.
            baseline = evaluator.evaluate_many([unmirrored] + sweep)[0]
            limit = budget.limit_mb(baseline.planned_mb)
            fitting = [c.overhead for c in evaluator.candidates if c.planned_mb <= limit]
            heavy = grid_decisions + least_memory
            if fitting and min(fitting) < min(recompute_overhead(graph, d.mirrored) for d in heavy):
                return evaluator.outcome(budget, baseline)
        results = evaluator.evaluate_many([unmirrored] + grid_decisions + programs)
        baseline = results[0]
        measured = {d.mirrored: c.planned_mb for d, c in zip(grid_decisions, results[1:]) if c is not None}
        if not measured:
            return evaluator.outcome(budget, baseline)
        unbound = float("inf")
        refined = self._refined(graph, stages, grid, lambda d: measured.get(d.mirrored, unbound))
        evaluator.evaluate_many(refined[len(grid):])
        best = min(c.planned_mb for c in evaluator.candidates)
        if best > FRONTIER_FALLBACK_RATIO * baseline.planned_mb:
            # Single-node cuts saved little (an unrolled RNN, long skips): try cuts
            # where several tensors cross together (NOTE [ frontier cuts ]).
            evaluator.evaluate_many(selective_decisions(graph)
                                    + least_memory_decisions(graph, WIDE_FRONTIER_VARIANTS)
                                    + frontier_decisions(graph, self.max_frontier, self.ntrial))
        return evaluator.outcome(budget, baseline)

    def _grid(self, graph: Graph, stages: Dict[str, str]) -> List[Tuple[int, Decision]]:
        """The seed's thresholds over ``stages`` and their decisions."""
        unit_shift = unit_shift_for(graph)
        unit = "MB" if unit_shift == MB_SHIFT else "KB"
        return [(t, Decision(r.mirrored, f"threshold={t}{unit}"))
                for t, r in search_thresholds(graph, stages, self.ntrial, unit_shift=unit_shift)]

    def _refined(self, graph: Graph, stages: Dict[str, str], grid: List[Tuple[int, Decision]],
                 score) -> List[Decision]:
        """``grid`` and a refinement around its best threshold by ``score``."""
        decisions = [d for _, d in grid]
        if not grid:
            return decisions
        unit_shift = unit_shift_for(graph)
        unit = "MB" if unit_shift == MB_SHIFT else "KB"
        values = {t: score(d) for t, d in grid}
        thresholds = sorted(values)
        best_threshold = min(thresholds, key=lambda t: (values[t], t))
        position = thresholds.index(best_threshold)
        low = thresholds[position - 1] if position > 0 else max(best_threshold // 2, 0)
        high = thresholds[position + 1] if position + 1 < len(thresholds) else best_threshold * 2 + 1
        for k in range(1, self.refine_steps + 1):
            threshold = low + (high - low) * k // (self.refine_steps + 1)
            if threshold not in values:
                result = threshold_plan(graph, threshold << unit_shift, stages)
                decisions.append(Decision(result.mirrored, f"threshold={threshold}{unit}(refined)"))
        return decisions

    def _plan_on_model(self, graph: Graph, budget: Budget, evaluator: CandidateEvaluator,
                       model: AllocatorModel, stages: Dict[str, str],
                       grid: List[Tuple[int, Decision]], programs: List[Decision]) -> PlanOutcome:
        """Rank every candidate with the allocator model, search from the best, bind the few best.

        NOTE [ replaying MXNet's memory plan ] in core/allocator.py: the model
        gives MXNet's figure for any mirror set in milliseconds, so the seed's
        grid and the programs are scored on it instead of bound; MXNet's bind
        confirms only the searched plan and the ``CONFIRMED_BY_BIND`` best.
        """
        baseline = evaluator.evaluate(Decision(frozenset(), "unmirrored"))
        cap = self._overhead_cap(budget)
        scored: Dict[FrozenSet[str], Tuple[float, Decision]] = {}

        def score(decision: Decision) -> float:
            effective = evaluator.effective(decision)
            if effective.mirrored not in scored:
                scored[effective.mirrored] = (model.planned_mb(effective.mirrored), effective)
            return scored[effective.mirrored][0]

        for decision in self._refined(graph, stages, grid, score) + programs:
            score(decision)
        if not scored or min(v for v, _ in scored.values()) > FRONTIER_FALLBACK_RATIO * baseline.planned_mb:
            for decision in (selective_decisions(graph)
                             + least_memory_decisions(graph, WIDE_FRONTIER_VARIANTS)
                             + frontier_decisions(graph, self.max_frontier, self.ntrial)):
                score(decision)
        overhead = {key: recompute_overhead(graph, key) for key in scored}
        ranked = sorted(((value, overhead[key], len(key), decision.label), decision)
                        for key, (value, decision) in scored.items() if overhead[key] <= cap)
        if not ranked:
            return evaluator.outcome(budget, baseline)
        confirm = [decision for _, decision in ranked[:CONFIRMED_BY_BIND]]
        confirm.insert(0, self._search(graph, model, confirm[0], cap))
        for candidate in evaluator.evaluate_many(confirm):
            if candidate is None:
                continue
            modelled = model.planned_mb(candidate.decision.mirrored)
            if not model.agrees(modelled, candidate.planned_mb):
                logger.info("allocator model and MXNet disagree on %s: %.0f MB modelled, %.0f bound",
                            candidate.decision.label, modelled, candidate.planned_mb)
        return evaluator.outcome(budget, baseline)

    @staticmethod
    def _overhead_cap(budget: Budget) -> float:
        """The most estimated overhead a plan may have (``select_candidate``'s rule)."""
        return ONE_FORWARD + 1e-9 if budget.kind == "auto" else float("inf")

    def _search(self, graph: Graph, model: AllocatorModel, start: Decision,
                cap: Optional[float]) -> Decision:
        """The allocator-guided search from ``start`` (NOTE [ searching against the allocator ])."""
        movable = [n.name for n in graph.op_nodes if n.can_mirror]
        bounded = cap is not None and cap != float("inf")
        accept = (lambda mirrored: recompute_overhead(graph, mirrored) <= cap) if bounded else None
        executed = len(model.graph.nodes) + len(start.mirrored)
        evaluations = self.search_evaluations or max(100, ALLOCATOR_SEARCH_WORK // executed)
        result = search_allocator_plan(model, start.mirrored, movable, accept=accept,
                                       time_limit=self.search_seconds,
                                       max_evaluations=evaluations)
        logger.info("allocator search from %s: %d -> %d MB modelled in %d evaluations (%.1f s)",
                     start.label, result.start_bytes >> 20, result.planned_bytes >> 20,
                     result.evaluations, result.seconds)
        return Decision(result.mirrored, f"allocator search from {start.label}")


class _InBackground:
    """Runs a function in a thread; ``result()`` waits and returns (or raises) its outcome."""

    def __init__(self, function) -> None:
        self._outcome: list = []
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self._outcome.append((True, function()))
        except BaseException as error:  # re-raised in the caller's thread
            self._outcome.append((False, error))

    def result(self):
        self._thread.join()
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value
