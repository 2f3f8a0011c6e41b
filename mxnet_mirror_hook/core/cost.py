"""Recomputation cost model: how much work re-running a forward node costs.

The unit is one floating-point operation; memory-bound operators (BatchNorm,
activations, elementwise) are charged a few operations per element, which puts
them at their real weight next to convolutions on a CPU or GPU.  The model is
deliberately simple; ``plan.overhead`` is an estimate, and the benchmark
reports how it compares with measured iteration times.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

from .graph import Graph, Node, NodeKind

__all__ = ["forward_cost", "node_costs", "iteration_cost", "recompute_overhead", "BACKWARD_TO_FORWARD"]

#: A backward pass costs about twice its forward pass (gradients of inputs and of weights).
BACKWARD_TO_FORWARD = 2.0

_PER_ELEMENT = {
    "BatchNorm": 8.0, "LayerNorm": 8.0, "InstanceNorm": 8.0, "GroupNorm": 8.0,
    "Activation": 1.0, "relu": 1.0, "LeakyReLU": 2.0, "sigmoid": 4.0, "tanh": 4.0,
    "softmax": 5.0, "SoftmaxOutput": 5.0, "SoftmaxActivation": 5.0, "log_softmax": 5.0,
    "Concat": 1.0, "concat": 1.0, "Embedding": 1.0, "Dropout": 2.0,
    "RNN": 0.0,  # handled below
}


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


def node_costs(graph: Graph) -> Dict[str, float]:
    """:func:`forward_cost` of every operator, computed once per graph."""
    cached = getattr(graph, "_forward_costs", None)
    if cached is None:
        cached = {node.name: forward_cost(graph, node) for node in graph.op_nodes}
        graph._forward_costs = cached  # type: ignore[attr-defined]
    return cached


def iteration_cost(graph: Graph) -> float:
    """Estimated operations of one plain training iteration (forward and backward)."""
    return sum(node_costs(graph).values()) * (1.0 + BACKWARD_TO_FORWARD)


def recompute_overhead(graph: Graph, mirrored: Iterable[str]) -> float:
    """Extra work of recomputing ``mirrored`` as a fraction of one plain iteration.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    mirrored : iterable of str
        Names of the nodes recomputed during backward.

    Returns
    -------
    float
        0.0 means no extra work; 0.33 is about one extra forward pass.
    """
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
