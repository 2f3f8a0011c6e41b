"""``auto``'s strategy when every candidate is bound (no allocator model, or a fixed limit)."""
from __future__ import annotations

from ...budget import Budget
from ...cost import recompute_overhead
from ..base import CandidateEvaluator, PlanOutcome
from .candidates import CandidateSets

__all__ = ["plan_measured", "FRONTIER_FALLBACK_RATIO"]

#: Below this fraction of the baseline, single-node cuts are good enough.
FRONTIER_FALLBACK_RATIO = 0.7


def plan_measured(sets: CandidateSets, budget: Budget, evaluator: CandidateEvaluator) -> PlanOutcome:
    """Bind the candidates and choose by ``budget``.

    Under a fixed limit the least-compute sweep is bound first: the cheapest
    plan under a limit may keep whole stretches (NOTE [ the cut-set chain ] in
    dp.py).  The seed's grid (refined around its best threshold on the bound
    figures) and the least-memory programs follow, unless a sweep plan already
    fits with less estimated recomputation than any of them.  When nothing
    saves 30%, the fallback families are bound too.

    Raises
    ------
    BudgetUnreachableError
        When nothing bound fits a fixed limit.
    """
    graph = sets.graph
    sweep = sets.sweep() if budget.is_limit else []
    if budget.overhead_limit is not None:
        sweep = sets.within_overhead(budget.overhead_limit)
    least_memory = sets.least_memory()
    programs = sweep + least_memory
    if not sets.stages:
        baseline, _ = evaluator.evaluate_with_baseline(sets.selective() + programs + sets.wide_cuts())
        return evaluator.outcome(budget, baseline)
    grid_decisions = [d for _, d in sets.grid()]
    if budget.is_limit:
        # The seed's plans and the least-memory programs recompute nearly the
        # whole forward pass; when a plan of the sweep already fits with less
        # estimated recomputation than any of them, none of them can be
        # chosen: skip their binds.
        baseline, _ = evaluator.evaluate_with_baseline(sweep)
        limit = budget.limit_mb(baseline.planned_mb)
        assert limit is not None  # a fixed limit has a figure
        fitting = [c.overhead for c in evaluator.candidates if c.planned_mb <= limit]
        heavy = grid_decisions + least_memory
        if fitting and min(fitting) < min(recompute_overhead(graph, d.mirrored) for d in heavy):
            return evaluator.outcome(budget, baseline)
    baseline, results = evaluator.evaluate_with_baseline(grid_decisions + programs)
    measured = {d.mirrored: c.planned_mb for d, c in zip(grid_decisions, results)
                if c is not None}
    if not measured:
        return evaluator.outcome(budget, baseline)
    unbound = float("inf")
    refined = sets.refined(lambda d: measured.get(d.mirrored, unbound))
    evaluator.evaluate_many(refined[len(grid_decisions):])
    best = min(c.planned_mb for c in evaluator.candidates)
    if best > FRONTIER_FALLBACK_RATIO * baseline.planned_mb:
        evaluator.evaluate_many(sets.fallback())
    return evaluator.outcome(budget, baseline)
