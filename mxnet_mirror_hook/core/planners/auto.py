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
"""
from __future__ import annotations

from typing import Dict

from ..budget import Budget
from ..cost import recompute_overhead
from ..graph import Graph
from . import register_planner
from .base import CandidateEvaluator, Decision, MeasureFn, Planner, PlanOutcome
from .dp import WIDE_FRONTIER_VARIANTS, least_compute_decisions, least_memory_decisions
from .frontier import frontier_decisions
from .selective import selective_decisions
from .memonger import MB_SHIFT, search_thresholds, threshold_plan, user_stages

#: Below this fraction of the baseline, single-node cuts are good enough.
FRONTIER_FALLBACK_RATIO = 0.7
#: Modelled memory levels (fractions of the unmirrored model) of the least-compute
#: sweep, run when the budget is a fixed limit.
SWEEP_FRACTIONS = (0.3, 0.45, 0.6, 0.75, 0.9)

__all__ = ["AutoPlanner", "auto_stages"]


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

    def __init__(self, ntrial: int = 6, refine_steps: int = 2, max_frontier: int = 8) -> None:
        self.ntrial = ntrial
        self.refine_steps = refine_steps
        self.max_frontier = max_frontier

    def plan(self, graph: Graph, budget: Budget, measure: MeasureFn) -> PlanOutcome:
        stages = auto_stages(graph)
        evaluator = CandidateEvaluator(graph, measure)
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
        unit_shift = unit_shift_for(graph)
        unit = "MB" if unit_shift == MB_SHIFT else "KB"
        searched = search_thresholds(graph, stages, self.ntrial, unit_shift=unit_shift)
        grid = [Decision(r.mirrored, f"threshold={t}{unit}") for t, r in searched]
        if budget.is_limit:
            # The seed's plans and the least-memory programs recompute nearly the
            # whole forward pass; when a plan of the sweep already fits with less
            # estimated recomputation than any of them, none of them can be
            # chosen: skip their binds.
            baseline = evaluator.evaluate_many([unmirrored] + sweep)[0]
            limit = budget.limit_mb(baseline.planned_mb)
            fitting = [c.overhead for c in evaluator.candidates if c.planned_mb <= limit]
            heavy = grid + least_memory
            if fitting and min(fitting) < min(recompute_overhead(graph, d.mirrored) for d in heavy):
                return evaluator.outcome(budget, baseline)
        results = evaluator.evaluate_many([unmirrored] + grid + programs)
        baseline = results[0]
        measured = [(t, c.planned_mb) for (t, _), c in zip(searched, results[1:len(searched) + 1])
                    if c is not None]
        if not measured:
            return evaluator.outcome(budget, baseline)
        thresholds = sorted({t for t, _ in measured})
        best_threshold = min(measured, key=lambda item: (item[1], item[0]))[0]
        position = thresholds.index(best_threshold)
        low = thresholds[position - 1] if position > 0 else max(best_threshold // 2, 0)
        high = thresholds[position + 1] if position + 1 < len(thresholds) else best_threshold * 2 + 1
        refined = []
        for k in range(1, self.refine_steps + 1):
            threshold = low + (high - low) * k // (self.refine_steps + 1)
            if threshold not in thresholds:
                result = threshold_plan(graph, threshold << unit_shift, stages)
                refined.append(Decision(result.mirrored, f"threshold={threshold}{unit}(refined)"))
        evaluator.evaluate_many(refined)
        best = min(c.planned_mb for c in evaluator.candidates)
        if best > FRONTIER_FALLBACK_RATIO * baseline.planned_mb:
            # Single-node cuts saved little (an unrolled RNN, long skips): try cuts
            # where several tensors cross together (NOTE [ frontier cuts ]).
            evaluator.evaluate_many(selective_decisions(graph)
                                    + least_memory_decisions(graph, WIDE_FRONTIER_VARIANTS)
                                    + frontier_decisions(graph, self.max_frontier, self.ntrial))
        return evaluator.outcome(budget, baseline)
