"""A BatchNorm and relu read only by a Convolution, found on a :class:`~.graph.Graph` (pure Python).

In every bottleneck of a ResNet (``conv1 -> bn1 -> relu -> conv2``, ``conv2 -> bn2 -> relu -> conv3``)::

    x = Convolution(...)                          # kept: BatchNorm's backward reads it
    y = BatchNorm(x, gamma, beta)                 # the relu writes over it (in place)
    g = Activation(y, act_type='relu')            # kept: relu's backward and conv's weight gradient read it
    out = Convolution(g, weight)

the plain graph keeps ``x`` and ``g``.  :func:`find_fused_norm_convs` finds each such chain, so
that :mod:`mxnet_mirror_hook.mx.fused_norm_conv` can replace it by one operator that keeps ``x``
only and recomputes ``g`` in its backward (NOTE [ a BatchNorm and relu recomputed inside their
convolution ] there).  Nodes are positions in the graph (NOTE [ nodes are identified by key, not
by name ] in graph.py), never names.

# NOTE [ which BatchNorms the fused operator takes ]
# The operator recomputes BatchNorm's output from the batch statistics, so a BatchNorm using the
# moving statistics (``use_global_stats``) is left alone, and so is one whose mean and variance
# outputs are asked for (``output_mean_var``) or read by any node: the fused node has one output.
# The BatchNorm's output must be read by the relu alone, the relu's by one Convolution alone, as
# its data input, not as a graph output; none of the three may be marked kept (KEEP_ATTR).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

from .graph import KEEP_ATTR, Graph, Node

__all__ = ["FUSED_NORM_CONV_OP", "FusedNormConv", "find_fused_norm_convs", "is_fused_norm_conv",
           "norm_conv_recompute_cost", "fused_norm_conv_cost", "fused_norm_conv_workspace",
           "NORM_KEYS", "CONV_KEYS", "NORM_PREFIX", "WORKSPACE_SLOTS", "SLOT_PREFIX",
           "NORM_OPS_PER_ELEMENT", "RELU_OPS_PER_ELEMENT"]

#: ``op_type`` of the Custom operator computing ``Convolution(relu(BatchNorm(x)))``
#: (mx/fused_norm_conv.py registers it).
FUSED_NORM_CONV_OP = "mirror_fused_norm_conv"

#: BatchNorm parameters carried over (prefixed with :data:`NORM_PREFIX` on the fused node); any
#: other parameter keeps the chain as it is.
NORM_KEYS = frozenset({"eps", "momentum", "fix_gamma", "use_global_stats", "axis", "cudnn_off",
                       "output_mean_var"})
#: Convolution parameters carried over (unprefixed on the fused node).
CONV_KEYS = frozenset({"kernel", "stride", "dilate", "pad", "num_filter", "num_group", "workspace",
                       "no_bias", "cudnn_tune", "cudnn_off", "layout"})
NORM_PREFIX = "bn_"

#: Operations per element of the BatchNorm and of the relu forward, as core/cost.py's
#: ``forward_cost`` counts the plain nodes (``_PER_ELEMENT``; a test keeps them equal).
NORM_OPS_PER_ELEMENT = 8.0
RELU_OPS_PER_ELEMENT = 1.0

#: Kept arrays of ``x``'s size and type outside MXNet's static plan (mx/workspace.py slots named
#: with :data:`SLOT_PREFIX`), shared by every fused operator of one device and type: the
#: recomputed BatchNorm output (the relu is computed over it) and the gradient of the BatchNorm
#: output (NOTE [ the fused BatchNorm's workspace ] in mx/fused_norm_conv.py).  Channel-sized
#: buffers (batch mean and variance, copies of the moving statistics) are not counted.
WORKSPACE_SLOTS = ("value", "gradient")
SLOT_PREFIX = "norm_conv_"


@dataclass(frozen=True)
class FusedNormConv:
    """One BatchNorm, the relu reading it and the Convolution reading the relu.

    Attributes
    ----------
    norm, relu, conv : int
        Positions of the three nodes.
    norm_attrs : dict of str to str
        The BatchNorm's parameters.
    conv_attrs : dict of str to str
        The Convolution's parameters.
    """

    norm: int
    relu: int
    conv: int
    norm_attrs: Dict[str, str]
    conv_attrs: Dict[str, str]


def _parameters(node: Node, allowed: FrozenSet[str]) -> Optional[Dict[str, str]]:
    """``node``'s operator parameters, or None when one is outside ``allowed``."""
    parameters = {key: value for key, value in node.attrs.items() if not key.startswith("__")}
    return parameters if set(parameters) <= allowed else None


def _true(value: str) -> bool:
    return str(value) in ("True", "true", "1")


def _only_reader(graph: Graph, consumers: List[List[int]], heads: set, position: int) -> Optional[int]:
    """The one node reading ``position`` (through output 0 only), or None."""
    readers = consumers[position]
    if position in heads or len(readers) != 1:
        return None
    reader = readers[0]
    entries = [entry for entry in graph.nodes[reader].inputs if entry[0] == position]
    return reader if len(entries) == 1 and tuple(entries[0]) == (position, 0) else None


def _match(graph: Graph, norm: int, heads: set, consumers: List[List[int]]) -> Optional[FusedNormConv]:
    node = graph.nodes[norm]
    norm_attrs = _parameters(node, NORM_KEYS)
    if norm_attrs is None or len(node.inputs) != 5 or any(
            _true(norm_attrs.get(key, "False")) for key in ("use_global_stats", "output_mean_var")):
        return None
    relu = _only_reader(graph, consumers, heads, norm)
    if relu is None or graph.nodes[relu].op != "Activation" or \
            graph.nodes[relu].attrs.get("act_type") != "relu":
        return None
    conv = _only_reader(graph, consumers, heads, relu)
    if conv is None or graph.nodes[conv].op != "Convolution" or graph.nodes[conv].inputs[0][0] != relu:
        return None
    conv_attrs = _parameters(graph.nodes[conv], CONV_KEYS)
    if conv_attrs is None or any(KEEP_ATTR in graph.nodes[p].attrs for p in (norm, relu, conv)):
        return None
    return FusedNormConv(norm=norm, relu=relu, conv=conv, norm_attrs=norm_attrs, conv_attrs=conv_attrs)


def find_fused_norm_convs(graph: Graph) -> List[FusedNormConv]:
    """Every ``BatchNorm -> relu -> Convolution`` chain one operator can compute.

    See NOTE [ which BatchNorms the fused operator takes ].

    Parameters
    ----------
    graph : Graph
        A forward graph (shapes are not needed).

    Returns
    -------
    list of FusedNormConv
        In topological order.
    """
    heads = {position for position, _ in graph.heads}
    consumers = graph.consumers()
    found = []
    for position, node in enumerate(graph.nodes):
        if node.op == "BatchNorm":
            match = _match(graph, position, heads, consumers)
            if match is not None:
                found.append(match)
    return found


def is_fused_norm_conv(node: Node) -> bool:
    """Whether ``node`` is the fused BatchNorm-relu-Convolution operator."""
    return node.op == "Custom" and node.attrs.get("op_type") == FUSED_NORM_CONV_OP


def _source(graph: Graph, node: Node) -> Tuple[Tuple[int, ...], int]:
    """``(shape, bytes per element)`` of a fused node's input ``x`` (``()`` when unknown)."""
    source, output = node.inputs[0]
    producer = graph.nodes[source]
    if output >= len(producer.output_shapes):
        return (), producer.itemsize
    return tuple(producer.output_shapes[output]), producer.itemsize


def norm_conv_recompute_cost(graph: Graph, node: Node) -> float:
    """Estimated operations the fused node's backward adds: one forward of its BatchNorm and relu,
    counted as :func:`~.cost.forward_cost` counts the plain nodes."""
    shape, _ = _source(graph, node)
    return math.prod(shape) * (NORM_OPS_PER_ELEMENT + RELU_OPS_PER_ELEMENT) if shape else 0.0


def _kernel_area(node: Node) -> int:
    kernel = node.attrs.get("kernel", "")
    numbers = [int(x) for x in kernel.strip("()[] ").replace(",", " ").split() if x.isdigit()]
    return math.prod(numbers) if numbers else 1


def fused_norm_conv_cost(graph: Graph, node: Node) -> float:
    """Estimated operations of one forward of the fused node: BatchNorm, relu and the convolution
    (``2 * outputs * in_channels / groups * kernel area``, as ``forward_cost`` counts it)."""
    shape, _ = _source(graph, node)
    in_channels = shape[1] if len(shape) > 1 else 1
    groups = max(int(node.attrs.get("num_group", "1") or 1), 1)
    convolution = 2.0 * node.numel * (in_channels / groups) * _kernel_area(node)
    return convolution + norm_conv_recompute_cost(graph, node)


def fused_norm_conv_workspace(graph: Graph) -> int:
    """Bytes the fused operators keep outside MXNet's static plan (one device).

    One array per :data:`WORKSPACE_SLOTS` slot and element type, each as large as the largest input
    ``x`` of a fused node of that type, shared by all of them and kept from the first call on
    (gradients asked to be written, the training default; ``grad_req='add'`` on ``x`` adds one
    kept buffer of its shape).  With MKLDNN the forward also goes through a kept buffer as large
    as the largest output (NOTE [ the fused BatchNorm's workspace ] in mx/fused_norm_conv.py),
    not counted here.
    """
    largest: Dict[int, int] = {}
    for node in graph.nodes:
        if is_fused_norm_conv(node):
            shape, itemsize = _source(graph, node)
            largest[itemsize] = max(largest.get(itemsize, 0), math.prod(shape) if shape else 0)
    return sum(len(WORKSPACE_SLOTS) * elements * itemsize for itemsize, elements in largest.items())
