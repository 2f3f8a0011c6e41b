"""A coarse, framework-free model of activation memory under a mirror decision.

MXNet decides the real figure (its static memory plan, read after a bind); this
model is what the unit tests of the planners measure against when no MXNet is
around, and a quick way to rank decisions.  It follows Chen et al. (2016): the
outputs that are kept live from forward to backward, plus the largest group of
recomputed outputs that must exist at once while one segment is replayed.
"""
from __future__ import annotations

from typing import AbstractSet, Dict, List

from .graph import Graph, NodeKind

__all__ = ["estimate_planned_bytes", "mirrored_segments"]


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


def estimate_planned_bytes(graph: Graph, mirrored: AbstractSet[str]) -> int:
    """Estimated activation bytes of one training iteration under ``mirrored``.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    mirrored : set of str
        Names of recomputed nodes; names MXNet would not recompute are ignored.

    Returns
    -------
    int
        Bytes kept from forward to backward plus the largest replayed segment.
    """
    kept = sum(n.planned_bytes for n in graph.nodes
               if n.kind is NodeKind.OP and not (n.name in mirrored and n.can_mirror))
    peak = max((graph.planned_bytes_of(group) for group in mirrored_segments(graph, mirrored)),
               default=0)
    return kept + peak
