"""A LayerNorm read by a FullyConnected, found on a :class:`~.graph.Graph` (pure Python).

In a post-norm transformer layer (gluonnlp 0.10's BERT,
:func:`mxnet_mirror_hook.testing.models.bert_mlm`) every ``x = LayerNorm(r)`` is read by one
FullyConnected (the next layer's query-key-value projection, or the first feed-forward
projection) and by the residual sum of the next sublayer::

    x   = LayerNorm(r, gamma, beta)
    out = FullyConnected(x, weight, bias)
    ... elemwise_add(x, sublayer(out)) ...

MXNet keeps ``r`` (and LayerNorm's mean and standard deviation) for LayerNorm's backward and
``x`` for the FullyConnected's weight gradient; the sum's backward reads nothing.
:func:`find_layer_norm_fusions` finds the pairs that :mod:`mxnet_mirror_hook.mx.fused_layer_norm`
replaces by one operator that keeps only ``r`` and recomputes ``x`` in backward (NOTE [ LayerNorm
recomputed inside the product that reads it ] there).  Nodes are positions in the graph (which are
positions in MXNet's JSON: NOTE [ nodes are identified by key, not by name ] in graph.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from .graph import KEEP_ATTR, Graph, Node

__all__ = ["LayerNormFusion", "find_layer_norm_fusions", "FUSED_LAYER_NORM_OP", "is_fused_layer_norm",
           "NOTHING_READING_OPS", "LAYER_NORM_KEYS", "FULLY_CONNECTED_KEYS", "layer_norm_recompute_cost",
           "fused_layer_norm_forward_cost", "fused_layer_norm_workspace", "variable_order", "SLOT_PREFIX"]

#: ``op_type`` of the Custom operator that computes LayerNorm and FullyConnected (mx/fused_layer_norm.py
#: registers it).
FUSED_LAYER_NORM_OP = "mirror_layer_norm_fc"

#: Operators whose backward reads none of their inputs (MXNet 1.9.1: ``elemwise_add`` and its aliases
#: ``_add``/``_plus``/``_Plus`` clone the output gradient, ``broadcast_add``/``broadcast_plus`` use
#: ``ElemwiseGradUseNone``, ``add_n``/``ElementWiseSum`` copy it).  Only such readers may share the
#: normalized output with the FullyConnected: another reader would make MXNet keep it anyway.
NOTHING_READING_OPS = frozenset({"elemwise_add", "_add", "_plus", "_Plus", "broadcast_add",
                                 "broadcast_plus", "add_n", "ElementWiseSum"})

#: Parameters of LayerNorm and FullyConnected the fused operator carries over (a node with any other
#: parameter is left alone).
LAYER_NORM_KEYS = frozenset({"axis", "eps", "output_mean_var"})
FULLY_CONNECTED_KEYS = frozenset({"num_hidden", "no_bias", "flatten"})

#: Slot names of the fused operator's kept buffers in mx/workspace.py start with this.
SLOT_PREFIX = "layer_norm_"

#: Per element of ``r``: what :func:`~.cost.forward_cost` counts for LayerNorm.
LAYER_NORM_PER_ELEMENT = 8.0


@dataclass(frozen=True)
class LayerNormFusion:
    """One LayerNorm and the FullyConnected that reads it.

    Attributes
    ----------
    layer_norm, fc : int
        Positions of the LayerNorm and of the FullyConnected.
    inputs : tuple of (int, int)
        Entries the fused operator reads: LayerNorm's data, gamma and beta, then the
        FullyConnected's weight (and bias unless ``no_bias``).
    others : tuple of int
        Positions of the other readers of the normalized output (sums), in order.
    layer_norm_attrs, fc_attrs : dict of str to str
        The two operators' parameters (user attributes ``__...__`` not included).
    """

    layer_norm: int
    fc: int
    inputs: Tuple[Tuple[int, int], ...]
    others: Tuple[int, ...]
    layer_norm_attrs: Dict[str, str]
    fc_attrs: Dict[str, str]

    @property
    def normalized_read(self) -> bool:
        """Whether anything but the FullyConnected reads the normalized output."""
        return bool(self.others)


def _parameters(node: Node, keys: frozenset) -> Optional[Dict[str, str]]:
    """``node``'s parameters if all are in ``keys`` (user attributes aside), else None."""
    params = {key: value for key, value in node.attrs.items() if not key.startswith("__")}
    return params if set(params) <= keys else None


def _match(graph: Graph, position: int, heads: Set[Tuple[int, int]],
           consumers: List[List[int]]) -> Optional[LayerNormFusion]:
    node = graph.nodes[position]
    if len(node.inputs) != 3 or any(source == position for source, _ in heads):
        return None
    layer_norm_attrs = _parameters(node, LAYER_NORM_KEYS)
    if layer_norm_attrs is None:
        return None
    fcs, others = [], []
    for reader in consumers[position]:
        entries = [(index, output) for index, (source, output) in enumerate(graph.nodes[reader].inputs)
                   if source == position]
        if any(output != 0 for _, output in entries):
            return None  # the mean or the standard deviation is read
        op = graph.nodes[reader].op
        if op == "FullyConnected" and [index for index, _ in entries] == [0]:
            fcs.append(reader)
        elif op in NOTHING_READING_OPS:
            others.append(reader)
        else:
            return None
    if len(fcs) != 1:
        return None
    fc = graph.nodes[fcs[0]]
    if KEEP_ATTR in node.attrs or KEEP_ATTR in fc.attrs:
        return None  # marked kept by another rewrite
    fc_attrs = _parameters(fc, FULLY_CONNECTED_KEYS)
    if fc_attrs is None or len(fc.inputs) not in (2, 3):
        return None
    inputs = tuple(tuple(entry) for entry in node.inputs) + tuple(tuple(entry) for entry in fc.inputs[1:])
    return LayerNormFusion(layer_norm=position, fc=fcs[0], inputs=inputs,  # type: ignore[arg-type]
                           others=tuple(others), layer_norm_attrs=layer_norm_attrs, fc_attrs=fc_attrs)


def find_layer_norm_fusions(graph: Graph) -> List[LayerNormFusion]:
    """Every LayerNorm of ``graph`` that one operator with its FullyConnected can replace.

    A LayerNorm qualifies when its output is read by exactly one FullyConnected (as its data)
    and otherwise only by operators whose backward reads nothing (:data:`NOTHING_READING_OPS`),
    its mean and standard deviation are not read, its output is not a graph output, neither
    it nor the FullyConnected is marked kept (KEEP_ATTR), and
    replacing it keeps the order MXNet lists the arguments in (:func:`variable_order`).

    Parameters
    ----------
    graph : Graph
        A forward graph (shapes are not needed).

    Returns
    -------
    list of LayerNormFusion
        In topological order of the LayerNorms.
    """
    heads = set(graph.heads)
    consumers = graph.consumers()
    plain = variable_order(graph)
    found: List[LayerNormFusion] = []
    for position, node in enumerate(graph.nodes):
        if node.op != "LayerNorm":
            continue
        match = _match(graph, position, heads, consumers)
        if match is not None and variable_order(graph, found + [match]) == plain:
            found.append(match)
    return found


def variable_order(graph: Graph, fusions: Sequence[LayerNormFusion] = ()) -> List[int]:
    """Positions of the variables in the order nnvm's depth-first walk from the outputs meets them
    (the order of ``list_arguments``), with ``fusions`` replaced by their fused operators.

    A fused operator reads LayerNorm's inputs, then the FullyConnected's weight and bias; when the
    walk meets the LayerNorm through a sum before it meets the FullyConnected, the weight and
    bias would be listed earlier than in the plain graph unless nothing is listed in between.
    """
    redirect = {fusion.layer_norm: fusion.fc for fusion in fusions}
    fused_inputs = {fusion.fc: [source for source, _ in fusion.inputs] for fusion in fusions}

    def inputs_of(position: int) -> List[int]:
        sources = fused_inputs.get(position, [source for source, _ in graph.nodes[position].inputs])
        return [redirect.get(source, source) for source in sources]

    order: List[int] = []
    visited: Set[int] = set()
    for head, _ in graph.heads:
        start = redirect.get(head, head)
        if start in visited:
            continue
        visited.add(start)
        stack = [(start, iter(inputs_of(start)))]
        while stack:
            position, pending = stack[-1]
            following = next((s for s in pending if s not in visited), None)
            if following is None:
                stack.pop()
                if not graph.nodes[position].inputs and graph.nodes[position].op == "null":
                    order.append(position)
                continue
            visited.add(following)
            stack.append((following, iter(inputs_of(following))))
    return order


def is_fused_layer_norm(node: Node) -> bool:
    """Whether ``node`` is the fused LayerNorm-FullyConnected operator."""
    return node.op == "Custom" and node.attrs.get("op_type") == FUSED_LAYER_NORM_OP


def _normalized_shape(graph: Graph, node: Node) -> Tuple[int, ...]:
    source, output = node.inputs[0]
    shapes = graph.nodes[source].output_shapes
    return tuple(shapes[output]) if output < len(shapes) else ()


def layer_norm_recompute_cost(graph: Graph, node: Node) -> float:
    """Operations of the LayerNorm forward a fused operator runs again in backward, as
    :func:`~.cost.forward_cost` counts a LayerNorm (per element of its output)."""
    return LAYER_NORM_PER_ELEMENT * math.prod(_normalized_shape(graph, node) or (0,))


def fused_layer_norm_forward_cost(graph: Graph, node: Node) -> float:
    """Operations of one forward of a fused operator: its LayerNorm and its FullyConnected, as
    :func:`~.cost.forward_cost` counts them."""
    shape = _normalized_shape(graph, node)
    if not shape:
        return 0.0
    flatten = node.attrs.get("flatten", "True") in ("True", "true", "1")
    in_features = math.prod(shape[1:]) if flatten else shape[-1]
    rows = math.prod(shape) // max(in_features, 1)
    product = 2.0 * rows * int(node.attrs.get("num_hidden", "0")) * in_features
    return layer_norm_recompute_cost(graph, node) + product


def fused_layer_norm_workspace(graph: Graph) -> int:
    """Bytes the fused operators of ``graph`` allocate outside MXNet's static plan.

    NOTE [ what the fused LayerNorm operator allocates ] in mx/fused_layer_norm.py: four buffers
    per dtype kept between calls and shared by every operator, each grown to the largest
    request: the recomputed normalized output and the gradient reaching it (the largest
    LayerNorm input) and the recomputed mean and standard deviation (that input with its
    normalized axis 1).  Parameters whose gradient is accumulated (``grad_req='add'``) or not
    wanted (``'null'``) add one buffer of their shape each; this counts ``'write'``.
    """
    largest: Dict[int, Tuple[int, int]] = {}
    for node in graph.nodes:
        shape = _normalized_shape(graph, node) if is_fused_layer_norm(node) else ()
        if shape:
            elements = math.prod(shape)
            moments = elements // max(shape[int(node.attrs.get("axis", "-1")) % len(shape)], 1)
            data, stats = largest.get(node.itemsize, (0, 0))
            largest[node.itemsize] = (max(data, elements), max(stats, moments))
    return sum((2 * data + 2 * stats) * itemsize for itemsize, (data, stats) in largest.items())
