"""Dynamic programs over the sequence of cut sets: least memory, or least recomputation under a limit.

# NOTE [ the cut-set chain ]
# Walk the forward graph in topological order.  A cut is a position together
# with its frontier: the tensors produced at or before it that are read after
# it (one tensor at a cut point, several across residual blocks, h and c of
# every layer in an unrolled RNN).  A plan is an increasing sequence of cuts
# splitting the graph into segments, and for each segment a mode:
#
#   recompute  every operator in it is mirrored except the frontier at its
#              end (which the next segments are recomputed from) and the
#              operators MXNet never recomputes;
#   keep       nothing in it is mirrored.
#
# Backward visits segments last to first.  While it works on segment s, the
# tensors kept by the segments before s are alive (they are read later), and so
# is s's working set: for a recomputed segment the replayed outputs that
# backward reads, for a kept one those outputs were kept anyway; plus gradient
# buffers, modelled as ``grad_factor`` times the largest tensor in s.  So with
# K(s) the bytes kept before s,
#
#     peak = max over s of  K(s) + need(s) + grad_factor * largest(s)
#
# and the recomputation is the forward cost of the mirrored operators.  Both are
# functions of the plan only through per-segment terms and the running sum K,
# which gives two exact programs:
#
#   least memory   For a limit M, the least K reachable at each cut is all that
#                  matters (a smaller K never hurts later segments), so one
#                  forward pass over the cuts decides whether M is reachable;
#                  a binary search on M finds the least one.
#   least compute  For a limit M, keep at each cut the Pareto set of (K, cost)
#                  labels and relax them forward; the cheapest label at the end
#                  is optimal.  On big graphs the sets are thinned to
#                  ``max_labels`` evenly spread ones (then near-optimal).
#
# This generalises Chen's one-level checkpointing (every segment recomputed,
# equal segments) to unequal segments, multi-tensor cuts and kept stretches;
# it is MXNet's recomputation model (each mirrored node is replayed once, a
# segment at a time), not Rotor's multi-level one.  MXNet's allocator decides
# the real figure, so the planners measure these plans rather than trust the
# model (tests/core/test_dp.py checks the programs against brute force).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from ..cost import node_costs, recompute_overhead
from ..graph import Graph, NodeKind
from ..liveness import gradient_reads_inputs, read_by_backward
from .registry import register_planner
from .base import Decision, Planner
from .frontier import frontiers

__all__ = ["Segment", "CutChain", "build_cut_chain", "evaluate_schedule", "min_peak_schedule",
           "min_cost_schedule", "schedule_decision", "least_memory_decisions",
           "least_compute_decisions", "least_memory_within_overhead", "prefix_within_overhead",
           "WITHIN_OVERHEAD_STEPS", "DPPlanner"]

#: Gradient buffers alive while one segment is processed, in units of its largest tensor.
DEFAULT_GRAD_FACTOR = 2.0


@dataclass(frozen=True)
class Segment:
    """One segment of a plan: it ends at cut ``end`` (an index into the chain) and is
    recomputed or kept."""

    end: int
    recompute: bool


@dataclass
class CutChain:
    """The data the programs read: candidate cuts and per-position prefix sums.

    Index 0 of :attr:`positions` is a virtual cut before the first node and the
    last index a virtual cut after the last one; both have empty frontiers.
    """

    graph: Graph
    positions: List[int]
    frontier: List[Tuple[int, ...]]
    grad_factor: float
    op_bytes: List[int]
    read: List[bool]
    mirrorable: List[bool]
    reads_inputs: List[bool]
    cost: List[float]
    need_prefix: List[int]
    pinned_prefix: List[int]
    cost_prefix: List[float]
    # Per cut, the frontier terms when the segment starts before every node they
    # involve (the common case; see _precompute).
    settled: List[int] = field(default_factory=list)
    crossing_full: List[int] = field(default_factory=list)
    unread_full: List[int] = field(default_factory=list)
    frontier_cost_full: List[float] = field(default_factory=list)
    # Per cut j: the largest output between cut j-1 and cut j, and the prefix sums at j.
    step_largest: List[int] = field(default_factory=list)
    need_at: List[int] = field(default_factory=list)
    pinned_at: List[int] = field(default_factory=list)
    cost_at: List[float] = field(default_factory=list)
    # Per cut j, for segments starting after some of its frontier (the slow path):
    # (node, crossing bytes, unread bytes, cost or None) per frontier node in order, and
    # (source, last frontier node holding it, bytes) per distinct held input.
    frontier_terms: List[List[Tuple[int, int, int, Optional[float]]]] = field(default_factory=list)
    held_terms: List[List[Tuple[int, int, int]]] = field(default_factory=list)

    def _precompute(self) -> None:
        """Fill the fast-path fields: a segment starting before ``settled[j]`` sees all of cut j's
        frontier nodes and their held inputs inside it."""
        nodes = self.graph.nodes
        previous = -1
        for position in self.positions:
            self.step_largest.append(max(self.op_bytes[previous + 1:position + 1], default=0))
            self.need_at.append(self.need_prefix[position + 1])
            self.pinned_at.append(self.pinned_prefix[position + 1])
            self.cost_at.append(self.cost_prefix[position + 1])
            previous = position
        for j, frontier in enumerate(self.frontier):
            self.frontier_terms.append([
                (x, 0 if self.read[x] and not self.mirrorable[x] else self.op_bytes[x],
                 0 if self.read[x] else self.op_bytes[x], self.cost[x] if self.mirrorable[x] else None)
                for x in frontier])
            holders: Dict[int, int] = {}
            for x in frontier:
                if self.reads_inputs[x]:
                    for source, _ in nodes[x].inputs:
                        if self.mirrorable[source] and source not in frontier:
                            holders[source] = max(holders.get(source, x), x)
            self.held_terms.append([(source, last, self.op_bytes[source])
                                    for source, last in sorted(holders.items())])
            held = self._held_inputs(j, -1)
            self.settled.append(min(list(frontier) + list(held), default=len(nodes)))
            crossing, unread, frontier_cost = self._frontier_terms(j, -1)
            self.crossing_full.append(crossing)
            self.unread_full.append(unread)
            self.frontier_cost_full.append(frontier_cost)

    def _held_inputs(self, j: int, start: int) -> set:
        """Inputs produced after ``start`` that cut j's kept frontier holds alive: a kept
        node whose gradient reads its inputs keeps their forward outputs too (NOTE [ what
        backward keeps ] in liveness.py)."""
        frontier = self.frontier[j]
        return {source for x in frontier if x > start and self.reads_inputs[x]
                for source, _ in self.graph.nodes[x].inputs
                if source > start and self.mirrorable[source] and source not in frontier}

    def _frontier_terms(self, j: int, start: int) -> Tuple[int, int, float]:
        """For a segment from position ``start`` to cut j: bytes its frontier adds when the
        segment is recomputed (held inputs included), its frontier bytes backward does not
        read, and the forward cost of its mirrorable frontier nodes."""
        # The terms precomputed per cut (_precompute), summed in the frontier's order so that
        # the float cost is the same sum as walking the nodes.
        crossing = unread = 0
        cost: float = 0
        for x, crossing_bytes, unread_bytes, node_cost in self.frontier_terms[j]:
            if x > start:
                crossing += crossing_bytes
                unread += unread_bytes
                if node_cost is not None:
                    cost += node_cost
        for source, last, nbytes in self.held_terms[j]:
            if source > start and last > start:
                crossing += nbytes
        return crossing, unread, cost

    @property
    def end(self) -> int:
        """Index of the virtual final cut."""
        return len(self.positions) - 1

    # -------------------------------------------------------- segment terms
    def need(self, i: int, j: int) -> int:
        """Bytes read by backward among the outputs of segment (i, j]."""
        return self.need_prefix[self.positions[j] + 1] - self.need_prefix[self.positions[i] + 1]

    def largest(self, i: int, j: int) -> int:
        """Largest output in segment (i, j]."""
        low, high = self.positions[i] + 1, self.positions[j] + 1
        return max(self.op_bytes[low:high], default=0)

    def kept_after(self, i: int, j: int, recompute: bool) -> int:
        """Bytes that segment (i, j] adds to the kept set."""
        start = self.positions[i]
        if start < self.settled[j]:
            crossing, unread = self.crossing_full[j], self.unread_full[j]
        else:
            crossing, unread, _ = self._frontier_terms(j, start)
        if recompute:
            return self.pinned_prefix[self.positions[j] + 1] - self.pinned_prefix[start + 1] + crossing
        return self.need(i, j) + unread

    def row(self, i: int, floor_limit: float):
        """Segments starting at cut ``i``, shortest first, while ``need + grad * largest``
        stays within ``floor_limit``: tuples ``(j, need, work, kept if recomputed, kept if
        kept, recomputation cost)``.  The same terms as :meth:`need`, :meth:`largest`,
        :meth:`kept_after` and :meth:`recompute_cost`, without their per-call overhead."""
        start = self.positions[i]
        need0, pinned0, cost0 = self.need_at[i], self.pinned_at[i], self.cost_at[i]
        grad_factor = self.grad_factor
        largest = 0
        for j in range(i + 1, len(self.positions)):
            step = self.step_largest[j]
            if step > largest:
                largest = step
            need = self.need_at[j] - need0
            work = grad_factor * largest
            if need + work > floor_limit:
                return  # need and largest only grow with j
            if start < self.settled[j]:
                yield (j, need, work, self.pinned_at[j] - pinned0 + self.crossing_full[j],
                       need + self.unread_full[j], self.cost_at[j] - cost0 - self.frontier_cost_full[j])
            else:
                crossing, unread, frontier_cost = self._frontier_terms(j, start)
                yield (j, need, work, self.pinned_at[j] - pinned0 + crossing, need + unread,
                       self.cost_at[j] - cost0 - frontier_cost)

    def recompute_cost(self, i: int, j: int) -> float:
        """Forward cost of the operators segment (i, j] mirrors when recomputed."""
        start = self.positions[i]
        total = self.cost_prefix[self.positions[j] + 1] - self.cost_prefix[start + 1]
        if start < self.settled[j]:
            return total - self.frontier_cost_full[j]
        return total - self._frontier_terms(j, start)[2]


def build_cut_chain(graph: Graph, max_frontier: int = 2, max_cuts: int = 400,
                    grad_factor: float = DEFAULT_GRAD_FACTOR, late: bool = True) -> CutChain:
    """The cut-set chain of ``graph``.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    max_frontier : int
        Largest number of tensors crossing a candidate cut.
    max_cuts : int
        Cap on candidate cuts; past it the cuts with the fewest crossing bytes
        are taken, evenly spread over the graph, so planning time stays bounded.
    grad_factor : float
        Gradient buffers per segment, in units of its largest tensor.
    late : bool
        Cut along the as-late-as-possible order (NOTE [ linearising for cuts ]
        in graph.py) rather than the order the graph came in.

    Returns
    -------
    CutChain
    """
    if late:
        graph = graph.as_late_as_possible()
    found = frontiers(graph, max_frontier)
    if len(found) > max_cuts:
        # Keep evenly spread cuts, preferring the cheaper of each neighbourhood.
        stride = len(found) / max_cuts
        picked = []
        for k in range(max_cuts):
            window = found[int(k * stride):max(int((k + 1) * stride), int(k * stride) + 1)]
            picked.append(min(window, key=lambda f: (f.crossing_bytes, f.position)))
        found = picked
    size = len(graph.nodes)
    read = read_by_backward(graph)
    op_bytes = [n.planned_bytes if n.kind is NodeKind.OP else 0 for n in graph.nodes]
    mirrorable = [n.can_mirror for n in graph.nodes]
    costs = node_costs(graph)
    cost = [costs.get(n.name, 0.0) if n.can_mirror else 0.0 for n in graph.nodes]
    need_prefix, pinned_prefix, cost_prefix = [0] * (size + 1), [0] * (size + 1), [0.0] * (size + 1)
    for position in range(size):
        need = op_bytes[position] if read[position] else 0
        need_prefix[position + 1] = need_prefix[position] + need
        pinned_prefix[position + 1] = pinned_prefix[position] + (0 if mirrorable[position] else need)
        cost_prefix[position + 1] = cost_prefix[position] + cost[position]
    chain = CutChain(
        graph=graph, positions=[-1] + [f.position for f in found] + [size - 1],
        frontier=[()] + [tuple(sorted(f.nodes)) for f in found] + [()],
        grad_factor=grad_factor, op_bytes=op_bytes, read=read, mirrorable=mirrorable,
        reads_inputs=[n.kind is NodeKind.OP and gradient_reads_inputs(n.op) for n in graph.nodes],
        cost=cost,
        need_prefix=need_prefix, pinned_prefix=pinned_prefix, cost_prefix=cost_prefix)
    chain._precompute()
    return chain


def evaluate_schedule(chain: CutChain, schedule: Sequence[Segment]) -> Tuple[float, float]:
    """Modelled ``(peak bytes, recomputation cost)`` of a schedule (NOTE [ the cut-set chain ]).

    Raises
    ------
    ValueError
        If the segments do not run through increasing cuts to the end.
    """
    kept = 0.0
    peak = 0.0
    cost = 0.0
    start = 0
    for segment in schedule:
        if segment.end <= start:
            raise ValueError("segments must end at increasing cuts")
        added = chain.kept_after(start, segment.end, segment.recompute)
        work = chain.grad_factor * chain.largest(start, segment.end)
        if segment.recompute:
            peak = max(peak, kept + chain.need(start, segment.end) + work)
            cost += chain.recompute_cost(start, segment.end)
        else:
            peak = max(peak, kept + added + work)
        kept += added
        start = segment.end
    if start != chain.end:
        raise ValueError("the last segment must end at the final cut")
    return peak, cost


def _reachable(chain: CutChain, limit: float) -> Optional[List[Segment]]:
    """A schedule with modelled peak <= ``limit`` and the least kept bytes, or ``None``."""
    count = len(chain.positions)
    best_kept = [math.inf] * count
    parent: List[Optional[Tuple[int, bool]]] = [None] * count
    best_kept[0] = 0.0
    for i in range(count - 1):
        kept = best_kept[i]
        if kept == math.inf:
            continue
        for j, need, work, added_recompute, added_keep, _ in chain.row(i, limit - kept):
            if kept + added_recompute < best_kept[j]:  # peak: kept + need + work, within limit
                best_kept[j] = kept + added_recompute
                parent[j] = (i, True)
            if kept + added_keep + work <= limit and kept + added_keep < best_kept[j]:
                best_kept[j] = kept + added_keep
                parent[j] = (i, False)
    if best_kept[count - 1] == math.inf:
        return None
    schedule: List[Segment] = []
    j = count - 1
    while j:
        previous = parent[j]
        assert previous is not None
        schedule.append(Segment(j, previous[1]))
        j = previous[0]
    return schedule[::-1]


def min_peak_schedule(chain: CutChain, resolution: Optional[float] = None
                      ) -> Tuple[float, List[Segment]]:
    """The schedule with the least modelled peak, to within ``resolution`` bytes.

    The default resolution is 1 MB or 0.1% of the unmirrored peak, whichever is
    larger (the model is not closer than that to MXNet's figure anyway).

    Returns
    -------
    (float, list of Segment)
        The least reachable limit found and a schedule within it.
    """
    everything = [Segment(chain.end, False)]
    high = evaluate_schedule(chain, everything)[0]
    best = everything
    low = 0.0
    if resolution is None:
        resolution = max(float(1 << 20), high / 1000)
    while high - low > resolution:
        middle = (low + high) / 2
        found = _reachable(chain, middle)
        if found is None:
            low = middle
        else:
            high, best = middle, found
    return evaluate_schedule(chain, best)[0], best


def min_cost_schedule(chain: CutChain, limit: float,
                      max_labels: Optional[int] = 32) -> Optional[List[Segment]]:
    """The schedule with the least recomputation whose modelled peak is within ``limit``.

    Parameters
    ----------
    chain : CutChain
        From :func:`build_cut_chain`.
    limit : float
        Peak bytes allowed.
    max_labels : int or None
        Pareto labels kept per cut; ``None`` keeps all (exact, possibly slow).

    Returns
    -------
    list of Segment, or None when no schedule fits.
    """
    count = len(chain.positions)
    # A label: (kept bytes, cost, parent label, segment ending here).
    labels: List[List[tuple]] = [[] for _ in range(count)]
    labels[0] = [(0.0, 0.0, None, None)]
    for i in range(count - 1):
        current = _pareto(labels[i], max_labels)
        labels[i] = current
        if not current:
            continue
        least_kept = current[0][0]
        for j, need, work, added_recompute, added_keep, extra in chain.row(i, limit - least_kept):
            target = labels[j]
            recompute_segment, keep_segment = Segment(j, True), Segment(j, False)
            for label in current:
                kept = label[0]
                if kept + need + work > limit:
                    break  # labels are sorted by kept bytes
                target.append((kept + added_recompute, label[1] + extra, label, recompute_segment))
            for label in current:
                kept = label[0]
                if kept + added_keep + work > limit:
                    break
                target.append((kept + added_keep, label[1], label, keep_segment))
    final = labels[count - 1]
    if not final:
        return None
    label = min(final, key=lambda item: (item[1], item[0]))
    schedule: List[Segment] = []
    while label[3] is not None:
        schedule.append(label[3])
        label = label[2]
    return schedule[::-1]


def _pareto(labels: List[tuple], max_labels: Optional[int]) -> List[tuple]:
    """Labels not beaten on both kept bytes and cost, by increasing kept bytes."""
    front: List[tuple] = []
    for label in sorted(labels, key=lambda item: (item[0], item[1])):
        if not front or label[1] < front[-1][1]:
            front.append(label)
    if max_labels is not None and len(front) > max_labels:
        step = (len(front) - 1) / (max_labels - 1)
        front = [front[round(k * step)] for k in range(max_labels)]
    return front


def schedule_decision(chain: CutChain, schedule: Sequence[Segment]) -> FrozenSet[str]:
    """Names of the operators a schedule recomputes."""
    nodes = chain.graph.nodes
    mirrored = []
    start = 0
    for segment in schedule:
        if segment.recompute:
            crossing = set(chain.frontier[segment.end])
            for position in range(chain.positions[start] + 1, chain.positions[segment.end] + 1):
                if chain.mirrorable[position] and position not in crossing:
                    mirrored.append(nodes[position].name)
        start = segment.end
    return frozenset(mirrored)


#: (max_frontier, grad_factor) variants of the least-memory program.  The model
#: misses parts of MXNet's allocator (block reuse, in-place sharing), so several
#: nearby optima are measured; on ResNet-50, Inception-v3 and DenseNet-121 the
#: best of these beats the seed's search with cut-point stages (bench/RESULTS.md).
LEAST_MEMORY_VARIANTS = ((1, 0.5), (1, 1.0), (2, 0.0), (2, 0.5))
#: Variants for graphs whose cuts need several tensors (an unrolled 2-layer LSTM
#: needs h and c of both layers and the input sequence: 5).
WIDE_FRONTIER_VARIANTS = ((8, 0.5), (8, 2.0))


def least_memory_decisions(graph: Graph, variants: Sequence[Tuple[int, float]] = LEAST_MEMORY_VARIANTS,
                           max_cuts: int = 400) -> List[Decision]:
    """Decisions of :func:`min_peak_schedule` for each ``(max_frontier, grad_factor)`` variant,
    without duplicates."""
    decisions: List[Decision] = []
    seen = set()
    chains: Dict[int, CutChain] = {}  # the cuts do not depend on grad_factor: found once
    for max_frontier, grad_factor in variants:
        if max_frontier not in chains:
            chains[max_frontier] = build_cut_chain(graph, max_frontier, max_cuts, grad_factor)
        chain = dataclasses.replace(chains[max_frontier], grad_factor=grad_factor)
        least, schedule = min_peak_schedule(chain)
        decision = schedule_decision(chain, schedule)
        if decision and decision not in seen:
            seen.add(decision)
            decisions.append(Decision(decision, f"dp least memory (frontier<={max_frontier}, "
                                                f"grad x{grad_factor:g}: {least / 2**20:.0f} MB model)"))
    return decisions


def least_compute_decisions(graph: Graph, fractions: Sequence[float], max_frontier: int = 2,
                            max_cuts: int = 150, max_labels: int = 8) -> List[Decision]:
    """Least-recomputation decisions within ``fractions`` of the modelled unmirrored peak.

    These trace the memory/compute Pareto curve between the least-memory plan
    and no mirroring; the chain is coarser than for the least-memory program so
    that a sweep stays within a second on a 1000-layer network.  Both the given
    order and the as-late-as-possible one are swept: which cuts exist depends on
    the order (a ResNet's shortcut projection run early or late), and on
    ResNet-50 the given order's plans recompute half as much at 0.6 x baseline.
    """
    decisions: List[Decision] = []
    seen = set()
    for late in (False, True):
        chain = build_cut_chain(graph, max_frontier, max_cuts, late=late)
        baseline = evaluate_schedule(chain, [Segment(chain.end, False)])[0]
        for fraction in fractions:
            found = min_cost_schedule(chain, baseline * fraction, max_labels)
            if found is None:
                continue
            decision = schedule_decision(chain, found)
            if decision and decision not in seen:
                seen.add(decision)
                order = "late order" if late else "given order"
                decisions.append(Decision(decision, f"dp least compute within {fraction:.2f} x model, "
                                                    f"{order}"))
    return decisions


#: Bisection steps of :func:`least_memory_within_overhead` over the modelled memory fraction.
WITHIN_OVERHEAD_STEPS = 6


def least_memory_within_overhead(graph: Graph, max_overhead: float, steps: int = WITHIN_OVERHEAD_STEPS,
                                 max_frontier: int = 2, max_cuts: int = 150,
                                 max_labels: int = 8) -> List[Decision]:
    """Least-compute decisions at the least modelled memory whose estimated overhead is within
    ``max_overhead`` (a fraction of one iteration), one per order (NOTE [ the one-level plan
    within an overhead limit ] in planning/one_level.py).

    The least recomputation within a memory limit grows as the limit falls, so the limit (a
    fraction of the modelled unmirrored peak) is bisected ``steps`` times per order: work
    bounded by a count of program runs, never by the clock.  Both orders are searched, as in
    :func:`least_compute_decisions`.
    """
    decisions: List[Decision] = []
    for late in (False, True):
        chain = build_cut_chain(graph, max_frontier, max_cuts, late=late)
        baseline = evaluate_schedule(chain, [Segment(chain.end, False)])[0]
        low, high, best = 0.0, 1.0, None
        for _ in range(steps):
            fraction = (low + high) / 2
            found = min_cost_schedule(chain, baseline * fraction, max_labels)
            decision = schedule_decision(chain, found) if found is not None else None
            if decision is not None and recompute_overhead(graph, decision) <= max_overhead + 1e-9:
                high, best = fraction, (fraction, decision)
            else:
                low = fraction
        if best is not None and best[1] and all(best[1] != d.mirrored for d in decisions):
            order = "late order" if late else "given order"
            decisions.append(Decision(best[1], f"dp least memory within +{100 * max_overhead:g}% "
                                               f"({best[0]:.2f} x model, {order})"))
    return decisions


def prefix_within_overhead(graph: Graph, max_overhead: float) -> List[Decision]:
    """Every mirrorable node of the longest prefix of the forward order whose estimated overhead is
    within ``max_overhead`` (none when nothing fits).

    A start for the allocator search under an overhead limit: a convnet's first layers hold the
    largest activations for the fewest operations per byte (resnet50_v1b, batch 32, within +6%:
    the search from this start reached 2012 MB, from the program's 2098 MB).
    """
    movable = [node.name for node in graph.op_nodes if node.can_mirror]
    low, high = 0, len(movable)  # the overhead only grows with the prefix: bisect its length
    while low < high:
        middle = (low + high + 1) // 2
        if recompute_overhead(graph, movable[:middle]) <= max_overhead + 1e-9:
            low = middle
        else:
            high = middle - 1
    if not low:
        return []
    return [Decision(frozenset(movable[:low]), f"longest prefix within +{100 * max_overhead:g}% "
                                               f"({low} nodes)")]


@register_planner("dp")
class DPPlanner(Planner):
    """Least-memory and least-compute dynamic programs over cut sets (NOTE [ the cut-set chain ])."""

    name = "dp"

    def __init__(self, max_frontier: int = 2,
                 fractions: Sequence[float] = (0.3, 0.45, 0.6, 0.75, 0.9)) -> None:
        self.max_frontier = max_frontier
        self.fractions = tuple(fractions)

    def propose(self, graph: Graph) -> List[Decision]:
        return (least_memory_decisions(graph)
                + least_compute_decisions(graph, self.fractions, self.max_frontier))
