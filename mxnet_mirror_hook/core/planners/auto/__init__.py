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
# MXNet binds only the searched plan and the best-ranked candidate.  Under an
# overhead limit (``Budget.within_overhead``) the same runs with the limit as
# the cap, the least-compute programs at the least memory within it added
# (NOTE [ the one-level plan within an overhead limit ] in planning/one_level.py).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ....errors import BudgetUnreachableError
from ...budget import Budget
from ...graph import Graph
from ..base import CandidateEvaluator, MeasureFn, Planner, PlanOutcome
from ..registry import register_planner
from .candidates import (MODELLED_LEAST_MEMORY_VARIANTS, SWEEP_FRACTIONS, CandidateSets, auto_stages,
                         unit_shift_for)
from .measured import FRONTIER_FALLBACK_RATIO, plan_measured
from .modelled import (ALLOCATOR_MODEL_MAX_OPERATORS, ALLOCATOR_SEARCH_WORK, allocator_model,
                       allocator_search, plan_on_model)

__all__ = ["AutoPlanner", "auto_stages", "allocator_model", "unit_shift_for", "SWEEP_FRACTIONS",
           "FRONTIER_FALLBACK_RATIO", "ALLOCATOR_SEARCH_WORK"]

logger = logging.getLogger(__name__)


@register_planner("auto")
class AutoPlanner(Planner):
    """The default planner: three strategies, chosen by the budget and what can be measured.

    * :func:`.modelled.plan_on_model` for ``'min'`` and the default budget when
      the allocator model reproduces MXNet (graphs up to
      :data:`~.modelled.ALLOCATOR_MODEL_MAX_OPERATORS` operators);
    * :func:`.measured.plan_measured` otherwise: every candidate bound;
    * under a fixed limit nothing bound fits: a search against the allocator
      from the lowest plan (:meth:`_search_under_limit`) before giving up.

    Parameters
    ----------
    ntrial, refine_steps, max_frontier
        See :class:`.candidates.CandidateSets`.
    use_model : bool
        Whether the allocator model may be used (False: every candidate bound).
    search_evaluations : int, optional
        Evaluations of the allocator search (default: by the graph's size).
    """

    name = "auto"

    def __init__(self, ntrial: int = 6, refine_steps: int = 2, max_frontier: int = 8,
                 use_model: bool = True, search_evaluations: Optional[int] = None) -> None:
        self.ntrial = ntrial
        self.refine_steps = refine_steps
        self.max_frontier = max_frontier
        self.use_model = use_model
        self.search_evaluations = search_evaluations

    def plan(self, graph: Graph, budget: Budget, measure: MeasureFn) -> PlanOutcome:
        evaluator = CandidateEvaluator(graph, measure)
        sets = CandidateSets(graph, self.ntrial, self.refine_steps, self.max_frontier)
        modelled = self.use_model and len(graph.op_nodes) <= ALLOCATOR_MODEL_MAX_OPERATORS
        if modelled and not budget.is_limit:
            # The capture (a bind in a worker process, which may have to start)
            # runs while this thread computes the candidates it will score.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-capture") as pool:
                capture = pool.submit(allocator_model, evaluator.measurement)
                sets.grid()
                programs = sets.least_memory(MODELLED_LEAST_MEMORY_VARIANTS)
                if budget.overhead_limit is not None:
                    programs = sets.within_overhead(budget.overhead_limit) + programs
                model = capture.result()
            if model is not None:
                return plan_on_model(sets, budget, evaluator, model, programs,
                                     self.search_evaluations)
        try:
            return plan_measured(sets, budget, evaluator)
        except BudgetUnreachableError:
            if not modelled:
                raise
        # Outside the except block: a second BudgetUnreachableError from the search is the
        # only one the user sees (not chained to the first, with another figure).
        return self._search_under_limit(sets, budget, evaluator)

    def _search_under_limit(self, sets: CandidateSets, budget: Budget,
                            evaluator: CandidateEvaluator) -> PlanOutcome:
        """Nothing bound fits the limit: search against the allocator from the lowest plan
        measured, then choose again (raises ``BudgetUnreachableError`` if still nothing fits)."""
        model = allocator_model(evaluator.measurement)
        if model is None:
            return evaluator.outcome(budget, evaluator.candidates[0])
        best = min(evaluator.candidates, key=lambda c: (c.planned_mb, c.overhead))
        evaluator.evaluate_many([allocator_search(sets.graph, model, best.decision, None,
                                                  self.search_evaluations,
                                                  evaluator.measurement.progress)])
        return evaluator.outcome(budget, evaluator.candidates[0])
