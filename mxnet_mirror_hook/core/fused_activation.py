"""An element-wise activation read only by a product, found on a :class:`~.graph.Graph` (pure Python).

In every layer of a transformer's feed-forward block (and of a ReLU MLP)::

    z = FullyConnected(x)                         # kept: the activation's backward reads it
    g = LeakyReLU(z, act_type='gelu')             # kept: the product's weight gradient reads it
    y = FullyConnected(g)

the plain graph keeps both ``z`` and ``g``.  :func:`find_fused_activations` finds each activation
whose output only the data input of one ``FullyConnected`` reads, so that
:mod:`mxnet_mirror_hook.mx.fused_activation` can replace the pair by one operator that keeps ``z``
only and recomputes ``g`` in its backward (NOTE [ an activation recomputed inside its product ]
there).  Nodes are positions in the graph (positions in MXNet's JSON: NOTE [ nodes are identified
by key, not by name ] in graph.py), never names.

# NOTE [ which activations the fusion frees memory for ]
# The fused operator keeps its input ``z``; it frees the activation's output ``g``.  That is a
# saving only when the plain graph keeps ``z`` too: when the activation's backward reads its
# input (``_backward_LeakyReLU`` reads input and output for every act_type;
# ``_backward_Activation`` reads the input for sigmoid, tanh, softrelu and softsign, MXNet 1.9.1
# activation.cc) or when another node reads ``z``.  ``Activation(relu)``'s backward reads only
# its output, so MXNet keeps one tensor for ``z -> relu`` (it even writes the relu in place) and
# the fusion would trade ``g`` for ``z``: the same bytes for a recomputation.  Such matches are
# found only when asked (``only_freeing=False``); the operator computes them bit for bit all the
# same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

from .graph import KEEP_ATTR, Graph, Node

__all__ = ["FUSED_ACTIVATION_OP", "FusedActivation", "find_fused_activations", "is_fused_activation",
           "activation_recompute_cost", "fused_activation_cost", "fused_activation_workspace",
           "ACTIVATION_TYPES", "ACTIVATION_OPS_PER_ELEMENT", "WORKSPACE_SLOTS", "SLOT_PREFIX"]

#: ``op_type`` of the Custom operator that computes ``FullyConnected(act(z))`` (mx/fused_activation.py
#: registers it).
FUSED_ACTIVATION_OP = "mirror_fused_activation"

#: The activations the fused operator computes, per operator: ``act_type`` values.  PReLU (a learned
#: slope input) and rrelu (random slopes) are left alone.
ACTIVATION_TYPES: Dict[str, FrozenSet[str]] = {
    "LeakyReLU": frozenset({"gelu", "elu", "selu", "leaky"}),
    "Activation": frozenset({"relu", "sigmoid", "tanh", "softrelu", "softsign"}),
}

#: Operator parameters carried over to the fused node (any other parameter keeps the pair as it is).
ACTIVATION_KEYS: Dict[str, FrozenSet[str]] = {
    "LeakyReLU": frozenset({"act_type", "slope", "lower_bound", "upper_bound"}),
    "Activation": frozenset({"act_type"}),
}
PRODUCT_KEYS = frozenset({"num_hidden", "no_bias", "flatten"})

#: Activations whose backward reads only their output (NOTE [ which activations the fusion frees
#: memory for ]).
OUTPUT_ONLY_BACKWARD = frozenset({("Activation", "relu")})

#: Operations per element of one activation forward, as core/cost.py's ``forward_cost`` counts the
#: plain activation node (a test keeps the two equal).
ACTIVATION_OPS_PER_ELEMENT = {"LeakyReLU": 2.0, "Activation": 1.0}

#: Kept arrays of ``z``'s size and type outside MXNet's static plan (mx/workspace.py slots, named
#: with :data:`SLOT_PREFIX`), shared by every fused activation of one device and type: the
#: recomputed activation (its gradient goes through MXNet's array for the gradient of ``z``:
#: NOTE [ the fused activation's workspace ] in mx/fused_activation.py).
WORKSPACE_SLOTS = ("value",)
SLOT_PREFIX = "activation_"


@dataclass(frozen=True)
class FusedActivation:
    """One activation and the product that alone reads it.

    Attributes
    ----------
    activation : int
        Position of the ``LeakyReLU``/``Activation`` node.
    product : int
        Position of the ``FullyConnected`` node whose data input it is.
    source : (int, int)
        The entry the activation reads (``z``).
    op : str
        ``'LeakyReLU'`` or ``'Activation'``.
    activation_attrs : dict of str to str
        The activation's parameters (``act_type``, ``slope``...).
    product_attrs : dict of str to str
        The product's ``num_hidden``/``no_bias``/``flatten``.
    """

    activation: int
    product: int
    source: Tuple[int, int]
    op: str
    activation_attrs: Dict[str, str]
    product_attrs: Dict[str, str]


def _parameters(node: Node, allowed: FrozenSet[str]) -> Optional[Dict[str, str]]:
    """``node``'s operator parameters, or None when one is outside ``allowed``."""
    parameters = {key: value for key, value in node.attrs.items() if not key.startswith("__")}
    return parameters if set(parameters) <= allowed else None


def _reads_only_as_data(graph: Graph, product: int, activation: int) -> bool:
    inputs = graph.nodes[product].inputs
    return bool(inputs) and tuple(inputs[0]) == (activation, 0) and \
        all(entry[0] != activation for entry in inputs[1:])


def _match(graph: Graph, position: int, heads: set, consumers: List[List[int]],
           only_freeing: bool) -> Optional[FusedActivation]:
    node = graph.nodes[position]
    act_type = node.attrs.get("act_type", "leaky" if node.op == "LeakyReLU" else "")
    if act_type not in ACTIVATION_TYPES[node.op] or len(node.inputs) != 1 or position in heads:
        return None
    readers = consumers[position]
    if len(readers) != 1 or graph.nodes[readers[0]].op != "FullyConnected":
        return None
    product = readers[0]
    if not _reads_only_as_data(graph, product, position):
        return None
    if KEEP_ATTR in node.attrs or KEEP_ATTR in graph.nodes[product].attrs:
        return None
    activation_attrs = _parameters(node, ACTIVATION_KEYS[node.op])
    product_attrs = _parameters(graph.nodes[product], PRODUCT_KEYS)
    if activation_attrs is None or product_attrs is None:
        return None
    source = (node.inputs[0][0], node.inputs[0][1])
    if only_freeing and (node.op, act_type) in OUTPUT_ONLY_BACKWARD and len(consumers[source[0]]) < 2:
        return None
    return FusedActivation(activation=position, product=product, source=source, op=node.op,
                           activation_attrs={**activation_attrs, "act_type": act_type},
                           product_attrs=product_attrs)


def find_fused_activations(graph: Graph, only_freeing: bool = True) -> List[FusedActivation]:
    """Every activation of ``graph`` that one operator can compute with the product reading it.

    Parameters
    ----------
    graph : Graph
        A forward graph (shapes are not needed).
    only_freeing : bool
        Leave out the matches whose fusion frees nothing: a relu whose input nothing else reads
        (NOTE [ which activations the fusion frees memory for ]).

    Returns
    -------
    list of FusedActivation
        In topological order: activations whose output (not a graph output) is read by one node
        only, a ``FullyConnected``, as its data input, neither of them marked kept.
    """
    heads = {position for position, _ in graph.heads}
    consumers = graph.consumers()
    found = []
    for position, node in enumerate(graph.nodes):
        if node.op in ACTIVATION_TYPES:
            match = _match(graph, position, heads, consumers, only_freeing)
            if match is not None:
                found.append(match)
    return found


def is_fused_activation(node: Node) -> bool:
    """Whether ``node`` is the fused activation-and-product operator."""
    return node.op == "Custom" and node.attrs.get("op_type") == FUSED_ACTIVATION_OP


def _source_elements(graph: Graph, node: Node) -> Tuple[int, int]:
    """``(elements, bytes per element)`` of a fused node's input ``z`` (0 when shapes are unknown)."""
    source, output = node.inputs[0]
    producer = graph.nodes[source]
    if output >= len(producer.output_shapes):
        return 0, producer.itemsize
    return math.prod(producer.output_shapes[output]), producer.itemsize


def activation_recompute_cost(graph: Graph, node: Node) -> float:
    """Estimated operations the fused node's backward adds: one forward of its activation, counted
    as :func:`~.cost.forward_cost` counts the plain activation node."""
    elements, _ = _source_elements(graph, node)
    return elements * ACTIVATION_OPS_PER_ELEMENT[node.attrs.get("act_op", "LeakyReLU")]


def fused_activation_cost(graph: Graph, node: Node) -> float:
    """Estimated operations of one forward of the fused node: its activation and its product
    (``2 * outputs * in_features``, as ``forward_cost`` counts a ``FullyConnected``)."""
    weight = node.inputs[1]
    shapes = graph.nodes[weight[0]].output_shapes
    in_features = shapes[weight[1]][1] if weight[1] < len(shapes) and len(shapes[weight[1]]) > 1 else 1
    return 2.0 * node.numel * in_features + activation_recompute_cost(graph, node)


def fused_activation_workspace(graph: Graph) -> int:
    """Bytes the fused operators keep outside MXNet's static plan (one device).

    One array per :data:`WORKSPACE_SLOTS` slot and element type, each as large as the largest
    input ``z`` of a fused node of that type, shared by all of them and kept from the first call
    on.  This counts gradients MXNet asks to be written (``'write'``, the training default); an
    input whose gradient is accumulated (``grad_req='add'``) or not wanted adds one kept buffer
    of its shape.
    """
    largest: Dict[int, int] = {}
    for node in graph.nodes:
        if is_fused_activation(node):
            elements, itemsize = _source_elements(graph, node)
            largest[itemsize] = max(largest.get(itemsize, 0), elements)
    return sum(len(WORKSPACE_SLOTS) * elements * itemsize for itemsize, elements in largest.items())
