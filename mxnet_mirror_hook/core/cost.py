"""Recomputation cost model: how much work re-running a forward node costs.

The analytic unit is one floating-point operation; memory-bound operators
(BatchNorm, activations, elementwise) are charged a few operations per element.
When measured operator times are given (:class:`MeasuredCosts`, made by
``mx/calibrate.py`` on the device the plan is for), they replace the estimate:
every figure here is a ratio (recomputation over one iteration), so either unit
works, and a plan made from the same table is the same plan.

# NOTE [ measured operator times ]
# Counting operations put the recomputation of resnet50_v1b's 'min' plan at
# 33% of an iteration where the CPU measured 23%, and an unrolled LSTM's at 33%
# where it measured 68% (bench/RESULTS.md, mean absolute error 12 points):
# operations say nothing of how fast a backward kernel is next to its forward,
# nor of the fixed cost of launching a small operator.  A measured table holds,
# per node, the seconds of one forward and of its backward at the graph's
# shapes; the iteration is their sum and a recomputed node costs its forward.
# Nodes the table misses (an operator that would not bind alone) get the
# analytic figure converted at the table's own rate (measured seconds per
# estimated operation over the nodes it has), so a partial table still gives
# one consistent unit.  The table is data: it is measured once, rounded and
# cached, and planning reads it like any other input (a test injects one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping, Optional, Tuple

from .fused import fused_forward_cost
from .graph import Graph, Node, NodeKind

__all__ = ["forward_cost", "node_costs", "iteration_cost", "recompute_overhead", "BACKWARD_TO_FORWARD",
           "MeasuredCosts", "use_measured_costs", "measured_costs_of"]

#: A backward pass costs about twice its forward pass (gradients of inputs and of weights).
BACKWARD_TO_FORWARD = 2.0

_PER_ELEMENT = {
    "BatchNorm": 8.0, "LayerNorm": 8.0, "InstanceNorm": 8.0, "GroupNorm": 8.0,
    "Activation": 1.0, "relu": 1.0, "LeakyReLU": 2.0, "sigmoid": 4.0, "tanh": 4.0,
    "softmax": 5.0, "SoftmaxOutput": 5.0, "SoftmaxActivation": 5.0, "log_softmax": 5.0,
    "Concat": 1.0, "concat": 1.0, "Embedding": 1.0, "Dropout": 2.0,
    "RNN": 0.0,  # handled below
}


#: MXNet's interleaved attention products (gluonnlp's self- and encoder-decoder attention) and
#: the width of the query/key/value tensor each reads per head (3: q, k, v interleaved; 2: k, v;
#: 1: queries alone) for the query-key products, or None for the products with the values,
#: whose inner dimension is the key sequence.
_INTERLEAVED = {"_contrib_interleaved_matmul_selfatt_qk": 3, "_contrib_interleaved_matmul_encdec_qk": 1,
                "_contrib_interleaved_matmul_selfatt_valatt": None,
                "_contrib_interleaved_matmul_encdec_valatt": None}


def _interleaved_inner(graph: Graph, node: Node) -> int:
    """The inner dimension of an interleaved attention product: the head width of a query-key
    product, the key sequence of a product with the values (sequence-major inputs)."""
    first = _input_shape(graph, node, 0)
    per_head = _INTERLEAVED[node.op]
    if per_head is None:            # (seq_k, batch, width): the attention's last axis is seq_k
        return first[0] if first else 1
    heads = max(int(node.attrs.get("heads", "1") or 1), 1)
    return first[-1] // (per_head * heads) if first else 1


def _kernel_area(node: Node) -> int:
    kernel = node.attrs.get("kernel", "")
    numbers = [int(x) for x in kernel.strip("()[] ").replace(",", " ").split() if x.isdigit()]
    return math.prod(numbers) if numbers else 1


def _input_shape(graph: Graph, node: Node, position: int = 0) -> Tuple[int, ...]:
    if position >= len(node.inputs):
        return ()
    source, output = node.inputs[position]
    shapes = graph.nodes[source].output_shapes
    return tuple(shapes[output]) if output < len(shapes) else ()


def forward_cost(graph: Graph, node: Node) -> float:
    """Estimated operations of one forward evaluation of ``node``.

    Parameters
    ----------
    graph : Graph
        The graph holding ``node`` (input shapes are read from it).
    node : Node
        An operator node; variables cost nothing.

    Returns
    -------
    float
        Operations (multiply-adds count two).
    """
    if node.kind is not NodeKind.OP:
        return 0.0
    fused = fused_forward_cost(graph, node)   # a fused operator (core/fused.py)
    if fused is not None:
        return fused
    out = float(node.numel)
    op = node.op
    if op in ("Convolution", "Deconvolution"):
        data = _input_shape(graph, node, 0)
        weight = _input_shape(graph, node, 1)
        groups = max(int(node.attrs.get("num_group", "1") or 1), 1)
        area = _kernel_area(node)
        if op == "Convolution":
            in_channels = data[1] if len(data) > 1 else 1
            return 2.0 * out * (in_channels / groups) * area
        in_elements = float(math.prod(data)) if data else out
        out_channels = weight[1] * groups if len(weight) > 1 else 1
        return 2.0 * in_elements * (out_channels / groups) * area
    if op == "FullyConnected":
        weight = _input_shape(graph, node, 1)
        in_features = weight[1] if len(weight) > 1 else 1
        return 2.0 * out * in_features
    if op in ("dot", "batch_dot", "linalg_gemm2"):
        left = _input_shape(graph, node, 0)
        inner = left[-1] if left else 1
        return 2.0 * out * inner
    if op in _INTERLEAVED:
        return 2.0 * out * _interleaved_inner(graph, node)
    if op == "Pooling":
        if node.attrs.get("global_pool", "False") in ("True", "true", "1"):
            data = _input_shape(graph, node, 0)
            return float(math.prod(data)) if data else out
        return out * _kernel_area(node)
    if op == "RNN":
        data = _input_shape(graph, node, 0)
        hidden = int(node.attrs.get("state_size", "1") or 1)
        gates = {"lstm": 4, "gru": 3}.get(node.attrs.get("mode", "lstm"), 1)
        layers = int(node.attrs.get("num_layers", "1") or 1)
        steps_batch = data[0] * data[1] if len(data) > 2 else out
        features = data[2] if len(data) > 2 else hidden
        return 2.0 * steps_batch * gates * hidden * (features + hidden) * layers
    return out * _PER_ELEMENT.get(op, 1.0)


@dataclass(frozen=True)
class MeasuredCosts:
    """Measured seconds of each operator node's forward and backward (NOTE [ measured operator times ]).

    Parameters
    ----------
    forward : mapping of str to float
        Node key to the seconds of one forward evaluation.
    backward : mapping of str to float
        Node key to the seconds of its backward (gradients of its inputs); a node
        missing here costs ``BACKWARD_TO_FORWARD`` times its forward.
    device : str
        Where the times were measured (``'cpu'``, ``'gpu'``), for reports.
    """

    forward: Mapping[str, float]
    backward: Mapping[str, float] = field(default_factory=dict)
    device: str = "cpu"

    def rate(self, graph: Graph) -> float:
        """Measured seconds per estimated operation over the nodes both know (0 if none)."""
        seconds = operations = 0.0
        for node in graph.op_nodes:
            if node.name in self.forward:
                seconds += self.forward[node.name]
                operations += forward_cost(graph, node)
        return seconds / operations if operations > 0 else 0.0


def _measured_node_costs(graph: Graph, measured: MeasuredCosts) -> Tuple[Dict[str, float], float]:
    """Forward seconds of every operator (missing ones converted at the table's rate) and the
    seconds of one iteration."""
    rate = measured.rate(graph)
    forward: Dict[str, float] = {}
    total = 0.0
    for node in graph.op_nodes:
        if node.name in measured.forward:
            seconds = float(measured.forward[node.name])
        else:
            seconds = forward_cost(graph, node) * rate
        forward[node.name] = seconds
        total += seconds + float(measured.backward.get(node.name, BACKWARD_TO_FORWARD * seconds))
    return forward, total


def use_measured_costs(graph: Graph, measured: Optional[MeasuredCosts]) -> None:
    """Make every cost figure of ``graph`` (and of its late order) come from ``measured``.

    ``None`` goes back to the analytic estimate.  The planners read costs through
    :func:`node_costs`, :func:`iteration_cost` and :func:`recompute_overhead`, so
    the table reaches the dynamic programs, the segment estimates and ``plan.overhead``.
    """
    if measured is None and measured_costs_of(graph) is None:
        return  # nothing attached, nothing to undo
    graphs = [graph]
    late = graph.as_late_as_possible()  # the segment estimates read the late order's costs
    if late is not graph:
        graphs.append(late)
    for target in graphs:
        for attribute in ("_forward_costs", "_mirror_costs", "_iteration_seconds"):
            if hasattr(target, attribute):
                delattr(target, attribute)
        target._measured_costs = measured  # type: ignore[attr-defined]
        if measured is not None:
            forward, total = _measured_node_costs(target, measured)
            target._forward_costs = forward  # type: ignore[attr-defined]
            target._iteration_seconds = total  # type: ignore[attr-defined]


def measured_costs_of(graph: Graph) -> Optional[MeasuredCosts]:
    """The table :func:`use_measured_costs` gave ``graph`` (or its early order), if any."""
    return getattr(graph, "_measured_costs", None)


def node_costs(graph: Graph, measured: Optional[MeasuredCosts] = None) -> Dict[str, float]:
    """Forward cost of every operator: measured seconds when given (or attached to the graph by
    :func:`use_measured_costs`), else :func:`forward_cost`, computed once per graph."""
    if measured is not None:
        return _measured_node_costs(graph, measured)[0]
    cached = getattr(graph, "_forward_costs", None)
    if cached is None:
        cached = {node.name: forward_cost(graph, node) for node in graph.op_nodes}
        graph._forward_costs = cached  # type: ignore[attr-defined]
    return cached


def iteration_cost(graph: Graph, measured: Optional[MeasuredCosts] = None) -> float:
    """Cost of one plain training iteration (forward and backward), in the unit of :func:`node_costs`."""
    if measured is not None:
        return _measured_node_costs(graph, measured)[1]
    seconds = getattr(graph, "_iteration_seconds", None)
    if seconds is not None:
        return float(seconds)
    return sum(node_costs(graph).values()) * (1.0 + BACKWARD_TO_FORWARD)


def recompute_overhead(graph: Graph, mirrored: Iterable[str],
                       measured: Optional[MeasuredCosts] = None) -> float:
    """Extra work of recomputing ``mirrored`` as a fraction of one plain iteration.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    mirrored : iterable of str
        Names of the nodes recomputed during backward.
    measured : MeasuredCosts, optional
        Measured operator times; by default those attached to ``graph``
        (:func:`use_measured_costs`), else the analytic estimate.

    Returns
    -------
    float
        0.0 means no extra work; 0.33 is about one extra forward pass.
    """
    if measured is not None:
        forward, total = _measured_node_costs(graph, measured)
        extra = sum(forward.get(name, 0.0) for name in set(mirrored)
                    if name in graph and graph.node(name).can_mirror)
        return extra / total if total > 0 else 0.0
    total = iteration_cost(graph)
    if total <= 0:
        return 0.0
    # The planner's search calls this once per evaluation: the costs of the nodes MXNet
    # can recompute are looked up in one dict (others add 0.0, which leaves the sum as it was).
    costs = getattr(graph, "_mirror_costs", None)
    if costs is None:
        every = node_costs(graph)
        costs = {node.name: every.get(node.name, 0.0) for node in graph.op_nodes if node.can_mirror}
        graph._mirror_costs = costs  # type: ignore[attr-defined]
    extra = sum(costs.get(name, 0.0) for name in mirrored)
    return extra / total
