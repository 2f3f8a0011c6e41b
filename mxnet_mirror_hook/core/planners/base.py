"""What every planner shares: decisions, measured candidates, and the choice by budget."""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, List, Optional, Protocol, Sequence, Tuple, Union

from ...errors import BudgetUnreachableError, MeasurementError
from ..budget import Budget
from ..cost import BACKWARD_TO_FORWARD, recompute_overhead
from ..graph import Graph

if TYPE_CHECKING:  # pragma: no cover
    from ..allocator import ExecutedGraph

__all__ = ["Decision", "Candidate", "PlanOutcome", "Measurement", "MeasureFn", "as_measurement",
           "Progress", "NullProgress",
           "Planner", "select_candidate", "ONE_FORWARD"]

logger = logging.getLogger(__name__)

#: Estimated overhead of one extra forward pass, as a fraction of a plain iteration.
ONE_FORWARD = 1.0 / (1.0 + BACKWARD_TO_FORWARD)


class Progress(Protocol):
    """Where a planner reports progress (a bar on the MXNet side; nothing in tests)."""

    def phase(self, name: str, total: Optional[int] = None) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class NullProgress:
    """Progress that goes nowhere."""

    def phase(self, name: str, total: Optional[int] = None) -> None:
        """Ignored."""

    def advance(self, steps: int = 1) -> None:
        """Ignored."""


class Measurement(Protocol):
    """What a planner may ask of the measuring side (MXNet's, or a test's model).

    ``measurement(mirrored)`` is MXNet's planned MB for one decision (the
    names of the recomputed nodes); :meth:`many` measures several at once
    (the MXNet side binds them in parallel worker processes);
    :meth:`executed_graph` gives MXNet's executed graph of the unmirrored
    bind for the allocator model, or ``None`` when it cannot be had;
    :attr:`progress` is where long steps (the allocator search) report.

    Raises
    ------
    MeasurementError
        From any of them, when MXNet refuses a bind.
    """

    def __call__(self, mirrored: FrozenSet[str]) -> float: ...

    def many(self, decisions: Sequence[FrozenSet[str]]) -> List[float]: ...

    def executed_graph(self) -> Optional["ExecutedGraph"]: ...

    @property
    def progress(self) -> Progress: ...


#: A measurement, or a plain function ``mirrored -> MB`` (see :func:`as_measurement`).
MeasureFn = Union[Measurement, Callable[[FrozenSet[str]], float]]


class _FunctionMeasurement:
    """A plain ``mirrored -> MB`` function as a :class:`Measurement` (no executed graph)."""

    def __init__(self, function: Callable[[FrozenSet[str]], float]) -> None:
        self._function = function
        self.progress = NullProgress()

    def __call__(self, mirrored: FrozenSet[str]) -> float:
        return self._function(mirrored)

    def many(self, decisions: Sequence[FrozenSet[str]]) -> List[float]:
        return [self._function(d) for d in decisions]

    def executed_graph(self) -> Optional["ExecutedGraph"]:
        return None


def as_measurement(measure: MeasureFn) -> Measurement:
    """``measure`` itself when it is a full :class:`Measurement`, else a wrapper around it."""
    if all(callable(getattr(measure, name, None)) for name in ("many", "executed_graph")) \
            and hasattr(measure, "progress"):
        return measure  # type: ignore[return-value]
    return _FunctionMeasurement(measure)


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
        measure : Measurement or callable
            A :class:`Measurement`, or ``measure(frozenset_of_names) -> MB``.

        Returns
        -------
        PlanOutcome
        """
        evaluator = CandidateEvaluator(graph, measure)
        baseline, _ = evaluator.evaluate_with_baseline(self.propose(graph))
        return evaluator.outcome(budget, baseline)


class CandidateEvaluator:
    """Measures decisions once each and remembers the results."""

    def __init__(self, graph: Graph, measure: MeasureFn) -> None:
        self.graph = graph
        self.measurement = as_measurement(measure)
        self._seen: Dict[FrozenSet[str], Candidate] = {}
        self.candidates: List[Candidate] = []
        # Measurements started by prefetch: key -> (future of the batch, index in it).
        self._pending: Dict[FrozenSet[str], Tuple["Future[List[Optional[float]]]", int]] = {}
        self._background: Optional[ThreadPoolExecutor] = None

    def effective(self, decision: Decision) -> Decision:
        """``decision`` without the nodes that may not be recomputed (what is measured)."""
        graph = self.graph
        return Decision(frozenset(n for n in decision.mirrored if graph.node(n).can_mirror),
                        decision.label)

    def evaluate(self, decision: Decision) -> Optional[Candidate]:
        """The candidate for ``decision``, measuring it only the first time."""
        return self.evaluate_many([decision])[0]

    def evaluate_with_baseline(self, decisions: Sequence[Decision] = (),
                               ) -> Tuple[Candidate, List[Optional[Candidate]]]:
        """The unmirrored candidate and the candidates of ``decisions``, measured together
        (:meth:`evaluate_many` of the unmirrored decision followed by ``decisions``).

        The unmirrored graph is never skipped: a bind of it that MXNet refuses raises.
        """
        results = self.evaluate_many([Decision(frozenset(), "unmirrored")] + list(decisions))
        baseline = results[0]
        if baseline is None:  # _measure_all raises first; kept so the type says what callers get
            raise MeasurementError("the unmirrored graph was not measured")
        return baseline, results[1:]

    def prefetch(self, decisions: Sequence[Decision]) -> None:
        """Start measuring ``decisions`` in a background thread and return at once.

        A later :meth:`evaluate_many` of them waits for these results instead of
        measuring again, and records candidates in its own order, so a plan does
        not depend on which measurement finished first.  Used to bind candidates
        while this thread searches (the binds run in worker processes).
        """
        keys: List[FrozenSet[str]] = []
        labels: List[str] = []
        for decision in (self.effective(d) for d in decisions):
            if (decision.mirrored not in self._seen and decision.mirrored not in self._pending
                    and decision.mirrored not in keys):
                keys.append(decision.mirrored)
                labels.append(decision.label)
        if not keys:
            return
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-prefetch")
        future = self._background.submit(self._measure_all, keys, labels)
        for index, key in enumerate(keys):
            self._pending[key] = (future, index)

    def close(self, wait: bool = True) -> None:
        """Stop the background thread, waiting for its measurements unless ``wait`` is False
        (an interrupted plan: a bind under way finishes in its worker, unread)."""
        if self._background is not None:
            self._background.shutdown(wait=wait, cancel_futures=not wait)
            self._background = None
            self._pending.clear()

    def evaluate_many(self, decisions: Sequence[Decision]) -> List[Optional[Candidate]]:
        """Candidates for ``decisions``, in order; new ones are measured together.

        The new decisions go to :meth:`Measurement.many` in one call, which
        may bind them in parallel.  A decision MXNet refuses to bind is skipped
        with a warning and comes back as ``None``; a refused unmirrored graph
        raises.
        """
        graph = self.graph
        effective = [self.effective(d) for d in decisions]
        fresh: Dict[FrozenSet[str], Decision] = {}
        for decision in effective:
            if decision.mirrored not in self._seen and decision.mirrored not in fresh:
                fresh[decision.mirrored] = decision
        if fresh:
            keys = list(fresh)
            now = [k for k in keys if k not in self._pending]
            values = dict(zip(now, self._measure_all(now, [fresh[k].label for k in now]) if now else []))
            for key in keys:
                if key in self._pending:
                    future, index = self._pending.pop(key)
                    values[key] = future.result()[index]
            for key in keys:
                planned_mb = values[key]
                if planned_mb is None:
                    continue
                candidate = Candidate(fresh[key], float(planned_mb),
                                      recompute_overhead(graph, key))
                logger.debug("candidate %s: %.0f MB, overhead %.3f", candidate.decision.label,
                             candidate.planned_mb, candidate.overhead)
                self._seen[key] = candidate
                self.candidates.append(candidate)
        return [self._seen.get(d.mirrored) for d in effective]

    def _measure_all(self, keys: List[FrozenSet[str]], labels: List[str]) -> List[Optional[float]]:
        """Measure ``keys``; a candidate MXNet refuses gets ``None`` (with a warning).

        The unmirrored graph is never refused silently: if it fails, so does planning.
        """
        try:
            return list(self.measurement.many(keys))
        except MeasurementError:
            if len(keys) == 1 and not keys[0]:
                raise
        results: List[Optional[float]] = []
        for key, label in zip(keys, labels):
            try:
                results.append(float(self.measurement(key)))
            except MeasurementError as error:
                if not key:
                    raise
                logger.warning("skipping candidate %s: %s", label, error)
                results.append(None)
        return results

    def outcome(self, budget: Budget, baseline: Candidate) -> PlanOutcome:
        """Choose among everything measured so far."""
        chosen = select_candidate(self.candidates, budget, baseline.planned_mb)
        return PlanOutcome(chosen, baseline.planned_mb, list(self.candidates))


def select_candidate(candidates: Sequence[Candidate], budget: Budget, baseline_mb: float) -> Candidate:
    """Choose a candidate for a budget.

    ``'min'``: the lowest memory wins, ties going to the smaller overhead.
    ``'auto'`` (no budget): the same among the candidates whose estimated
    overhead is at most one extra forward pass (:data:`ONE_FORWARD`).  MXNet
    replays each mirrored node at most once, so every plan of these planners
    meets that bound; it matters for planners that could recompute more.
    ``'overhead'``: the same among the candidates whose estimated overhead is
    within the budget's limit.
    With a limit, the smallest overhead among the candidates that fit wins,
    ties going to the lower memory.

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
        pool = list(candidates)
        if budget.kind == "auto":
            pool = [c for c in candidates if c.overhead <= ONE_FORWARD + 1e-9] or pool
        elif budget.overhead_limit is not None:  # the unmirrored candidate always qualifies
            pool = [c for c in candidates if c.overhead <= budget.overhead_limit + 1e-9] or pool
        return min(pool, key=lambda c: (c.planned_mb, c.overhead, len(c.decision.mirrored)))
    fitting = [c for c in candidates if c.planned_mb <= limit]
    if not fitting:
        raise BudgetUnreachableError(limit, min(c.planned_mb for c in candidates), baseline_mb)
    return min(fitting, key=lambda c: (c.overhead, c.planned_mb, len(c.decision.mirrored)))
