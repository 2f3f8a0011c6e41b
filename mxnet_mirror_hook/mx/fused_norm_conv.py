"""A BatchNorm and relu recomputed inside the Convolution that reads them.

:func:`recompute_norm_convs` replaces each ``BatchNorm -> Activation(relu) -> Convolution`` chain that
:func:`~mxnet_mirror_hook.core.fused_norm_conv.find_fused_norm_convs` finds by one ``Custom``
operator, ``op_type`` :data:`FUSED_NORM_CONV_OP`, registered when this module is imported.

# NOTE [ a BatchNorm and relu recomputed inside their convolution ]
# A ResNet bottleneck keeps the convolution output ``x`` (BatchNorm's backward reads it) and the
# relu output ``g`` (the relu's backward and the next convolution's weight gradient read it).  One
# operator ``Conv(relu(BN(x)))`` keeping only ``x`` (which the plain graph keeps too) frees ``g``:
# its forward computes BatchNorm and relu into a temporary and the convolution into its output;
# its backward computes BatchNorm (batch statistics) and relu again, then MXNet's registered
# kernels ``_backward_Convolution``, ``_backward_Activation`` and ``_backward_BatchNorm`` on the
# arrays the plain gradient pass gives them (NOTE [ calling MXNet's backward operators ] in
# backward_ops.py), so gradients are the plain graph's bit for bit (tests without MKLDNN).  The
# node carries KEEP_ATTR: the one-level mirror never replays it.  The price is one BatchNorm and
# relu forward per chain and iteration (core.fused_norm_conv.norm_conv_recompute_cost).
#
# NOTE [ the moving statistics of a fused BatchNorm ]
# MXNet 1.9.1 updates BatchNorm's moving mean and variance in the BACKWARD kernel on the CPU
# (batch_norm.cc, BatchNormBackwardImpl; MKLDNN too) and in the FORWARD with cuDNN.  So the
# operator calls BatchNorm's forward with the real auxiliary arrays exactly once (in its
# forward) and ``_backward_BatchNorm`` with the real ones exactly once (in its backward), and the
# recomputation in backward works on kept COPIES of them: whichever kernel updates, the real
# statistics are updated once, as in the plain graph.  The recomputed output does not read the
# moving statistics (batch statistics in training); BatchNorm's backward reads the batch mean
# and variance the recomputation produced, the forward's bit for bit.
#
# NOTE [ the fused BatchNorm's workspace ]
# Two ``x``-sized kept buffers (mx/workspace.py, NOTE [ a workspace kept between calls ]) shared
# by every fused chain of one context and dtype: ``norm_conv_value`` (BatchNorm's output, the
# relu computed over it in place as MXNet's planner does) and ``norm_conv_gradient`` (the
# gradient of the relu output, then of BatchNorm's output: ``_backward_Activation`` writes over
# its head gradient, MXNet's FInplaceOption {0, 0}); channel-sized buffers hold the batch mean and
# variance and the copies of the moving statistics.  Gradients whose request is ``'write'`` go
# straight into MXNet's arrays, any other request through a kept buffer of that input's shape.
# Every callback pushes its whole sequence inside ``workspace.pushing()``.  With MKLDNN the
# forward's convolution is NOT written straight into the operator's output: measured on
# small_resnet, MKLDNN's convolution writing into the array MXNet hands a Custom operator gave
# wrong numbers downstream (max error 0.05 on the softmax, moving variances off by 1.8 after two
# steps; bit-exact without MKLDNN, and exact again when written into another array and copied),
# presumably its blocked layout written into a view of the executor's memory pool; so it goes
# through a kept ``norm_conv_output`` buffer and is copied.  Gradients written straight into
# MXNet's arrays agree (allclose tests).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List

import mxnet as mx
import numpy as np

from ..core.fused_norm_conv import (FUSED_NORM_CONV_OP, NORM_PREFIX, SLOT_PREFIX, WORKSPACE_SLOTS,
                                    FusedNormConv, find_fused_norm_convs)
from ..core.graph import KEEP_ATTR
from .backward_ops import assign_into, invoke
from .convert import attr_true, load_rewritten, structural_graph
from .custom_deps import use_common_dependencies
from .workspace import buffer, pushing

__all__ = ["recompute_norm_convs", "FUSED_NORM_CONV_OP", "FusedNormConvOp", "FusedNormConvProp"]

logger = logging.getLogger(__name__)

use_common_dependencies()  # NOTE [ one process-wide set of backward dependencies ] (custom_deps.py)

VALUE, GRADIENT = WORKSPACE_SLOTS

#: Whether MXNet computes with MKLDNN here (NOTE [ the fused BatchNorm's workspace ]).
MKLDNN = mx.runtime.Features().is_enabled("MKLDNN") and os.environ.get("MXNET_MKLDNN_ENABLED", "1") != "0"


def _buffer(slot: str, shape, like: "mx.nd.NDArray", dtype=None) -> "mx.nd.NDArray":
    """The kept array of ``slot`` (NOTE [ the fused BatchNorm's workspace ])."""
    return buffer(SLOT_PREFIX + slot, tuple(shape), like.context, dtype or like.dtype)


class FusedNormConvOp(mx.operator.CustomOp):
    """``Convolution(relu(BatchNorm(x)))`` keeping ``x`` only (NOTE [ a BatchNorm and relu
    recomputed inside their convolution ])."""

    def __init__(self, norm_attrs: Dict[str, str], conv_attrs: Dict[str, str]) -> None:
        super().__init__()
        self.norm_attrs = norm_attrs
        self.conv_attrs = conv_attrs
        self.no_bias = attr_true(conv_attrs.get("no_bias", "False"))

    def _normalized(self, in_data, moving) -> List["mx.nd.NDArray"]:
        """``relu(BatchNorm(x))`` into the value buffer, the batch mean and variance into theirs:
        ``[value, mean, var]``."""
        x, gamma = in_data[0], in_data[1]
        outputs = [_buffer(VALUE, x.shape, x), _buffer("mean", gamma.shape, moving[0]),
                   _buffer("var", gamma.shape, moving[1])]
        invoke("BatchNorm", [x, gamma, in_data[2], moving[0], moving[1]], outputs, **self.norm_attrs)
        invoke("Activation", outputs[:1], outputs[:1], act_type="relu")
        return outputs

    def _weights(self, in_data) -> List["mx.nd.NDArray"]:
        return list(in_data[3:4] if self.no_bias else in_data[3:5])

    def forward(self, is_train, req, in_data, out_data, aux):  # noqa: D102 (MXNet's signature)
        with pushing():
            # the real moving statistics: cuDNN updates them here (NOTE [ the moving statistics
            # of a fused BatchNorm ])
            g = self._normalized(in_data, aux)[0]
            if req[0] == "null":
                return
            direct = req[0] == "write" and not MKLDNN
            target = out_data[0] if direct else _buffer("output", out_data[0].shape, g)
            invoke("Convolution", [g] + self._weights(in_data), [target], **self.conv_attrs)
            if target is not out_data[0]:
                assign_into(out_data[0], req[0], target)

    def _targets(self, req, in_grad) -> List["mx.nd.NDArray"]:
        """Where each input's gradient is written: MXNet's array when asked to write, else a kept
        buffer (NOTE [ the fused BatchNorm's workspace ])."""
        return [grad if request == "write" else _buffer(f"gradient{index}", grad.shape, grad)
                for index, (request, grad) in enumerate(zip(req, in_grad))]

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):  # noqa: D102
        x = in_data[0]
        with pushing():
            copies = [_buffer(f"moving{index}", array.shape, array) for index, array in enumerate(aux)]
            for array, copy in zip(aux, copies):
                array.copyto(copy)
            g, mean, var = self._normalized(in_data, copies)
            targets = self._targets(req, in_grad)
            gradient = _buffer(GRADIENT, x.shape, x)
            invoke("_backward_Convolution", [out_grad[0], g] + self._weights(in_data),
                   [gradient] + targets[3:], **self.conv_attrs)
            invoke("_backward_Activation", [gradient, g], [gradient], act_type="relu")
            # ograd, mean, var, data, gamma, beta, moving mean, moving var (BatchNormGrad, 1.9.1)
            invoke("_backward_BatchNorm", [gradient, mean, var] + list(in_data[:3]) + list(aux),
                   targets[:3], **self.norm_attrs)
            for request, grad, target in zip(req, in_grad, targets):
                if target is not grad:
                    assign_into(grad, request, target)


@mx.operator.register(FUSED_NORM_CONV_OP)
class FusedNormConvProp(mx.operator.CustomOpProp):
    """Shapes, types and dependencies of :class:`FusedNormConvOp` (parameters arrive as strings:
    the BatchNorm's prefixed with :data:`NORM_PREFIX`, the Convolution's as they are)."""

    def __init__(self, **attrs: str) -> None:
        super().__init__(need_top_grad=True)
        self.norm_attrs = {k[len(NORM_PREFIX):]: v for k, v in attrs.items() if k.startswith(NORM_PREFIX)}
        self.conv_attrs = {k: v for k, v in attrs.items() if not k.startswith(NORM_PREFIX)}
        self.no_bias = attr_true(self.conv_attrs.get("no_bias", "False"))

    def list_arguments(self) -> List[str]:  # noqa: D102
        return ["data", "gamma", "beta", "weight"] + ([] if self.no_bias else ["bias"])

    def list_auxiliary_states(self) -> List[str]:  # noqa: D102
        return ["moving_mean", "moving_var"]

    def list_outputs(self) -> List[str]:  # noqa: D102
        return ["output"]

    def infer_shape(self, in_shape):  # noqa: D102
        data = tuple(in_shape[0])
        channels = data[int(self.norm_attrs.get("axis", "1")) % len(data)]
        conv = mx.sym.Convolution(mx.sym.var("data"), name="conv", **self.conv_attrs)
        arguments, outputs, _ = conv.infer_shape(data=data)
        shapes = dict(zip(conv.list_arguments(), arguments))
        weights = [shapes["conv_weight"]] + ([] if self.no_bias else [shapes["conv_bias"]])
        return [data, (channels,), (channels,)] + weights, [outputs[0]], [(channels,), (channels,)]

    def infer_type(self, in_type):  # noqa: D102
        # BatchNorm's parameters and statistics are float32 for float16 data (as MXNet infers them)
        parameter = np.float32 if np.dtype(in_type[0]) == np.float16 else in_type[0]
        arguments = [in_type[0], parameter, parameter, in_type[0]] + ([] if self.no_bias else [in_type[0]])
        return arguments, [in_type[0]], [parameter, parameter]

    def declare_backward_dependency(self, out_grad, in_data, out_data):  # noqa: D102
        # NOTE [ a BatchNorm and relu recomputed inside their convolution ]: no output
        return [out_grad[0]] + list(in_data)

    def create_operator(self, ctx, shapes, dtypes):  # noqa: D102
        return FusedNormConvOp(dict(self.norm_attrs), dict(self.conv_attrs))


def _fused_node(node: Dict[str, Any], match: FusedNormConv, inputs: List[List[int]]) -> Dict[str, Any]:
    """The Custom node standing for ``match``; named as its convolution was."""
    attrs = {"op_type": FUSED_NORM_CONV_OP, **{NORM_PREFIX + k: v for k, v in match.norm_attrs.items()},
             **match.conv_attrs, KEEP_ATTR: "True"}
    attrs.update({k: v for k, v in (node.get("attrs") or {}).items() if k.startswith("__")})
    return {"op": "Custom", "name": node["name"], "attrs": attrs, "inputs": inputs}


def recompute_norm_convs(symbol: "mx.sym.Symbol") -> "mx.sym.Symbol":
    """``symbol`` with every BatchNorm and relu read only by a convolution recomputed inside it.

    See NOTE [ a BatchNorm and relu recomputed inside their convolution ] and NOTE [ which
    BatchNorms the fused operator takes ] (core/fused_norm_conv.py).  Arguments, outputs, auxiliary
    states and output names are the user's; the symbol given is not modified.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol.

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol, or ``symbol`` itself when nothing is to be replaced.
    """
    document = json.loads(symbol.tojson())
    matches = find_fused_norm_convs(structural_graph(document))
    if not matches:
        return symbol
    by_conv = {match.conv: match for match in matches}
    removed = {match.norm for match in matches} | {match.relu for match in matches}
    norm_inputs = {match.conv: document["nodes"][match.norm]["inputs"] for match in matches}
    out: List[Dict[str, Any]] = []
    remap: Dict[int, int] = {}
    for position, node in enumerate(document["nodes"]):
        if position in removed:
            continue
        if position in by_conv:
            norm = [[remap[e[0]], e[1], e[2]] for e in norm_inputs[position]]   # x, gamma, beta, aux
            weights = [[remap[e[0]], e[1], e[2]] for e in node["inputs"][1:]]
            node = _fused_node(node, by_conv[position], norm[:3] + weights + norm[3:])
        else:
            node = {**node, "inputs": [[remap[e[0]], e[1], e[2]] for e in node["inputs"]]}
        out.append(node)
        remap[position] = len(out) - 1
    result = load_rewritten(symbol, out, [[remap[e[0]], e[1], e[2]] for e in document["heads"]],
                            document.get("attrs", {}),
                            "recomputing BatchNorms inside their convolutions changed the symbol's "
                            "arguments, outputs or auxiliary states; please report this symbol")
    logger.info("BatchNorms: %d recomputed with their relu inside the convolution reading them", len(matches))
    return result
