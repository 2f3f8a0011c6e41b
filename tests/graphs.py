"""Tiny hand-built forward graphs for the core tests (no MXNet)."""
from __future__ import annotations

from typing import AbstractSet, Dict, List, Optional, Sequence

from hypothesis import strategies as st

from mxnet_mirror_hook.core.graph import Graph, Node, NodeKind
from mxnet_mirror_hook.core.timeline import mirrored_segments


class GraphBuilder:
    """Adds nodes in topological order; shapes are (batch, channels, h, w)."""

    def __init__(self) -> None:
        self.nodes: List[Node] = []

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def input(self, name: str, shape=(1, 1024, 16, 16)) -> int:
        return self._add(Node(name, "null", NodeKind.INPUT, [], [tuple(shape)]))

    def param(self, name: str, shape=(1024,)) -> int:
        return self._add(Node(name, "null", NodeKind.PARAM, [], [tuple(shape)]))

    def op(self, name: str, op: str, inputs: Sequence[int], shape=(1, 1024, 16, 16),
           attrs: Optional[Dict[str, str]] = None, with_weight: bool = False) -> int:
        sources = list(inputs)
        if with_weight:
            sources.append(self.param(f"{name}_w", (16, 16, 3, 3)))
        return self._add(Node(name, op, NodeKind.OP, [(s, 0) for s in sources], [tuple(shape)],
                              4, dict(attrs or {})))

    def build(self, *heads: int) -> Graph:
        return Graph(self.nodes, [(h, 0) for h in (heads or (len(self.nodes) - 1,))])


def chain(length: int, shape=(1, 1024, 16, 16), stage_every: int = 0) -> Graph:
    """data -> relu_0 -> ... -> relu_{n-1} -> loss (one MB per activation by default)."""
    builder = GraphBuilder()
    last = builder.input("data", shape)
    for i in range(length):
        attrs = {"mirror_stage": "True"} if stage_every and i % stage_every == stage_every - 1 else {}
        last = builder.op(f"relu{i}", "Activation", [last], shape, attrs)
    label = builder.input("label", (shape[0],))
    builder.op("loss", "SoftmaxOutput", [last, label], shape)
    return builder.build()


def residual(blocks: int, shape=(1, 1024, 16, 16)) -> Graph:
    """Residual blocks: out = relu(conv(relu(conv(x))) + x)."""
    builder = GraphBuilder()
    last = builder.op("stem", "Convolution", [builder.input("data", shape)], shape,
                      {"kernel": "(3, 3)"}, with_weight=True)
    for b in range(blocks):
        a = builder.op(f"b{b}_conv1", "Convolution", [last], shape, {"kernel": "(3, 3)"}, True)
        a = builder.op(f"b{b}_relu1", "Activation", [a], shape)
        a = builder.op(f"b{b}_conv2", "Convolution", [a], shape, {"kernel": "(3, 3)"}, True)
        s = builder.op(f"b{b}_add", "elemwise_add", [a, last], shape)
        last = builder.op(f"b{b}_out", "Activation", [s], shape)
    label = builder.input("label", (shape[0],))
    builder.op("loss", "SoftmaxOutput", [last, label], shape)
    return builder.build()


@st.composite
def random_dags(draw, max_size: int = 9, max_fan_in: int = 3, ops: Sequence[str] = ("Activation",),
                elements: Sequence[int] = (4, 4)) -> Graph:
    """Random DAGs over one input: 2..``max_size`` operators drawn from ``ops``, each reading
    1..``max_fan_in`` earlier nodes, with outputs of ``elements[0]..elements[1]`` floats."""
    size = draw(st.integers(2, max_size))
    nodes = [Node("data", "null", NodeKind.INPUT, [], [(1, 4)])]
    for i in range(1, size + 1):
        fan_in = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=max_fan_in, unique=True))
        op = draw(st.sampled_from(list(ops)))
        count = draw(st.integers(*elements))
        attrs = {"kernel": "(3, 3)"} if op == "Convolution" else {}
        nodes.append(Node(f"n{i}", op, NodeKind.OP, [(j, 0) for j in fan_in], [(1, count)], 4, attrs))
    return Graph(nodes, [(size, 0)])


def estimate_planned_bytes(graph: Graph, mirrored: AbstractSet[str]) -> int:
    """A coarse stand-in for MXNet's measurement in the planners' unit tests (Chen et al. 2016).

    Bytes of every kept operator output plus the largest replayed segment of
    recomputed ones; names MXNet would not recompute are ignored.  Not a
    model of MXNet (see mxnet_mirror_hook/core/__init__.py for those).
    """
    kept = sum(n.planned_bytes for n in graph.nodes
               if n.kind is NodeKind.OP and not (n.name in mirrored and n.can_mirror))
    peak = max((graph.planned_bytes_of(group) for group in mirrored_segments(graph, mirrored)),
               default=0)
    return kept + peak
