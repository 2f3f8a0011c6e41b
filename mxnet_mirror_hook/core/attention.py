"""The core attention of a transformer layer, found on a :class:`~.graph.Graph` (pure Python).

The core attention is the part of self-attention whose tensors are ``batch x heads x seq x seq``:
the query-key product, the softmax (with its valid lengths, if any), the Dropout of the attention
probabilities and the product with the values.  :func:`find_core_attention` finds it in MXNet's
interleaved form (gluonnlp 0.10's BERT, :func:`mxnet_mirror_hook.testing.models.bert_mlm`)::

    scores = _contrib_interleaved_matmul_selfatt_qk(qkv, heads)
    probs  = softmax(scores[, length], axis=-1[, use_length=True])
    probs  = Dropout(probs, p)                      # optional
    out    = _contrib_interleaved_matmul_selfatt_valatt(qkv, probs, heads)

so that :mod:`mxnet_mirror_hook.mx.attention` can replace it by one operator that keeps only its
input (NOTE [ core attention in one operator ] there).  Nodes are positions in the graph (which
are positions in MXNet's JSON: NOTE [ nodes are identified by key, not by name ] in graph.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .graph import Graph, Node

__all__ = ["CoreAttention", "find_core_attention", "CORE_ATTENTION_OP", "is_core_attention",
           "core_attention_cost", "core_attention_recompute_cost", "core_attention_workspace",
           "SQUARE_TEMPORARIES", "DEFAULT_PASS_MB", "sequences_per_pass"]

#: ``op_type`` of the Custom operator that computes a core attention (mx/attention.py registers it).
CORE_ATTENTION_OP = "mirror_core_attention"

QK_OP = "_contrib_interleaved_matmul_selfatt_qk"
VALATT_OP = "_contrib_interleaved_matmul_selfatt_valatt"

#: Identities taken in between the softmax and the product with the values.
COPY_OPS = frozenset({"_copy", "identity"})

#: Softmax parameters the rewrite carries over (others, such as ``dtype``, keep the node as it is).
SOFTMAX_KEYS = frozenset({"axis", "temperature", "use_length"})

#: batch x heads x seq x seq float32 buffers the operators keep (the scores and then their
#: gradient, the probabilities, the probabilities' gradient; with dropout the float mask too):
#: NOTE [ what the core attention operator allocates ] in mx/attention.py.
SQUARE_TEMPORARIES = {False: 3, True: 4}

#: The fused operator runs over as many sequences at once as keep one batch x heads x seq x seq
#: float32 temporary within this many MB (at least one sequence).
DEFAULT_PASS_MB = 16.0

MB = 1 << 20


def sequences_per_pass(pass_mb: float, heads: int, seq: int) -> int:
    """Sequences the fused operator takes in one pass: its s^2 temporaries within ``pass_mb``."""
    return max(1, int(pass_mb * MB // (4 * heads * seq * seq)))


@dataclass(frozen=True)
class CoreAttention:
    """One core attention: positions of its nodes and what the fused operator needs.

    Attributes
    ----------
    qk, softmax, valatt : int
        Positions of the query-key product, the softmax and the product with the values.
    dropout : int or None
        Position of the Dropout of the probabilities, if any.
    qkv : (int, int)
        The interleaved query-key-value entry both products read.
    length : (int, int) or None
        The softmax's length entry (``use_length=True``).
    heads : int
        Attention heads.
    softmax_attrs : dict of str to str
        The softmax's ``axis``/``temperature``/``use_length``.
    p : float
        Dropout probability (0 without Dropout).
    mode : str
        The Dropout's ``mode`` (``'training'`` or ``'always'``).
    copies : tuple of int
        Positions of identities between the softmax and the product with the values (Gluon's
        ``Dropout(0.0)`` is a ``_copy``; a Dropout of ``p=0`` copies too), taken in.
    """

    qk: int
    softmax: int
    valatt: int
    dropout: Optional[int]
    qkv: Tuple[int, int]
    length: Optional[Tuple[int, int]]
    heads: int
    softmax_attrs: Dict[str, str]
    p: float = 0.0
    mode: str = "training"
    copies: Tuple[int, ...] = ()

    @property
    def removed(self) -> Tuple[int, ...]:
        """Positions the fused operator replaces besides :attr:`valatt`."""
        return ((self.qk, self.softmax) + ((self.dropout,) if self.dropout is not None else ())
                + self.copies)


def _only_reader(graph: Graph, position: int, reader: int, heads: set) -> bool:
    """Whether ``reader`` is the only node reading ``position`` (output 0 only) and no graph
    output is ``position``."""
    if position in heads:
        return False
    readers = graph.consumers()[position]
    if readers != [reader]:
        return False
    return all(entry[1] == 0 for entry in graph.nodes[reader].inputs if entry[0] == position)


def _last_axis(attrs: Dict[str, str]) -> bool:
    return attrs.get("axis", "-1").strip() in ("-1", "2")


def _dropout_of(graph: Graph, node: Node, position: int, reader: int,
                heads: set) -> Optional[Tuple[float, str]]:
    """``(p, mode)`` of a Dropout the fused operator can take in, else None."""
    attrs = node.attrs
    if attrs.get("axes", "()").strip() not in ("", "()", "[]"):
        return None
    if not _only_reader(graph, position, reader, heads):
        return None
    return float(attrs.get("p", "0.5")), attrs.get("mode", "training")


def _is_copy(node: Node) -> bool:
    """An identity: ``_copy`` (Gluon's ``Dropout(0.0)``, ``identity``) or a Dropout of ``p=0``."""
    if node.op in COPY_OPS:
        return True
    return node.op == "Dropout" and float(node.attrs.get("p", "0.5")) == 0.0


def _skip_copies(graph: Graph, position: int, reader: int,
                 heads: set) -> Optional[Tuple[int, int, Tuple[int, ...]]]:
    """``(position, its reader, the copies passed)`` walking back from ``position`` (read by
    ``reader``) through identities only it reads; None when one is read elsewhere."""
    copies: List[int] = []
    while _is_copy(graph.nodes[position]) and len(graph.nodes[position].inputs) == 1:
        if not _only_reader(graph, position, reader, heads):
            return None
        entry = graph.nodes[position].inputs[0]
        if entry[1] != 0:
            return None
        copies.append(position)
        position, reader = entry[0], position
    return position, reader, tuple(copies)


def _match(graph: Graph, valatt: int, heads: set, with_dropout: bool) -> Optional[CoreAttention]:
    node = graph.nodes[valatt]
    if len(node.inputs) != 2:
        return None
    qkv: Tuple[int, int] = (node.inputs[0][0], node.inputs[0][1])
    probs_entry = tuple(node.inputs[1])
    dropout: Optional[int] = None
    p, mode = 0.0, "training"
    if probs_entry[1] != 0:
        return None
    walked = _skip_copies(graph, probs_entry[0], valatt, heads)
    if walked is None:
        return None
    position, reader, copies = walked
    if graph.nodes[position].op == "Dropout":
        if not with_dropout:
            return None
        found = _dropout_of(graph, graph.nodes[position], position, reader, heads)
        if found is None:
            return None
        dropout, (p, mode) = position, found
        entry = graph.nodes[position].inputs[0]
        if entry[1] != 0:
            return None
        walked = _skip_copies(graph, entry[0], dropout, heads)
        if walked is None:
            return None
        position, reader, before = walked
        copies += before
    softmax = graph.nodes[position]
    if (softmax.op != "softmax" or not _last_axis(softmax.attrs)
            or not _only_reader(graph, position, reader, heads)):
        return None
    if set(softmax.attrs) - SOFTMAX_KEYS - {key for key in softmax.attrs if key.startswith("__")}:
        return None
    use_length = softmax.attrs.get("use_length", "False") in ("True", "true", "1")
    if len(softmax.inputs) != (2 if use_length else 1) or softmax.inputs[0][1] != 0:
        return None
    qk = softmax.inputs[0][0]
    qk_node = graph.nodes[qk]
    if (qk_node.op != QK_OP or tuple(qk_node.inputs[0]) != qkv
            or qk_node.attrs.get("heads") != node.attrs.get("heads")
            or not _only_reader(graph, qk, position, heads)):
        return None
    return CoreAttention(qk=qk, softmax=position, valatt=valatt, dropout=dropout, qkv=qkv,
                         length=(softmax.inputs[1][0], softmax.inputs[1][1]) if use_length else None,
                         heads=int(node.attrs["heads"]),
                         softmax_attrs={k: v for k, v in softmax.attrs.items() if k in SOFTMAX_KEYS},
                         p=p, mode=mode, copies=copies)


def find_core_attention(graph: Graph, with_dropout: bool = False) -> List[CoreAttention]:
    """Every core attention of ``graph`` that one operator can replace, in topological order.

    Parameters
    ----------
    graph : Graph
        A forward graph (shapes are not needed).
    with_dropout : bool
        Take in a Dropout between the softmax and the product with the values (its mask is then
        drawn by the fused operator, not by MXNet's Dropout: ``recompute_dropout``).  Without it
        such attentions are left alone.

    Returns
    -------
    list of CoreAttention
        Matches whose intermediate nodes nothing else reads (and no graph output is).
    """
    heads = {position for position, _ in graph.heads}
    found = []
    for position, node in enumerate(graph.nodes):
        if node.op == VALATT_OP:
            match = _match(graph, position, heads, with_dropout)
            if match is not None:
                found.append(match)
    return found


def is_core_attention(node: Node) -> bool:
    """Whether ``node`` is the fused core-attention operator."""
    return node.op == "Custom" and node.attrs.get("op_type") == CORE_ATTENTION_OP


def _square_elements(graph: Graph, node: Node) -> Tuple[float, float, int]:
    """``(batch x heads x seq x seq, the same for one pass, hidden)`` of a fused core attention."""
    source, output = node.inputs[0]
    shapes = graph.nodes[source].output_shapes
    if output >= len(shapes) or len(shapes[output]) != 3:
        return 0.0, 0.0, 0
    seq, batch, width = shapes[output]
    heads = int(node.attrs.get("heads", "1"))
    per_pass = min(batch, sequences_per_pass(float(node.attrs.get("pass_mb", DEFAULT_PASS_MB)), heads, seq))
    return float(batch * heads * seq * seq), float(per_pass * heads * seq * seq), width // 3


def core_attention_cost(graph: Graph, node: Node) -> float:
    """Estimated operations of one forward of a fused core attention (both products, the softmax
    and the dropout), as :func:`~.cost.forward_cost` counts them."""
    square, _, hidden = _square_elements(graph, node)
    heads = int(node.attrs.get("heads", "1"))
    per_head = hidden // max(heads, 1)
    products = 2 * 2.0 * square * per_head
    dropout = 2.0 * square if float(node.attrs.get("p", "0")) > 0 else 0.0
    return products + 5.0 * square + dropout


def core_attention_recompute_cost(graph: Graph, node: Node) -> float:
    """Estimated operations a fused core attention's backward adds: the query-key product, the
    softmax and the dropout's product run again (not the product with the values: its backward
    reads the probabilities, not its output; NOTE [ core attention in one operator ])."""
    square, _, hidden = _square_elements(graph, node)
    per_head = hidden // max(int(node.attrs.get("heads", "1")), 1)
    dropout = 2.0 * square if float(node.attrs.get("p", "0")) > 0 else 0.0
    return 2.0 * square * per_head + 5.0 * square + dropout


def core_attention_workspace(graph: Graph) -> Tuple[int, int]:
    """Bytes the fused operators allocate outside MXNet's static plan:
    ``(the largest pass's float32 temporaries, the kept dropout masks of all of them)``.

    The masks are kept as bits (NOTE [ the attention dropout's mask ] in mx/attention.py); the
    temporaries live one pass of one operator at a time.
    """
    temporaries = masks = 0
    for node in graph.nodes:
        if not is_core_attention(node):
            continue
        square, per_pass, _ = _square_elements(graph, node)
        dropped = float(node.attrs.get("p", "0")) > 0
        temporaries = max(temporaries, int(SQUARE_TEMPORARIES[dropped] * per_pass * 4))
        if dropped:
            masks += int(math.ceil(square / 8))
    return temporaries, masks
