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
from typing import Dict, FrozenSet, List, Mapping, Tuple

from ..graph import Graph, NodeKind
from . import register_planner
from .base import Decision, Planner

__all__ = ["ThresholdResult", "threshold_plan", "search_thresholds", "MemongerPlanner", "user_stages"]

MB_SHIFT = 20


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


def search_thresholds(graph: Graph, stages: Mapping[str, str], ntrial: int = 6,
                      nbegin: int = 3, unit_shift: int = MB_SHIFT) -> List[Tuple[int, ThresholdResult]]:
    """The thresholds the seed's search tries, with the plan of each.

    The sequence depends only on the graph, not on measurements, so the
    planner can measure them in any order.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    stages : mapping of str to str
        Stage labels, as for :func:`threshold_plan`.
    ntrial : int
        Grid steps after the three first guesses (the seed's ``ntrial``).
    nbegin : int
        Number of refined first guesses (the seed's 3).
    unit_shift : int
        Thresholds are whole multiples of ``1 << unit_shift`` bytes: 20 (MB) as
        in the seed; smaller graphs are searched in KB (10).

    Returns
    -------
    list of (int, ThresholdResult)
        Threshold in units, and the plan it gives.
    """
    tried: List[Tuple[int, ThresholdResult]] = []
    threshold = 0
    min_threshold = None
    for _ in range(nbegin):
        result = threshold_plan(graph, threshold << unit_shift, stages)
        tried.append((threshold, result))
        saved_mb = result.saved_bytes >> unit_shift
        local_mb = result.max_segment_bytes >> unit_shift
        guess = int(math.sqrt(saved_mb * local_mb / 2))
        if min_threshold is None or local_mb < min_threshold:
            min_threshold = local_mb
        threshold = guess
    assert min_threshold is not None
    max_threshold = threshold * math.sqrt(2)
    step = int((max_threshold - min_threshold) / ntrial)
    threshold = min_threshold + step
    if step > 0:
        for _ in range(ntrial):
            tried.append((threshold, threshold_plan(graph, threshold << unit_shift, stages)))
            threshold += step
    return tried


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
