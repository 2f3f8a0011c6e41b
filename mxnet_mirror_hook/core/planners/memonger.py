"""The seed's planner (Chen et al., 2016): a size threshold over stage nodes, and its search.

# NOTE [ the threshold heuristic ]
# Walk the forward graph in topological order, adding each activation's size
# to a running "local" sum.  At a stage node (one the user marked with
# ``mirror_stage``), if the local sum has grown past the threshold, keep that
# node's output (do not recompute it) and start a new segment; every other
# operator is recomputed.  Memory is then roughly (kept outputs) + (largest
# segment), minimised near threshold = sqrt(kept * segment / 2).  The search
# tries threshold 0, two refined guesses from that formula, then a grid of
# ``ntrial`` thresholds between the smallest segment seen and sqrt(2) times
# the last guess, and keeps the candidate MXNet measures lowest.
#
# Unlike the seed, parameters and auxiliary states are known from the symbol's
# lists (never from name suffixes), and the unmirrored graph is always a
# candidate, so the result is never worse than not mirroring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Mapping, Tuple, TypeVar

from ..graph import Graph, NodeKind
from ..units import MB_SHIFT
from .registry import register_planner
from .base import Decision, Planner

__all__ = ["ThresholdResult", "threshold_plan", "seed_threshold_sequence", "search_thresholds",
           "MemongerPlanner", "user_stages"]

R = TypeVar("R")


@dataclass(frozen=True)
class ThresholdResult:
    """One application of the threshold heuristic.

    Attributes
    ----------
    mirrored : frozenset of str
        Recomputed operators.
    kept : tuple of str
        Stage nodes whose outputs are kept.
    max_segment_bytes : int
        Largest local sum at a kept stage (the seed's ``max_size``).
    saved_bytes : int
        Bytes of the kept stage outputs (the seed's ``save_size``).
    """

    mirrored: FrozenSet[str]
    kept: Tuple[str, ...]
    max_segment_bytes: int
    saved_bytes: int


def user_stages(graph: Graph) -> Dict[str, str]:
    """The user's ``mirror_stage`` marks, by node name."""
    return {n.name: n.mirror_stage for n in graph.nodes
            if n.kind is NodeKind.OP and n.mirror_stage is not None}


def threshold_plan(graph: Graph, threshold_bytes: int, stages: Mapping[str, str]) -> ThresholdResult:
    """Apply the seed's threshold heuristic once.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    threshold_bytes : int
        Segment size (bytes) after which the next stage node is kept.
    stages : mapping of str to str
        Stage label of each stage node.  ``'True'`` makes a node a stage of
        its own; consecutive nodes with the same other label form one stage,
        kept or recomputed together.

    Returns
    -------
    ThresholdResult
    """
    local = 0
    saved = 0
    max_segment = 0
    last_stage = ""
    stage_kept = False
    kept: List[str] = []
    for node in graph.nodes:
        if node.kind in (NodeKind.PARAM, NodeKind.AUX):
            continue
        size = node.planned_bytes
        local += size
        stage = stages.get(node.name)
        if stage is None:
            continue
        if stage == "True" or stage != last_stage:
            if local > threshold_bytes:
                saved += size
                max_segment = max(max_segment, local)
                local = 0
                stage_kept = True
                kept.append(node.name)
            else:
                stage_kept = False
            last_stage = stage
        elif stage_kept:
            saved += size
            kept.append(node.name)
    kept_set = set(kept)
    mirrored = frozenset(n.name for n in graph.nodes if n.can_mirror and n.name not in kept_set)
    return ThresholdResult(mirrored, tuple(kept), max_segment, saved)


def seed_threshold_sequence(apply: Callable[[int], Tuple[R, int, int]], ntrial: int = 6,
                            nbegin: int = 3, unit_shift: int = MB_SHIFT) -> List[Tuple[int, R]]:
    """The seed's search sequence over any threshold heuristic.

    Threshold 0 first, then ``nbegin - 1`` guesses ``sqrt(saved * segment / 2)``
    from the previous plan, then ``ntrial`` evenly spaced thresholds from the
    smallest segment seen to ``sqrt(2)`` times the last guess.  The sequence
    depends only on the graph, not on measurements, so a planner can measure
    the plans in any order.

    Parameters
    ----------
    apply : callable
        ``apply(threshold_bytes) -> (plan, max_segment_bytes, saved_bytes)``.
    ntrial : int
        Grid steps after the first guesses (the seed's ``ntrial``).
    nbegin : int
        Number of first guesses (the seed's 3).
    unit_shift : int
        Thresholds are whole multiples of ``1 << unit_shift`` bytes: 20 (MB) as
        in the seed, 10 (KB) for small graphs, 0 for bytes.

    Returns
    -------
    list of (int, plan)
        Threshold in units, and the plan it gives.
    """
    tried: List[Tuple[int, R]] = []
    threshold = 0
    min_threshold = None
    for _ in range(nbegin):
        plan, segment_bytes, saved_bytes = apply(threshold << unit_shift)
        tried.append((threshold, plan))
        saved = saved_bytes >> unit_shift
        local = segment_bytes >> unit_shift
        if min_threshold is None or local < min_threshold:
            min_threshold = local
        threshold = int(math.sqrt(saved * local / 2))
    assert min_threshold is not None
    step = int((threshold * math.sqrt(2) - min_threshold) / ntrial)
    if step > 0:
        for k in range(1, ntrial + 1):
            value = min_threshold + k * step
            tried.append((value, apply(value << unit_shift)[0]))
    return tried


def search_thresholds(graph: Graph, stages: Mapping[str, str], ntrial: int = 6,
                      nbegin: int = 3, unit_shift: int = MB_SHIFT) -> List[Tuple[int, ThresholdResult]]:
    """The thresholds the seed's search tries over stage nodes, with the plan of each.

    See :func:`seed_threshold_sequence`; ``stages`` are as for :func:`threshold_plan`.
    """
    def apply(threshold_bytes: int) -> Tuple[ThresholdResult, int, int]:
        result = threshold_plan(graph, threshold_bytes, stages)
        return result, result.max_segment_bytes, result.saved_bytes

    return seed_threshold_sequence(apply, ntrial, nbegin, unit_shift)


def threshold_decisions(graph: Graph, stages: Mapping[str, str], ntrial: int = 6) -> List[Decision]:
    """Decisions of :func:`search_thresholds`, labelled by threshold."""
    return [Decision(result.mirrored, f"threshold={threshold}MB")
            for threshold, result in search_thresholds(graph, stages, ntrial)]


@register_planner("memonger")
class MemongerPlanner(Planner):
    """The seed's search on the user's ``mirror_stage`` marks.

    Without marks it behaves as the seed did: every operator is recomputed,
    which saves nothing; the unmirrored candidate then wins.
    """

    name = "memonger"

    def __init__(self, ntrial: int = 6) -> None:
        self.ntrial = ntrial

    def propose(self, graph: Graph) -> List[Decision]:
        return threshold_decisions(graph, user_stages(graph), self.ntrial)
