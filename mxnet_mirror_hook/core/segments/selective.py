"""Selective segment plans: each segment of the chain keeps its activations or re-runs, chosen by a
dynamic program over the chain (least recomputation under a memory limit, least memory under an
overhead limit).

# NOTE [ selective segments ]
# Plain segments (NOTE [ executor segments ]) re-run every segment but the
# last, about one extra forward.  Users pay that on every iteration; what they
# want most is "the memory that costs me a few percent".  Megatron-LM's
# selective recomputation keeps everything but the core attention (the s^2
# tensors: query-key product, softmax, attention dropout, product with the
# values), which is cheap to recompute for the memory it frees.  Here a segment
# is either
#
# - *kept*: bound with a memory pool of its own, its forward run once in the
#   training forward and its backward run without a re-run (its pool holds its
#   activations from forward to backward: MXNet's executor pool is static, so
#   the whole plan of the executor is counted for the iteration), or
# - *dropped*: in the pool the dropped segments and the last segment share,
#   re-run before its backward as before (the random-state replay of the chain
#   redraws a re-run dropout's mask).
#
# The memory of a mixed chain is then
#
#     HEAD_GRAD_COPIES * boundaries + sum(kept working sets)
#         + max(working sets of the dropped segments and the last one)
#
# and its extra time the forward cost of the dropped segments (the last is
# never re-run).  The program (:func:`solve_selective`) runs over the chain's
# candidate cut points as the one-level least-compute program (planners/dp.py)
# runs over single nodes: for each threshold T on the shared pool (the distinct
# working sets of the intervals, or THRESHOLD_LIMIT quantiles of them on long
# chains), a left-to-right program whose state at each point is the Pareto
# front of (memory of the boundaries and kept segments so far, recomputation so
# far); a dropped or last segment must fit under T.  With every threshold tried
# the result is exact for the model (tests/core/test_selective.py checks it
# against enumerating every cut set and labelling); with quantiles the figure
# of the chosen plan is evaluated exactly afterwards.  Adjacent kept segments
# are never worth a cut (the merge keeps the same activations without the
# boundary), so the program finds for a transformer the cuts that isolate the
# core attention between the query/key/value projection and the attention's
# output, where the crossing bytes are small and the recomputed forward is only
# the s^2 part.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..cost import iteration_cost, node_costs
from ..graph import Graph
from ..planners.dp import DEFAULT_GRAD_FACTOR, CutChain
from .crossings import crossings_of
from .cuts import full_cut_chain, segment_plan_for_cuts
from .plan import HEAD_GRAD_COPIES, SegmentPlan

__all__ = ["SelectiveChain", "SelectiveChoice", "selective_chain", "chain_figures", "solve_selective",
           "selective_plan", "mixed_estimate", "MAX_POINTS", "THRESHOLD_LIMIT", "FRONT_LIMIT"]

#: Interior cut points the program considers at most (the cheapest crossings are kept).
MAX_POINTS = 64
#: Shared-pool thresholds tried at most (all distinct working sets below it: exact).
THRESHOLD_LIMIT = 16
#: Labels kept per point at most (evenly thinned beyond it; never reached on small chains).
FRONT_LIMIT = 64


@dataclass(frozen=True)
class SelectiveChain:
    """What the program reads: points ``0..m`` (0 before the first operator, ``m`` after the last).

    Attributes
    ----------
    positions : tuple of int
        Position of each point in the as-late-as-possible order (-1 for point 0).
    boundary : tuple of int
        Bytes a cut at each point adds (``HEAD_GRAD_COPIES`` times the crossing tensors; 0 at
        the ends).
    working : tuple of tuple of int
        ``working[i][j]``: modelled working set of the segment from point i to point j (i < j).
    cost : tuple of tuple of float
        ``cost[i][j]``: its forward cost as a fraction of one plain iteration.
    """

    positions: Tuple[int, ...]
    boundary: Tuple[int, ...]
    working: Tuple[Tuple[int, ...], ...]
    cost: Tuple[Tuple[float, ...], ...]

    @property
    def last(self) -> int:
        """Index of the end point ``m``."""
        return len(self.positions) - 1


@dataclass(frozen=True)
class SelectiveChoice:
    """A labelled cut set: interior points cut at, the segments kept, the model's bytes and
    recomputation (a fraction of one iteration)."""

    cuts: Tuple[int, ...]
    kept: Tuple[int, ...]
    memory: int
    cost: float


def chain_figures(chain: SelectiveChain, cuts: Sequence[int], kept: Sequence[int]) -> Tuple[int, float]:
    """Bytes and recomputation of cutting ``chain`` at the interior points ``cuts`` with the
    segments ``kept`` keeping their activations (NOTE [ selective segments ])."""
    points = [0] + list(cuts) + [chain.last]
    kept_set = set(kept)
    memory = sum(chain.boundary[p] for p in cuts)
    shared = 0
    cost = 0.0
    for s, (i, j) in enumerate(zip(points, points[1:])):
        if s in kept_set:
            memory += chain.working[i][j]
        else:
            shared = max(shared, chain.working[i][j])
            if j != chain.last:
                cost += chain.cost[i][j]
    return memory + shared, cost


def _thresholds(chain: SelectiveChain) -> List[int]:
    """Shared-pool thresholds: every distinct interval working set, or quantiles of them."""
    values = sorted({chain.working[i][j] for j in range(1, chain.last + 1) for i in range(j)})
    if len(values) <= THRESHOLD_LIMIT:
        return values
    picked = {values[round(k * (len(values) - 1) / (THRESHOLD_LIMIT - 1))] for k in range(THRESHOLD_LIMIT)}
    return sorted(picked)


def _pareto(labels: List[tuple]) -> List[tuple]:
    """Labels (memory, cost, back) not dominated by another, thinned to FRONT_LIMIT."""
    labels.sort(key=lambda label: (label[0], label[1]))
    front: List[tuple] = []
    for label in labels:
        if not front or label[1] < front[-1][1]:
            front.append(label)
    if len(front) > FRONT_LIMIT:
        step = len(front) / FRONT_LIMIT
        front = [front[int(k * step)] for k in range(FRONT_LIMIT - 1)] + [front[-1]]
    return front


def _fronts(chain: SelectiveChain, threshold: int, max_bytes: Optional[float],
            max_cost: Optional[float]) -> List[tuple]:
    """The Pareto front at the end point with the shared pool at most ``threshold``."""
    last = chain.last
    room = None if max_bytes is None else max_bytes - threshold
    if room is not None and room < 0:
        return []
    fronts: List[List[tuple]] = [[] for _ in range(last + 1)]
    fronts[0] = [(0, 0.0, None)]
    for j in range(1, last + 1):
        labels = []
        for i in range(j):
            if not fronts[i]:
                continue
            width, cost, add = chain.working[i][j], chain.cost[i][j], chain.boundary[i]
            fits = width <= threshold
            for memory, spent, back in fronts[i]:
                if j == last:
                    if fits:
                        labels.append((memory + add, spent, (back, i, False)))
                    continue
                labels.append((memory + add + width, spent, (back, i, True)))
                if fits:
                    labels.append((memory + add, spent + cost, (back, i, False)))
        labels = [label for label in labels if (room is None or label[0] <= room)
                  and (max_cost is None or label[1] <= max_cost + 1e-12)]
        fronts[j] = _pareto(labels)
    return fronts[last]


def _unwind(back: tuple) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Cut points and kept segment indices of a label's back pointers."""
    steps = []
    while back is not None:
        back, start, kept = back
        steps.append((start, kept))
    steps.reverse()
    cuts = tuple(start for start, _ in steps[1:])
    return cuts, tuple(s for s, (_, kept) in enumerate(steps) if kept)


def solve_selective(chain: SelectiveChain, max_bytes: Optional[float] = None,
                    max_cost: Optional[float] = None) -> Optional[SelectiveChoice]:
    """The labelled cut set the program chooses (NOTE [ selective segments ]).

    With ``max_bytes`` (and perhaps ``max_cost``): the least recomputation whose memory fits,
    ties by memory.  With only ``max_cost``: the least memory whose recomputation is within it,
    ties by recomputation.  With neither: the least memory.  ``None`` when nothing fits.
    """
    best: Optional[SelectiveChoice] = None

    def rank(choice: SelectiveChoice) -> tuple:
        if max_bytes is not None:
            return (choice.cost, choice.memory, choice.cuts)
        return (choice.memory, choice.cost, choice.cuts)

    for threshold in _thresholds(chain):
        for memory, _, back in _fronts(chain, threshold, max_bytes, max_cost):
            cuts, kept = _unwind(back)
            total, cost = chain_figures(chain, cuts, kept)
            if (max_bytes is not None and total > max_bytes) or (max_cost is not None
                                                                 and cost > max_cost + 1e-12):
                continue
            choice = SelectiveChoice(cuts, kept, total, cost)
            if best is None or rank(choice) < rank(best):
                best = choice
    return best


def _points(late: Graph, chain: CutChain) -> List[int]:
    """Interior cut points: every candidate cut, or the MAX_POINTS crossed by the fewest bytes
    (the first and last of each run of equal crossings, so a plateau keeps its ends)."""
    crossings = crossings_of(late)
    candidates = crossings.candidates(chain)
    if len(candidates) <= MAX_POINTS:
        return candidates
    crossing = crossings.crossing
    ends = [p for k, p in enumerate(candidates)
            if k in (0, len(candidates) - 1) or crossing[candidates[k - 1]] != crossing[p]
            or crossing[candidates[k + 1]] != crossing[p]]
    ends.sort(key=lambda p: (crossing[p], p))
    return sorted(ends[:MAX_POINTS])


def _owning_positions(owned: Sequence[bool], positions: List[int]) -> List[int]:
    """``positions`` (first -1, last the final node) without the interior points that would leave
    a segment owning no operator: a cut between two points with only replayed nodes between them
    (the operators before a graph's first owned node, e.g. an ``Embedding`` and a ``transpose``
    the next segment replays) would make an empty segment."""
    kept = [positions[0]]
    for position in positions[1:]:
        if any(owned[kept[-1] + 1:position + 1]):
            kept.append(position)
        elif position == positions[-1]:  # the last interval owns nothing: end the one before here
            kept[-1:] = [position] if len(kept) > 1 else [kept[-1], position]
    return kept


def selective_chain(graph: Graph, chain: Optional[CutChain] = None,
                    grad_factor: float = DEFAULT_GRAD_FACTOR) -> SelectiveChain:
    """The :class:`SelectiveChain` of ``graph``: its cut points, their boundary bytes, and each
    interval's working set (as :func:`segment_plan_for_cuts` models it) and forward cost."""
    late = graph.as_late_as_possible()
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    crossings = crossings_of(late)
    positions = _owning_positions(crossings.owned, [-1] + _points(late, chain) + [len(late.nodes) - 1])
    costs = node_costs(late)
    total = iteration_cost(late) or 1.0
    owned_cost = [0.0]
    for position, node in enumerate(late.nodes):
        owned_cost.append(owned_cost[-1] + (costs.get(node.name, 0.0) if crossings.owned[position] else 0.0))
    boundary = [0] + [HEAD_GRAD_COPIES * crossings.crossing[p] for p in positions[1:-1]] + [0]
    working, cost = [], []
    for i, start in enumerate(positions):
        row_w, row_c = [0] * len(positions), [0.0] * len(positions)
        largest = 0
        for j in range(i + 1, len(positions)):
            end = positions[j]
            largest = max([largest] + chain.op_bytes[positions[j - 1] + 1:end + 1])
            need = chain.need_prefix[end + 1] - chain.need_prefix[start + 1]
            row_w[j] = int(need + grad_factor * largest)
            row_c[j] = (owned_cost[end + 1] - owned_cost[start + 1]) / total
        working.append(tuple(row_w))
        cost.append(tuple(row_c))
    return SelectiveChain(tuple(positions), tuple(boundary), tuple(working), tuple(cost))


def mixed_estimate(plan: SegmentPlan) -> int:
    """Modelled bytes of a (possibly) mixed plan: the boundaries' copies, every kept segment's
    working set, and the largest of the others (NOTE [ selective segments ])."""
    kept = set(plan.kept)
    shared = max((s.working_bytes for s in plan.segments if s.index not in kept), default=0)
    return (HEAD_GRAD_COPIES * plan.boundary_bytes + shared
            + sum(s.working_bytes for s in plan.segments if s.index in kept))


def selective_plan(graph: Graph, choice: SelectiveChoice, chain: SelectiveChain,
                   cut_chain: Optional[CutChain] = None,
                   grad_factor: float = DEFAULT_GRAD_FACTOR) -> SegmentPlan:
    """The :class:`SegmentPlan` of a labelled cut set: the segments of its cuts, ``kept`` set,
    recomputation only of the dropped segments and the mixed estimate."""
    cuts = [chain.positions[p] for p in choice.cuts]
    plan = segment_plan_for_cuts(graph, cuts, cut_chain, grad_factor).with_kept(choice.kept)
    return dataclasses.replace(plan, estimated_bytes=mixed_estimate(plan), recompute_fraction=choice.cost)
