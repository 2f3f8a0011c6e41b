"""Which operators a segment owns, and which tensors cross each position of a linearised graph
(the bytes a cut after that position would make boundaries)."""
from __future__ import annotations

import math
import weakref
from typing import Dict, List, Tuple

from ..graph import Graph, NodeKind
from ..planners.dp import CutChain

__all__ = ["REPLAYED_OPS", "Crossings", "crossings_of", "entry_bytes"]


def _depends_on_data(graph: Graph) -> List[bool]:
    """For each node, whether it depends on a data or label input (variables: only inputs)."""
    found = [False] * len(graph.nodes)
    for position, node in enumerate(graph.nodes):
        if node.kind is NodeKind.INPUT:
            found[position] = True
        elif node.kind is NodeKind.OP:
            found[position] = any(found[s] for s, _ in node.inputs)
    return found


def entry_bytes(graph: Graph, entry: Tuple[int, int]) -> int:
    shapes = graph.nodes[entry[0]].output_shapes
    shape = shapes[entry[1]] if entry[1] < len(shapes) else ()
    return math.prod(shape) * 4 if shape else 0


#: Cheap operators that are replayed in every segment reading them when all their inputs are
#: variables (or such replayed operators): splitting or embedding the input sequence of an RNN
#: would otherwise make every step's slice a boundary (three copies of the whole input).
REPLAYED_OPS = frozenset({"SliceChannel", "split", "Embedding", "reshape", "Reshape", "transpose",
                          "SwapAxis", "swapaxes", "expand_dims", "slice", "slice_axis", "Flatten",
                          "flatten", "Cast", "cast", "identity", "_copy", "squeeze"})


def _replayed(graph: Graph) -> List[bool]:
    """Operators replayed by every segment that reads them (never boundaries): those that do
    not depend on a data input, and cheap ones (:data:`REPLAYED_OPS`) reading only variables and
    replayed operators."""
    data = _depends_on_data(graph)
    found = [False] * len(graph.nodes)
    for position, node in enumerate(graph.nodes):
        if node.kind is not NodeKind.OP:
            continue
        if not data[position]:
            found[position] = True
        elif node.op in REPLAYED_OPS and all(graph.nodes[s].kind is not NodeKind.OP or found[s]
                                             for s, _ in node.inputs):
            found[position] = True
    return found


class Crossings:
    """Which tensors cross which positions of a (late-ordered) graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        replayed = _replayed(graph)
        self.owned = [node.kind is NodeKind.OP and not replayed[position]
                      for position, node in enumerate(graph.nodes)]
        size = len(graph.nodes)
        last: Dict[Tuple[int, int], int] = {}
        for position, node in enumerate(graph.nodes):
            for source, output in node.inputs:
                if self.owned[source]:
                    last[(source, output)] = max(last.get((source, output), -1), position)
        self.head_positions = [h[0] for h in graph.heads]
        for head in graph.heads:
            last[tuple(head)] = size  # type: ignore[index]
        #: (producer position, last reader position, entry, bytes), by producer.
        self.spans = sorted((e[0], end, e, entry_bytes(graph, e)) for e, end in last.items()
                            if end > e[0])
        # Bytes crossing the gap after each position.
        delta = [0] * (size + 2)
        for start, end, _, nbytes in self.spans:
            delta[start] += nbytes
            delta[end] -= nbytes
        self.crossing: List[int] = []
        running = 0
        for position in range(size):
            running += delta[position]
            self.crossing.append(running)
        self.first_head = min(self.head_positions, default=size)
        #: Owned operators before each position (``owned_before[p + 1]``: up to and including p).
        self.owned_before = [0]
        for flag in self.owned:
            self.owned_before.append(self.owned_before[-1] + flag)

    def valid(self, position: int) -> bool:
        """A cut after ``position`` keeps every graph output in the last segment."""
        return position < self.first_head and any(
            self.owned[i] for i in range(position + 1, len(self.graph.nodes)))

    def candidates(self, chain: CutChain) -> List[int]:
        """The positions of ``chain`` a cut may follow (interior and :meth:`valid`)."""
        return [p for p in chain.positions[1:-1] if self.valid(p)]


_CROSSINGS: "weakref.WeakKeyDictionary[Graph, Crossings]" = weakref.WeakKeyDictionary()


def crossings_of(late: Graph) -> "Crossings":
    """:class:`Crossings` of a linearised graph, computed once per graph object (segment
    planning asks for it per split)."""
    found = _CROSSINGS.get(late)
    if found is None:
        found = _CROSSINGS[late] = Crossings(late)
    return found

