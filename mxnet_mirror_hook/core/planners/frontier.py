"""Cuts where a few tensors cross together: the seed's search over multi-tensor frontiers.

# NOTE [ frontier cuts ]
# A single-node cut point needs one tensor to carry everything from one part of
# the graph to the next.  In an unrolled LSTM the h and c of every layer (and
# the split input sequence) cross each step boundary together, so there is no
# such node and the seed's search finds nothing.  Here a cut is a position in
# the topological order together with its frontier: the nodes produced at or
# before it that are read after it.  Positions whose frontier has at most
# ``max_frontier`` nodes are candidates; the threshold heuristic walks them as
# the seed walks stage nodes, and at a chosen position keeps the whole
# frontier, so the next segment can be recomputed from kept tensors alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Tuple

from ..graph import Graph, NodeKind
from .registry import register_planner
from .base import Decision, Planner
from .memonger import seed_threshold_sequence

__all__ = ["Frontier", "frontiers", "frontier_plan", "FrontierPlanner"]


@dataclass(frozen=True)
class Frontier:
    """A cut position and the nodes that cross it."""

    position: int
    nodes: FrozenSet[int]
    crossing_bytes: int


def frontiers(graph: Graph, max_frontier: int) -> List[Frontier]:
    """Positions (in the activation region) whose frontier has at most ``max_frontier`` nodes."""
    region = graph.activation_region()
    labels = set(graph.label_input_indices())
    size = len(graph.nodes)
    last_use = [-1] * size
    for position, node in enumerate(graph.nodes):
        if region[position]:
            for source, _ in node.inputs:
                last_use[source] = max(last_use[source], position)
    for source, _ in graph.heads:
        last_use[source] = size
    live: dict = {}
    found: List[Frontier] = []
    for position, node in enumerate(graph.nodes):
        produces = region[position] or (node.kind is NodeKind.INPUT and position not in labels)
        if produces and last_use[position] > position:
            live[position] = last_use[position]
        for index in [i for i, end in live.items() if end <= position]:
            del live[index]
        if region[position] and 0 < len(live) <= max_frontier:
            crossing = frozenset(live)
            found.append(Frontier(position, crossing,
                                  sum(graph.nodes[i].planned_bytes for i in crossing)))
    return found


def frontier_plan(graph: Graph, threshold_bytes: int, candidates: List[Frontier]
                  ) -> Tuple[FrozenSet[str], int, int]:
    """The threshold heuristic over frontier positions.

    Returns
    -------
    (mirrored, max_segment_bytes, saved_bytes)
    """
    at = {f.position: f for f in candidates}
    kept: set = set()
    local = saved = max_segment = 0
    for position, node in enumerate(graph.nodes):
        if node.kind in (NodeKind.PARAM, NodeKind.AUX):
            continue
        local += node.planned_bytes
        frontier = at.get(position)
        if frontier is not None and local > threshold_bytes:
            kept |= frontier.nodes
            saved += frontier.crossing_bytes
            max_segment = max(max_segment, local)
            local = 0
    names = {graph.nodes[i].name for i in kept}
    mirrored = frozenset(n.name for n in graph.nodes if n.can_mirror and n.name not in names)
    return mirrored, max_segment, saved


def frontier_decisions(graph: Graph, max_frontier: int, ntrial: int = 6) -> List[Decision]:
    """The seed's threshold sequence (in bytes) over frontier cuts."""
    candidates = frontiers(graph, max_frontier)
    if not candidates:
        return []

    def apply(threshold_bytes: int) -> Tuple[FrozenSet[str], int, int]:
        return frontier_plan(graph, threshold_bytes, candidates)

    return [Decision(mirrored, f"frontier<={max_frontier},threshold={threshold >> 10}KB")
            for threshold, mirrored in seed_threshold_sequence(apply, ntrial, unit_shift=0)]


@register_planner("frontier")
class FrontierPlanner(Planner):
    """Threshold search over cuts whose frontier holds at most ``max_frontier`` tensors."""

    name = "frontier"

    def __init__(self, max_frontier: int = 8, ntrial: int = 6) -> None:
        self.max_frontier = max_frontier
        self.ntrial = ntrial

    def propose(self, graph: Graph) -> List[Decision]:
        return frontier_decisions(graph, self.max_frontier, self.ntrial)
