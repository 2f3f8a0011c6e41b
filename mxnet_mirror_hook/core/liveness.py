"""Which forward outputs the backward pass reads.

# NOTE [ what backward keeps ]
# MXNet frees a forward output as soon as its last forward consumer has run
# unless some gradient operator reads it.  Which ones do is fixed per operator
# by its gradient function (``FGradient`` in ``src/operator/``): a convolution's
# gradient reads its input, ReLU's reads its output, an addition's reads
# neither.  Counting every activation (as the seed's model does) overstates
# the unmirrored plan of a ResNet-50 by half (4.6 GB modelled, 2.9 GB planned);
# counting only the outputs read by backward comes within 15% of it.  Unknown
# operators are assumed to read both their inputs and their outputs, which can
# only overstate memory.
#
# Under mirroring (MXNet 1.9, ``src/nnvm/gradient.cc``) the gradient of a
# mirrored node is built on its recomputed copy, and reads recomputed inputs;
# the gradient of a node that is NOT mirrored reads the ORIGINAL outputs of its
# inputs, mirrored or not.  So recomputing a ReLU whose consumer is a kept
# convolution frees nothing: the convolution's gradient still holds the
# forward ReLU output.  This is why "keep the convolutions, recompute the
# cheap operators" (MXNET_BACKWARD_DO_MIRROR=1) saves nothing on ResNets in
# MXNet 1.9 (bench/RESULTS.md), and why a cut at a convolution's output also
# keeps that convolution's input.
"""
from __future__ import annotations

from typing import FrozenSet, Iterable, List

from .graph import Graph, NodeKind

__all__ = ["READS_INPUTS", "READS_OUTPUT", "READS_NOTHING", "read_by_backward", "gradient_reads_inputs",
           "kept_bytes"]

#: Gradient reads the operator's data inputs (not its output).
READS_INPUTS = frozenset({
    "Convolution", "Deconvolution", "FullyConnected", "BatchNorm", "LayerNorm", "InstanceNorm",
    "GroupNorm", "elemwise_mul", "broadcast_mul", "_mul", "_Mul", "elemwise_div", "broadcast_div",
    "_div", "Embedding", "dot", "batch_dot", "linalg_gemm2", "LeakyReLU", "square", "sqrt",
    "exp", "log", "_mul_scalar", "mean", "sum", "max", "min",
})
#: Gradient reads the operator's own output.
READS_OUTPUT = frozenset({
    "Activation", "relu", "sigmoid", "tanh", "softmax", "log_softmax", "SoftmaxOutput",
    "SoftmaxActivation", "LinearRegressionOutput", "LogisticRegressionOutput",
})
#: Gradient reads both (max pooling routes the gradient by comparing them).
READS_BOTH = frozenset({"Pooling", "RNN"})
#: Gradient reads neither: additions, copies, reshapes, concatenation, slicing.
READS_NOTHING = frozenset({
    "elemwise_add", "elemwise_sub", "broadcast_add", "broadcast_sub", "_plus", "_Plus", "_add",
    "_minus", "_sub", "add_n", "ElementWiseSum", "_plus_scalar", "_minus_scalar", "Flatten",
    "flatten", "Reshape", "reshape", "expand_dims", "transpose", "SwapAxis", "Concat", "concat",
    "SliceChannel", "split", "slice", "slice_axis", "crop", "Crop", "identity", "_copy",
    "BlockGrad", "stop_gradient", "Cast", "cast", "zeros_like", "ones_like", "_zeros", "_ones",
    "squeeze", "UpSampling", "Pad", "pad", "Dropout",
})

_MASKS_ONLY = frozenset({"Dropout"})  # reads its mask, a second output MXNet keeps for it


def gradient_reads_inputs(op: str) -> bool:
    """Whether the gradient of ``op`` reads its data inputs (unknown operators: yes)."""
    if op in _MASKS_ONLY or op in READS_NOTHING:
        return False
    return op in READS_INPUTS or op in READS_BOTH or op not in READS_OUTPUT


def read_by_backward(graph: Graph) -> List[bool]:
    """For each node, whether some gradient operator reads its output.

    Parameters
    ----------
    graph : Graph
        The forward graph.

    Returns
    -------
    list of bool
        ``True`` for operator outputs that stay alive from forward to
        backward in an unmirrored plan; variables are ``False`` (MXNet does
        not count them in its plan).
    """
    read = [False] * len(graph.nodes)
    for position, node in enumerate(graph.nodes):
        if node.kind is not NodeKind.OP:
            continue
        op = node.op
        if op in READS_NOTHING and op not in _MASKS_ONLY:
            continue
        if op in _MASKS_ONLY:
            read[position] = True
            continue
        if op in READS_OUTPUT or op in READS_BOTH or op not in READS_INPUTS:
            read[position] = True
        if op in READS_INPUTS or op in READS_BOTH or op not in READS_OUTPUT:
            for source, _ in node.inputs:
                if graph.nodes[source].kind is NodeKind.OP:
                    read[source] = True
    return read


def kept_bytes(graph: Graph) -> int:
    """Bytes of the operator outputs an unmirrored backward pass reads (kept from forward)."""
    return sum(node.planned_bytes for node, read in zip(graph.nodes, read_by_backward(graph)) if read)


#: Single-output operators whose gradient reads none of their outputs in MXNet 1.9 (only the
#: output gradient and inputs).  Everything else (BatchNorm reads its saved mean and variance,
#: Pooling and activations their output...) is taken to read its outputs.
OUTPUT_UNREAD_BY_GRADIENT = frozenset({
    "Convolution", "Deconvolution", "FullyConnected", "elemwise_add", "_plus", "_Plus",
    "broadcast_add", "add_n", "ElementWiseSum", "Flatten", "flatten", "Reshape", "reshape",
    "expand_dims", "Concat", "concat", "_copy",
})


def gradient_reads_output(op: str) -> bool:
    """Whether the operator's gradient may read one of its own outputs (see
    :data:`OUTPUT_UNREAD_BY_GRADIENT`; unknown operators: assumed so)."""
    return op not in OUTPUT_UNREAD_BY_GRADIENT


def drop_unread_copies(graph: Graph, mirrored: Iterable[str]) -> FrozenSet[str]:
    """``mirrored`` without the nodes whose recomputed copy nothing would read.

    # NOTE [ copies nothing reads ]
    # MXNet 1.9 moves a mirrored node's backward control dependency onto its copy, so
    # the copy runs even when nothing reads its output: when the node's own gradient
    # does not read its output (a convolution) and no consumer is recomputed (the
    # BatchNorm after it is kept).  Such a copy saves nothing, costs a forward of the
    # node, and gets ``req = kNullOp`` on its output, which the non-MKLDNN convolution
    # (CPU without MKLDNN, the GPU's non-cuDNN path) refuses: "Check failed:
    # req[conv::kOut] == kWriteTo".  Measured on resnet50_v1b: mirroring only
    # ``resnetv1b_layers3_conv0_fwd`` binds and fails there; executor segments hit
    # it whenever a segment's output (never mirrored) is a kept consumer of a
    # mirrored convolution.  A copy is read by its own node's gradient when that
    # gradient reads the output, or through a recomputed consumer; removing nodes
    # until every remaining one is read that way changes no memory figure.
    """
    chosen = set(mirrored)
    consumers = graph.consumers()
    changed = True
    while changed:
        changed = False
        for name in sorted(chosen):
            if name not in graph:
                continue
            index = graph.index(name)
            if gradient_reads_output(graph.nodes[index].op):
                continue
            if any(graph.nodes[c].name in chosen for c in consumers[index]):
                continue
            chosen.discard(name)
            changed = True
    return frozenset(chosen)

