"""Live activation memory along one training iteration, as the planner's model sees it.

MXNet reports only its total plan, not a timeline; this simulation is what the
``report`` picture draws.  Forward runs operators in topological order;
backward visits them in reverse.  Without mirroring every output stays live
from its forward step to its backward step.  With mirroring a recomputed
output is dropped once its forward consumers have run, and when backward
first needs a recomputed output its whole connected segment is replayed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Dict, List

from .graph import Graph, NodeKind
from .memory import mirrored_segments

__all__ = ["TimelinePoint", "simulate_timeline"]


@dataclass(frozen=True)
class TimelinePoint:
    """Live bytes after one step."""

    step: int
    phase: str          # "forward", "recompute" or "backward"
    node: str
    live_bytes: int


def simulate_timeline(graph: Graph, mirrored: AbstractSet[str]) -> List[TimelinePoint]:
    """Simulate live activation bytes over forward, recomputation and backward.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    mirrored : set of str
        Recomputed nodes (empty for the unmirrored baseline).

    Returns
    -------
    list of TimelinePoint
    """
    ops = [i for i, n in enumerate(graph.nodes) if n.kind is NodeKind.OP]
    recomputed = {graph.index(name) for name in mirrored if graph.node(name).can_mirror}
    consumers = graph.consumers()
    last_forward_use: Dict[int, int] = {}
    for i in ops:
        op_consumers = [c for c in consumers[i] if graph.nodes[c].kind is NodeKind.OP]
        last_forward_use[i] = max(op_consumers, default=i)
    segment_of: Dict[int, List[int]] = {}
    for segment in mirrored_segments(graph, frozenset(graph.nodes[i].name for i in recomputed)):
        members = sorted(graph.index(name) for name in segment)
        for member in members:
            segment_of[member] = members

    live: Dict[int, int] = {}
    points: List[TimelinePoint] = []
    step = 0

    def record(phase: str, index: int) -> None:
        nonlocal step
        points.append(TimelinePoint(step, phase, graph.nodes[index].name, sum(live.values())))
        step += 1

    for i in ops:
        live[i] = graph.nodes[i].planned_bytes
        for source, _ in graph.nodes[i].inputs:  # recomputed inputs die after their last use
            if source in recomputed and last_forward_use.get(source) == i:
                live.pop(source, None)
        if i in recomputed and last_forward_use[i] == i:
            live.pop(i, None)
        record("forward", i)
    for i in reversed(ops):
        if i in recomputed and i not in live:
            for member in segment_of[i]:
                if member not in live:
                    live[member] = graph.nodes[member].planned_bytes
                    record("recompute", member)
        live.pop(i, None)
        record("backward", i)
    return points
