"""Where to cut the graph: the segments of a list of cuts, the cut search, and the plans it gives."""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from ..cost import iteration_cost, node_costs
from ..graph import Graph, NodeKind
from ..planners.dp import DEFAULT_GRAD_FACTOR, CutChain, build_cut_chain
from .crossings import crossings_of
from .plan import HEAD_GRAD_COPIES, SegmentPlan, SegmentSpec, entry_key
from .tensors import graph_tensor

__all__ = ["MAX_SEGMENTS", "segment_plan_for_cuts", "choose_cuts", "cut_positions", "alternative_cuts",
           "full_cut_chain", "plan_segments", "best_segment_plan"]


#: Upper bound on segments tried when choosing k.
MAX_SEGMENTS = 48


def segment_plan_for_cuts(graph: Graph, cuts: Sequence[int], chain: Optional[CutChain] = None,
                          grad_factor: float = DEFAULT_GRAD_FACTOR,
                          mirrored: Iterable[str] = ()) -> SegmentPlan:
    """The segments of ``graph`` cut after the given positions of its as-late-as-possible order.

    Parameters
    ----------
    graph : Graph
        The forward graph (any topological order; it is linearised as late as possible).
    cuts : sequence of int
        Increasing positions in ``graph.as_late_as_possible()``; segment s holds
        the owned operators after cut s-1 up to and including cut s.
    chain : CutChain, optional
        ``build_cut_chain(graph, ...)`` when the caller has it (for working sets).
    grad_factor : float
        Gradient buffers per segment, in units of its largest tensor.
    mirrored : iterable of str
        Operators to mirror inside the segments (two levels).

    Raises
    ------
    ValueError
        If the cuts are not increasing, or a cut would leave a graph output
        outside the last segment.
    """
    late = graph.as_late_as_possible()
    cuts = list(cuts)
    _check_cuts(late, cuts)
    pieces = _Pieces.of(late, cuts)
    if chain is None:
        chain = build_cut_chain(graph, max_frontier=len(late.nodes), max_cuts=len(late.nodes),
                                grad_factor=grad_factor)
    original = {node.name: position for position, node in enumerate(graph.nodes)}
    chosen = frozenset(mirrored)
    bounds = [-1] + cuts + [len(late.nodes) - 1]
    segments = []
    for s in range(pieces.count):
        spec = pieces.spec(s, original, chosen)
        working = _working_bytes(chain, late, bounds[s], bounds[s + 1], grad_factor)
        segments.append(dataclasses.replace(spec, working_bytes=int(working)))
    boundary_shapes: Dict[str, Tuple[int, ...]] = {}
    boundary_bytes = 0
    cost = node_costs(late)
    rerun = 0.0
    for s in range(pieces.count - 1):
        for p, o in sorted(pieces.outputs[s]):
            tensor = graph_tensor(late, p, o)
            boundary_shapes[entry_key((late.nodes[p].name, o))] = tensor.shape
            boundary_bytes += tensor.nbytes
        rerun += sum(cost.get(late.nodes[p].name, 0.0) for p in pieces.members[s])
    total = iteration_cost(late)
    estimate = HEAD_GRAD_COPIES * boundary_bytes + max(s.working_bytes for s in segments)
    return SegmentPlan(tuple(segments), boundary_bytes, int(estimate),
                       rerun / total if total else 0.0, boundary_shapes)


def _check_cuts(late: Graph, cuts: Sequence[int]) -> None:
    """Raise ValueError unless ``cuts`` increase and each may be followed by a boundary."""
    crossings = crossings_of(late)
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cut positions must increase, got {list(cuts)}")
    for cut in cuts:
        if not 0 <= cut < len(late.nodes) or not crossings.valid(cut):
            raise ValueError(f"no segment boundary can follow position {cut}: the graph outputs must "
                             "all be computed by the last segment")


@dataclass
class _Pieces:
    """What each segment of a cut list computes and exchanges, as positions of the linearised
    graph ``late``: the operators it owns or replays, the boundary tensors it reads and
    produces, and the variables it reads."""

    late: Graph
    members: List[Set[int]]
    inputs: List[Set[Tuple[int, int]]]
    outputs: List[Set[Tuple[int, int]]]
    variables: List[Set[str]]

    @property
    def count(self) -> int:
        """Number of segments."""
        return len(self.members)

    @classmethod
    def of(cls, late: Graph, cuts: Sequence[int]) -> "_Pieces":
        """The pieces of ``late`` cut after the (checked) positions ``cuts``."""
        crossings = crossings_of(late)
        owner = [bisect.bisect_left(cuts, p) if crossings.owned[p] else -1 for p in range(len(late.nodes))]
        count = len(cuts) + 1
        pieces = cls(late, [set() for _ in range(count)], [set() for _ in range(count)],
                     [set() for _ in range(count)], [set() for _ in range(count)])
        for position in range(len(late.nodes)):
            if owner[position] >= 0:
                pieces.members[owner[position]].add(position)
        for s in range(count):
            pieces._collect(s, owner)
            if not pieces.members[s]:
                raise ValueError(f"segment {s} would be empty; cut at distinct operator positions")
        return pieces

    def _collect(self, s: int, owner: Sequence[int]) -> None:
        """Walk segment ``s``'s inputs: variables, boundaries (also recorded as their producer's
        outputs), and operators replayed here (NOTE [ executor segments ])."""
        nodes = self.late.nodes
        stack = list(self.members[s])
        while stack:
            position = stack.pop()
            for source, output in nodes[position].inputs:
                producer = nodes[source]
                if producer.kind is not NodeKind.OP:
                    self.variables[s].add(producer.name)
                elif owner[source] == s:
                    continue
                elif owner[source] >= 0:
                    self.inputs[s].add((source, output))
                    self.outputs[owner[source]].add((source, output))
                elif source not in self.members[s]:
                    self.members[s].add(source)
                    stack.append(source)

    def spec(self, s: int, original: Mapping[str, int], mirrored: FrozenSet[str]) -> SegmentSpec:
        """The :class:`SegmentSpec` of segment ``s`` (working set 0); ``original``: each node's
        position in the caller's graph (the order of its operators and variables)."""
        nodes = self.late.nodes
        if s == self.count - 1:
            out_entries = [(nodes[p].name, o) for p, o in self.late.heads]
        else:
            out_entries = [(nodes[p].name, o) for p, o in sorted(self.outputs[s])]
        names = [nodes[p].name for p in sorted(self.members[s], key=lambda p: original[nodes[p].name])]
        out_names = {n for n, _ in out_entries}
        return SegmentSpec(
            index=s, nodes=tuple(names),
            inputs=tuple((nodes[p].name, o) for p, o in sorted(self.inputs[s])),
            outputs=tuple(out_entries),
            variables=tuple(sorted(self.variables[s], key=lambda n: original[n])),
            mirrored=frozenset(n for n in names if n in mirrored and n not in out_names))


def _working_bytes(chain: CutChain, late: Graph, start: int, end: int, grad_factor: float) -> float:
    """Modelled working set of the owned operators in positions (start, end]: what backward
    reads among their outputs plus gradient buffers (NOTE [ the cut-set chain ] in dp.py)."""
    need = chain.need_prefix[end + 1] - chain.need_prefix[start + 1]
    largest = max(chain.op_bytes[start + 1:end + 1], default=0)
    return need + grad_factor * largest


def choose_cuts(graph: Graph, count: int, chain: Optional[CutChain] = None,
                grad_factor: float = DEFAULT_GRAD_FACTOR) -> List[int]:
    """Positions (in the as-late-as-possible order) of ``count - 1`` cuts that split the
    working set evenly, each the cut with the fewest crossing bytes near its target.

    Fewer cuts are returned when the graph has fewer candidate positions.
    """
    if count <= 1:
        return []
    late = graph.as_late_as_possible()
    if chain is None:
        chain = build_cut_chain(graph, max_frontier=len(late.nodes), max_cuts=len(late.nodes),
                                grad_factor=grad_factor)
    crossings = crossings_of(late)
    candidates = crossings.candidates(chain)
    if not candidates:
        return []
    owned_before = crossings.owned_before
    total = chain.need_prefix[-1]
    weight = [chain.need_prefix[p + 1] for p in candidates]
    width = total / (2 * count)
    cuts: List[int] = []
    for m in range(1, count):
        target = total * m / count
        low = bisect.bisect_left(weight, target - width)
        high = bisect.bisect_right(weight, target + width)
        # Every segment must own an operator.
        floor = owned_before[cuts[-1] + 1] if cuts else 0
        window = [i for i in range(low, high) if owned_before[candidates[i] + 1] > floor]
        if not window:
            continue
        best = min(window, key=lambda i: (crossings.crossing[candidates[i]], abs(weight[i] - target)))
        cuts.append(candidates[best])
    return cuts


def cut_positions(graph: Graph, plan: SegmentPlan) -> List[int]:
    """The cuts of ``plan`` as positions of ``graph.as_late_as_possible()`` (the last owned
    operator of each segment but the last; the inverse of :func:`segment_plan_for_cuts`)."""
    late = graph.as_late_as_possible()
    crossings = crossings_of(late)
    position = {node.name: p for p, node in enumerate(late.nodes)}
    cuts = []
    for segment in plan.segments[:-1]:
        owned = [position[n] for n in segment.nodes if n in position and crossings.owned[position[n]]]
        if not owned:
            raise ValueError(f"segment {segment.index} owns no operator of this graph")
        cuts.append(max(owned))
    return cuts


def alternative_cuts(graph: Graph, cuts: Sequence[int], limit: int,
                     chain: Optional[CutChain] = None) -> List[List[int]]:
    """Other cut lists, each moving one of ``cuts`` to a nearby position crossed by no more
    bytes: the ``limit`` nearest such positions per cut (by distance in the as-late-as-possible
    order, earlier first on ties), keeping every segment owning an operator.

    :func:`choose_cuts` balances the modelled working sets; what the shared pool of the
    bound executors holds also depends on how the segments' storage blocks dovetail (NOTE
    [ the shared pool's union ]), which only measuring tells, so the planner measures these
    neighbours too under ``'min'`` (resnet152_v1b, batch 32: the balanced cut after
    layers3_bottleneckv1b1 gives 1143 MB, the same-size cut one block later 1054 MB).
    """
    late = graph.as_late_as_possible()
    if chain is None:
        chain = full_cut_chain(graph)
    crossings = crossings_of(late)
    candidates = crossings.candidates(chain)
    owned_before = crossings.owned_before
    found: List[List[int]] = []
    for i, cut in enumerate(cuts):
        low = cuts[i - 1] if i > 0 else -1
        high = cuts[i + 1] if i + 1 < len(cuts) else len(late.nodes) - 1
        near = [p for p in candidates if low < p < high and p != cut
                and crossings.crossing[p] <= crossings.crossing[cut]
                and owned_before[p + 1] > owned_before[low + 1]
                and owned_before[high + 1] > owned_before[p + 1]]
        near.sort(key=lambda p: (abs(p - cut), p))
        for p in near[:max(0, limit)]:
            found.append(list(cuts[:i]) + [p] + list(cuts[i + 1:]))
    return found


def full_cut_chain(graph: Graph, grad_factor: float = DEFAULT_GRAD_FACTOR) -> CutChain:
    """The cut chain segment planning reads (every cut, any frontier): build it once and pass
    it to the functions below when planning several splits of one graph."""
    return build_cut_chain(graph, max_frontier=len(graph.nodes), max_cuts=len(graph.nodes),
                           grad_factor=grad_factor)


def plan_segments(graph: Graph, count: int, grad_factor: float = DEFAULT_GRAD_FACTOR,
                  mirrored: Iterable[str] = (), chain: Optional[CutChain] = None) -> SegmentPlan:
    """A plan with (at most) ``count`` segments (fewer when the graph has fewer cuts);
    ``chain``: :func:`full_cut_chain` of ``graph`` at ``grad_factor`` (built when None)."""
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    cuts = choose_cuts(graph, count, chain, grad_factor)
    return segment_plan_for_cuts(graph, cuts, chain, grad_factor, mirrored)


def best_segment_plan(graph: Graph, max_count: int = MAX_SEGMENTS, tolerance: float = 0.05,
                      grad_factor: float = DEFAULT_GRAD_FACTOR,
                      chain: Optional[CutChain] = None) -> SegmentPlan:
    """The plan with the least estimated memory over 1..``max_count`` segments.

    Among plans within ``tolerance`` of the least estimate the one with the
    fewest segments is returned (each segment costs executor calls and a
    boundary copy per iteration).  ``chain`` as in :func:`plan_segments`.
    """
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    plans: List[SegmentPlan] = []
    seen = set()
    for count in range(1, max_count + 1):
        cuts = tuple(choose_cuts(graph, count, chain, grad_factor))
        if cuts in seen:
            continue
        seen.add(cuts)
        plans.append(segment_plan_for_cuts(graph, cuts, chain, grad_factor))
    least = min(p.estimated_bytes for p in plans)
    return min((p for p in plans if p.estimated_bytes <= least * (1 + tolerance)),
               key=lambda p: (p.count, p.estimated_bytes))

