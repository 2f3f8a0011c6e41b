"""The loss head a chain can run in row chunks (NOTE [ chunked loss head ]): finding it, its
chunks and tiles, the buffers it holds, and a plan whose last segment is exactly the head."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

from ..graph import Graph, NodeKind
from ..planners.dp import DEFAULT_GRAD_FACTOR, CutChain
from .crossings import crossings_of
from .cuts import choose_cuts, full_cut_chain, segment_plan_for_cuts
from .plan import Entry, SegmentPlan

__all__ = ["HEAD_CHUNK_BYTES", "HEAD_ROW_MULTIPLE", "LossHead", "loss_head", "head_buffer_floats",
           "head_tile", "head_chunk_rows", "head_chunk_count", "plan_segments_with_head"]


# NOTE [ chunked loss head ]
# A language model's loss head, FullyConnected over every step's output (N rows
# of H) to a vocabulary of V followed by SoftmaxOutput, plans about 2 * N * V
# floats in one segment (the classifier output and its gradient; 244 MB for
# 3200 x 10000), far above the recurrent segments.  Both operators are row-wise
# when the classifier's input is (N, H): row r of the output needs row r of the
# input only.  So the last segment can run in row chunks instead of one
# executor (mx/segments/head.py, ``ChunkedHead``):
#
#   forward   for each chunk: FullyConnected of its rows into one (c, V) work
#             buffer, SoftmaxOutput of that into the chunk's rows of the one
#             (N, V) output array Module keeps (metrics read outputs after
#             backward, so the full softmax output stays);
#   backward  by tiles: column blocks of the classes (as many as row chunks)
#             times about sqrt(chunks) row parts (:func:`head_tile`).  A tile's
#             block of SoftmaxOutput's gradient, ``(output - one_hot(label)) *
#             scale`` with ignored rows zeroed, needs only the kept output and the
#             labels (the same float32 operations as MXNet's kernel:
#             bit-identical, tested); FullyConnected's own backward kernel on the
#             tile (MKLDNN's here: ``dot`` products ran four times slower on this
#             CPU build) with the block's rows of the weight gives the tile's
#             partial input gradient (its rows) and partial weight and bias
#             gradients (the block's rows), each written in place by the first
#             tile that reaches it and added by the others through one
#             tile-sized buffer.  Row chunks alone would need a (V, H) buffer for
#             the weight gradient (MXNet's imperative operators cannot add into
#             an output: 19.5 MB of the vocabulary-10000 language model), column
#             blocks alone an (N, H) one for the input's.
#
# The head then holds N * V (output) + max(c * V, tile) (work) + tile (the
# labels' one-hot) + the partial gradients' tile-sized buffers, instead of
# MXNet's plan of the whole head, all allocated at bind by the chain and counted
# in the static figure (NOTE [ static memory of a segment plan ] in
# mx/segments/measure.py; :func:`head_buffer_floats`).  Exactness: the outputs are
# bit-identical to the head as one executor (tests/api/test_segments_head.py)
# when the chunk rows are a multiple of HEAD_ROW_MULTIPLE; the gradients are
# sums over tiles, so they differ from the one-GEMM kernel in float32 rounding
# (~1e-7 relative; with one tile they are bit-identical, tested).
# SoftmaxOutput's normalization is applied over the whole batch: 'batch' and
# 'valid' divide by the full row count (or the count of labels other than
# ignore_label, counted over all rows), folded into each chunk's grad_scale
# exactly as MXNet computes the factor (float32 grad_scale / count).  Forms
# whose gradient is not row-local or not a function of the output and label
# alone (multi_output, preserve_shape, out_grad, smooth_alpha, probability
# labels) are refused by :func:`loss_head` with the reason, and the plan keeps
# an unchunked last segment.

#: Target bytes of a chunk's (rows, V) work buffer.
HEAD_CHUNK_BYTES = 4 * 2 ** 20

#: Operators that merge per-step outputs into one tensor without computing.
_MERGE_OPS = frozenset({"expand_dims", "Concat", "concat", "stack", "Reshape", "reshape", "Flatten",
                        "flatten"})

#: Operators that only reshape the label (row-major order kept) on its way to SoftmaxOutput.
_LABEL_RESHAPES = frozenset({"Reshape", "reshape", "Flatten", "flatten", "squeeze", "expand_dims"})


def _flag(attrs: Mapping[str, str], name: str) -> bool:
    return str(attrs.get(name, "False")).strip().lower() in ("true", "1")


@dataclass(frozen=True)
class LossHead:
    """A FullyConnected + SoftmaxOutput loss head that can run in row chunks.

    Attributes
    ----------
    fc, softmax : str
        Node names of the classifier and of the loss.
    data : Entry
        The classifier's input tensor, (rows, hidden).
    weight, bias : str
        Parameter variables (bias None with ``no_bias``).
    label : str
        The label variable (reshaped to (rows,) on the way, if at all).
    rows, hidden, classes : int
        N, H and V.
    fc_attrs, softmax_attrs : dict
        Operator parameters as MXNet's JSON gives them.
    """

    fc: str
    softmax: str
    data: Entry
    weight: str
    bias: Optional[str]
    label: str
    rows: int
    hidden: int
    classes: int
    fc_attrs: Dict[str, str]
    softmax_attrs: Dict[str, str]

    @property
    def nodes(self) -> FrozenSet[str]:
        """The two operators the head computes."""
        return frozenset({self.fc, self.softmax})


def head_buffer_floats(rows: int, hidden: int, classes: int, chunks: int, data_req: str,
                       weight_req: str, bias_req: str) -> Dict[str, int]:
    """Floats of each buffer a chunked head allocates beside its (rows, classes) output
    (NOTE [ chunked loss head ]): ``work`` (a row chunk's classifier output in forward, a
    tile's loss gradient in backward), ``one_hot`` (the tile's labels), ``data_work`` (a
    tile's partial input gradient), ``weight_work`` / ``bias_work`` (a tile's partial weight
    and bias gradient rows)."""
    step = head_chunk_rows(rows, chunks)
    tile_rows, block = head_tile(rows, classes, chunks)
    row_parts, blocks = -(-rows // tile_rows), -(-classes // block)
    return {"work": max(step * classes, tile_rows * block), "one_hot": tile_rows * block,
            "data_work": tile_rows * hidden if (blocks > 1 or data_req == "add") else 0,
            "weight_work": block * hidden if (row_parts > 1 or weight_req != "write") else 0,
            "bias_work": block if (row_parts > 1 or bias_req != "write") else 0}


def head_tile(rows: int, classes: int, chunks: int) -> Tuple[int, int]:
    """Rows and classes of a tile of a chunked head's backward: ``chunks`` column blocks of the
    classes, and about sqrt(chunks) row parts (a multiple of HEAD_ROW_MULTIPLE rows), so that a
    tile's partial input and weight gradients are small (NOTE [ chunked loss head ])."""
    block = max(1, -(-classes // max(1, chunks)))
    return head_chunk_rows(rows, math.ceil(math.sqrt(max(1, chunks)))), block


def loss_head(graph: Graph) -> Tuple[Optional[LossHead], str]:
    """The graph's FullyConnected + SoftmaxOutput loss head, or None and why it cannot be chunked.

    See NOTE [ chunked loss head ].
    """
    if len(graph.heads) != 1:
        return None, "the graph has several outputs"
    sm_index, _ = graph.heads[0]
    softmax = graph.nodes[sm_index]
    if softmax.op != "SoftmaxOutput":
        return None, f"the output is {softmax.op}, not SoftmaxOutput"
    attrs = dict(softmax.attrs)
    refusal = _softmax_refusal(attrs)
    if refusal:
        return None, refusal
    if len(softmax.inputs) != 2:
        return None, "SoftmaxOutput without a label input"
    (fc_index, fc_out), (label_index, _) = softmax.inputs
    fc = graph.nodes[fc_index]
    if fc.op != "FullyConnected" or fc_out != 0:
        return None, "SoftmaxOutput does not read a FullyConnected"
    consumers = graph.consumers()
    if consumers[fc_index] != [sm_index]:
        return None, "the classifier's output has other readers"
    label = graph.nodes[label_index]
    while label.kind is NodeKind.OP:
        if label.op not in _LABEL_RESHAPES or len(label.inputs) != 1:
            return None, f"the label is computed ({label.op}), not a reshaped variable"
        label = graph.nodes[label.inputs[0][0]]
    fc_attrs = dict(fc.attrs)
    no_bias = _flag(fc_attrs, "no_bias")
    if len(fc.inputs) != (2 if no_bias else 3):
        return None, "unexpected FullyConnected inputs"
    data_index, data_out = fc.inputs[0]
    weight = graph.nodes[fc.inputs[1][0]]
    bias = None if no_bias else graph.nodes[fc.inputs[2][0]]
    if weight.kind is not NodeKind.PARAM or (bias is not None and bias.kind is not NodeKind.PARAM):
        return None, "the classifier's weight or bias is computed, not a parameter"
    if graph.nodes[data_index].kind is not NodeKind.OP:
        return None, "the classifier reads a variable directly (nothing to split before it)"
    data_shapes = graph.nodes[data_index].output_shapes
    data_shape = tuple(data_shapes[data_out]) if data_out < len(data_shapes) else ()
    out_shape = tuple(fc.output_shapes[0]) if fc.output_shapes else ()
    if len(data_shape) != 2 or len(out_shape) != 2 or data_shape[0] != out_shape[0]:
        return None, f"the classifier's input {data_shape} is not (rows, hidden)"
    label_shape = tuple(label.output_shapes[0]) if label.output_shapes else ()
    if math.prod(label_shape) != out_shape[0]:
        return None, f"the label {label_shape} is not one class per row (probability labels?)"
    return LossHead(fc.name, softmax.name, (graph.nodes[data_index].name, data_out), weight.name,
                    bias.name if bias is not None else None, label.name, out_shape[0], data_shape[1],
                    out_shape[1], fc_attrs, attrs), ""


def _softmax_refusal(attrs: Mapping[str, str]) -> str:
    """Why a SoftmaxOutput with these parameters cannot be chunked ('' when it can)."""
    for name in ("multi_output", "preserve_shape", "out_grad"):
        if _flag(attrs, name):
            return f"SoftmaxOutput has {name}=True (its gradient is not row-local as chunked)"
    if float(attrs.get("smooth_alpha", 0.0) or 0.0) != 0.0:
        return "SoftmaxOutput has smooth_alpha (label smoothing is not chunked)"
    if attrs.get("normalization", "null") not in ("null", "batch", "valid"):
        return f"unknown SoftmaxOutput normalization {attrs.get('normalization')!r}"
    return ""


#: Chunk rows are a multiple of this: CPU GEMM kernels (MKLDNN, OpenBLAS) give a row other bits
#: when the row count is not (measured: 13-row chunks of a 64 x 16 x 20000 product differ in the
#: last bit from the whole product, 16-row chunks do not; 96-200-row chunks of 3200 x 512 x
#: 10000 match too).
HEAD_ROW_MULTIPLE = 16


def head_chunk_rows(rows: int, chunks: int) -> int:
    """Rows per chunk when ``rows`` are split in (at most) ``chunks`` chunks."""
    step = -(-rows // max(1, chunks))
    step = -(-step // HEAD_ROW_MULTIPLE) * HEAD_ROW_MULTIPLE
    return max(1, min(rows, step))


def head_chunk_count(head: LossHead, chunk_bytes: Optional[int] = None) -> int:
    """Row chunks for a head: work buffers of about ``chunk_bytes`` (default
    :data:`HEAD_CHUNK_BYTES`; 0 when one chunk would do)."""
    chunk_bytes = HEAD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(HEAD_ROW_MULTIPLE, chunk_bytes // (4 * head.classes) // HEAD_ROW_MULTIPLE
               * HEAD_ROW_MULTIPLE)
    chunks = -(-head.rows // rows)
    return chunks if chunks > 1 else 0


def plan_segments_with_head(graph: Graph, count: int, head: LossHead,
                            grad_factor: float = DEFAULT_GRAD_FACTOR,
                            chain: Optional[CutChain] = None) -> SegmentPlan:
    """A plan with (at most) ``count`` segments whose last one is exactly the loss head, run in
    :func:`head_chunk_count` row chunks (NOTE [ chunked loss head ])."""
    late = graph.as_late_as_possible()
    crossings = crossings_of(late)
    position = {node.name: p for p, node in enumerate(late.nodes)}
    first_head = min(position[head.fc], position[head.softmax])
    owned_before = [p for p in range(first_head) if crossings.owned[p]]
    if not owned_before:
        raise ValueError("nothing to compute before the loss head")
    head_cut = owned_before[-1]
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    # choose_cuts spreads the working set of the whole graph; the head's share is large, so ask
    # for proportionally more pieces to get about ``count - 1`` before the head.
    before, total = chain.need_prefix[head_cut + 1], chain.need_prefix[-1]
    scaled = max(1, math.ceil((count - 1) * total / before)) if before > 0 else count - 1
    cuts = {c for c in choose_cuts(graph, min(scaled, len(late.nodes)), chain, grad_factor)
            if c < head_cut} | {head_cut}
    # The operators that merge the steps into the head's input (an unrolled RNN's expand_dims
    # + Concat + Reshape) get a segment of their own: with the last steps they planned 51-57 MB
    # against 36-43 for the other segments (the merged tensor and its gradient's split).
    merge = head_cut
    while merge > 0 and (not crossings.owned[merge] or late.nodes[merge].op in _MERGE_OPS):
        merge -= 1
    if merge < head_cut and crossings.owned[merge] and crossings.valid(merge):
        cuts = {c for c in cuts if c < merge} | {merge, head_cut}
    plan = segment_plan_for_cuts(graph, sorted(cuts), chain, grad_factor)
    if set(plan.segments[-1].nodes) - {n for n in plan.segments[-1].nodes
                                       if late.node(n).op in _LABEL_RESHAPES} != head.nodes:
        raise ValueError("the last segment is not exactly the loss head")
    return plan.with_head_chunks(max(2, head_chunk_count(head)))
