"""What every planner shares: decisions, measured candidates, and the choice by budget."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence

from ...errors import BudgetUnreachableError
from ..budget import Budget
from ..cost import recompute_overhead
from ..graph import Graph

__all__ = ["Decision", "Candidate", "PlanOutcome", "MeasureFn", "Planner", "select_candidate"]

logger = logging.getLogger(__name__)

#: Measures a decision: names of recomputed nodes -> planned MB (MXNet's figure).
MeasureFn = Callable[[FrozenSet[str]], float]


@dataclass(frozen=True)
class Decision:
    """Which nodes to recompute, and where the decision came from.

    Parameters
    ----------
    mirrored : frozenset of str
        Names of recomputed nodes.
    label : str
        How the planner made it (``"threshold=120MB"``), for logs and reports.
    """

    mirrored: FrozenSet[str]
    label: str = ""


@dataclass(frozen=True)
class Candidate:
    """A decision with its measured memory and estimated overhead."""

    decision: Decision
    planned_mb: float
    overhead: float


@dataclass
class PlanOutcome:
    """What a planner returns.

    Attributes
    ----------
    chosen : Candidate
        The selected candidate (the unmirrored one when nothing beats it).
    baseline_mb : float
        Measured memory of the unmirrored graph.
    candidates : list of Candidate
        Every candidate measured, in the order measured.
    """

    chosen: Candidate
    baseline_mb: float
    candidates: List[Candidate] = field(default_factory=list)


class Planner:
    """Base class: propose decisions, measure them, choose by budget.

    Subclasses override :meth:`propose`, or :meth:`plan` for planners whose
    next proposal depends on measurements.
    """

    name = "base"

    def propose(self, graph: Graph) -> List[Decision]:
        """Decisions worth measuring for ``graph``; the unmirrored one is added by :meth:`plan`."""
        return []

    def plan(self, graph: Graph, budget: Budget, measure: MeasureFn) -> PlanOutcome:
        """Measure the unmirrored graph and every proposal, then choose by ``budget``.

        Parameters
        ----------
        graph : Graph
            The forward graph.
        budget : Budget
            The parsed memory budget.
        measure : callable
            ``measure(frozenset_of_names) -> MB``.

        Returns
        -------
        PlanOutcome
        """
        evaluator = CandidateEvaluator(graph, measure)
        baseline = evaluator.evaluate(Decision(frozenset(), "unmirrored"))
        for decision in self.propose(graph):
            evaluator.evaluate(decision)
        return evaluator.outcome(budget, baseline)


class CandidateEvaluator:
    """Measures decisions once each and remembers the results."""

    def __init__(self, graph: Graph, measure: MeasureFn) -> None:
        self.graph = graph
        self._measure = measure
        self._seen: Dict[FrozenSet[str], Candidate] = {}
        self.candidates: List[Candidate] = []

    def evaluate(self, decision: Decision) -> Candidate:
        """The candidate for ``decision``, measuring it only the first time."""
        effective = frozenset(name for name in decision.mirrored if self.graph.node(name).can_mirror)
        if effective in self._seen:
            return self._seen[effective]
        planned_mb = float(self._measure(effective))
        candidate = Candidate(Decision(effective, decision.label), planned_mb,
                              recompute_overhead(self.graph, effective))
        logger.debug("candidate %s: %.0f MB, overhead %.3f", decision.label, planned_mb,
                     candidate.overhead)
        self._seen[effective] = candidate
        self.candidates.append(candidate)
        return candidate

    def outcome(self, budget: Budget, baseline: Candidate) -> PlanOutcome:
        """Choose among everything measured so far."""
        chosen = select_candidate(self.candidates, budget, baseline.planned_mb)
        return PlanOutcome(chosen, baseline.planned_mb, list(self.candidates))


def select_candidate(candidates: Sequence[Candidate], budget: Budget, baseline_mb: float) -> Candidate:
    """Choose a candidate for a budget.

    With no fixed limit (``'auto'``, ``'min'``) the lowest memory wins, ties going
    to the smaller overhead.  With a limit, the smallest overhead among the
    candidates that fit wins, ties going to the lower memory.

    Raises
    ------
    BudgetUnreachableError
        When no candidate fits the limit; it carries the lowest reachable MB.
    ValueError
        When ``candidates`` is empty.
    """
    if not candidates:
        raise ValueError("no candidate to choose from")
    limit: Optional[float] = budget.limit_mb(baseline_mb)
    if limit is None:
        return min(candidates, key=lambda c: (c.planned_mb, c.overhead, len(c.decision.mirrored)))
    fitting = [c for c in candidates if c.planned_mb <= limit]
    if not fitting:
        raise BudgetUnreachableError(limit, min(c.planned_mb for c in candidates), baseline_mb)
    return min(fitting, key=lambda c: (c.overhead, c.planned_mb, len(c.decision.mirrored)))
