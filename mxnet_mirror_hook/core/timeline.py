"""Live activation memory along one training iteration, on the liveness model's rules.

MXNet reports only its total plan, not a timeline; this simulation is what the
``report`` picture draws.  Forward runs operators in topological order;
backward visits them in reverse.  An output lives from its forward step to
its backward step only if some gradient reads it (:mod:`.liveness`, NOTE
[ what backward keeps ]); otherwise it dies after its last forward consumer.
A recomputed output also dies then, unless the gradient of a kept consumer
reads it (MXNet 1.9 builds kept nodes' gradients on the original outputs);
when backward first needs a recomputed output, its whole connected segment is
replayed.  The figures are a model: MXNet's allocator adds fragmentation on
top (NOTE [ replaying MXNet's memory plan ] in :mod:`.allocator`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Set

from .graph import Graph, NodeKind
from .liveness import gradient_reads_inputs, read_by_backward

__all__ = ["TimelinePoint", "simulate_timeline", "mirrored_segments"]


@dataclass(frozen=True)
class TimelinePoint:
    """Live bytes after one step."""

    step: int
    phase: str          # "forward", "recompute" or "backward"
    node: str
    live_bytes: int


def mirrored_segments(graph: Graph, mirrored: AbstractSet[str]) -> List[List[str]]:
    """Connected groups of mirrored operators (edges between mirrored nodes only).

    Each group is replayed as one piece during backward.
    """
    parent: Dict[int, int] = {}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    members = [i for i, n in enumerate(graph.nodes) if n.name in mirrored and n.can_mirror]
    for i in members:
        parent[i] = i
    for i in members:
        for source, _ in graph.nodes[i].inputs:
            if source in parent:
                a, b = find(i), find(source)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: Dict[int, List[str]] = {}
    for i in members:
        groups.setdefault(find(i), []).append(graph.nodes[i].name)
    return list(groups.values())


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
    read = read_by_backward(graph)
    last_forward_use: Dict[int, int] = {}
    held: Set[int] = set()  # outputs that stay live until backward
    for i in ops:
        op_consumers = [c for c in consumers[i] if graph.nodes[c].kind is NodeKind.OP]
        last_forward_use[i] = max(op_consumers, default=i)
        if i in recomputed:
            if any(c not in recomputed and gradient_reads_inputs(graph.nodes[c].op)
                   for c in op_consumers):
                held.add(i)
        elif read[i] or not op_consumers:
            held.add(i)
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
        for source, _ in graph.nodes[i].inputs:  # outputs backward does not hold die after last use
            if source not in held and last_forward_use.get(source) == i:
                live.pop(source, None)
        if i not in held and last_forward_use[i] == i:
            live.pop(i, None)
        record("forward", i)
    for i in reversed(ops):
        if i in recomputed and i not in live:
            for member in segment_of[i]:
                # Members whose backward step has passed (higher indices) are not needed again.
                if member <= i and member not in live and (read[member] or member == i):
                    live[member] = graph.nodes[member].planned_bytes
                    record("recompute", member)
        live.pop(i, None)
        record("backward", i)
    return points
