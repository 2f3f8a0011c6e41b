"""An element-wise activation recomputed inside the product that reads it.

:func:`recompute_activations` replaces each ``act -> FullyConnected`` pair that
:func:`~mxnet_mirror_hook.core.fused_activation.find_fused_activations` finds by one ``Custom``
operator, ``op_type`` :data:`FUSED_ACTIVATION_OP`, registered when this module is imported.

# NOTE [ an activation recomputed inside its product ]
# A BERT layer's feed-forward block keeps ``z = ffn1(x)`` (the GELU's backward reads it) and
# ``g = gelu(z)`` (the weight gradient of ``ffn2`` reads it): 2 x 4*s*b*h floats.  MXNet's own
# mirror cannot free ``g``: it replays recomputed nodes at the start of the backward pass, so
# the replayed copies of all layers are alive together.  One operator ``FC(act(z))`` that keeps
# only its input ``z`` (which the plain graph keeps too) frees ``g``: its forward computes
# ``act(z)`` into a temporary and the product into its output; its backward computes ``act(z)``
# again, then the product's backward (``_backward_FullyConnected``: the gradients of ``g``, the
# weight and the bias) and the activation's backward (``_backward_LeakyReLU`` or
# ``_backward_Activation``), each MXNet's registered kernel called on the arrays the plain
# gradient pass gives it (NOTE [ calling MXNet's backward operators ] in backward_ops.py), so
# outputs and gradients are the plain graph's bit for bit (tests without MKLDNN).  The node
# carries KEEP_ATTR: the one-level mirror never replays it.  The price is one activation forward
# per layer and iteration (core.fused_activation.activation_recompute_cost).
#
# NOTE [ the fused activation's workspace ]
# The recomputed activation is ``z``-sized (48 MB for BERT-base at seq 512, batch 8).  A fresh
# imperative array of that size costs page faults on every call, so it is a kept buffer of
# mx/workspace.py (NOTE [ a workspace kept between calls ]), slot ``activation_value``, one per
# context and dtype, shared by every fused activation.  Its gradient (``z``-sized too) needs no
# buffer: the product's backward writes it into MXNet's array for the gradient of ``z``, which
# is ours until we write that gradient, and the activation's backward writes the gradient of
# ``z`` over it (an element-wise kernel; MXNet declares this in-place option, FInplaceOption
# {0, 0} of ``_backward_LeakyReLU``/``_backward_Activation``, so its planner may do the same).
# Forward writes the product straight into the operator's output, backward every gradient whose
# request is ``'write'`` straight into MXNet's array; another request (``grad_req='add'``, a
# gradient not wanted) goes through a kept buffer of that input's shape.  The engine orders the
# reads and writes of one array in the order they are pushed; MXNet runs Custom callbacks on
# several threads, so each callback pushes its whole sequence inside ``workspace.pushing()``
# and no two callbacks' uses of a buffer interleave.
# core.fused_activation.fused_activation_workspace counts the buffers.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional

import mxnet as mx
import numpy as np

from ..core.fused_activation import (FUSED_ACTIVATION_OP, SLOT_PREFIX, WORKSPACE_SLOTS, FusedActivation,
                                     find_fused_activations)
from ..core.graph import KEEP_ATTR
from .backward_ops import invoke
from .convert import attr_true, load_rewritten, rebuild_nodes, structural_graph
from .custom_deps import use_common_dependencies
from .workspace import buffer, pushing

__all__ = ["recompute_activations", "FUSED_ACTIVATION_OP", "FusedActivationOp", "FusedActivationProp"]

logger = logging.getLogger(__name__)

use_common_dependencies()  # NOTE [ one process-wide set of backward dependencies ] (custom_deps.py)

VALUE = WORKSPACE_SLOTS[0]
GRADIENT = "gradient"


def _buffer(slot: str, like: "mx.nd.NDArray") -> "mx.nd.NDArray":
    """The kept array of ``slot`` shaped as ``like``, on its context and dtype (NOTE [ the fused
    activation's workspace ])."""
    return buffer(SLOT_PREFIX + slot, tuple(like.shape), like.context, like.dtype)


class FusedActivationOp(mx.operator.CustomOp):
    """``FullyConnected(act(z))`` keeping ``z`` only (NOTE [ an activation recomputed inside its
    product ])."""

    def __init__(self, act_op: str, act_attrs: Dict[str, str], fc_attrs: Dict[str, str]) -> None:
        super().__init__()
        self.act_op = act_op
        self.act_attrs = act_attrs
        self.fc_attrs = fc_attrs
        self.no_bias = attr_true(fc_attrs["no_bias"])

    def _activation(self, z: "mx.nd.NDArray") -> "mx.nd.NDArray":
        """``act(z)`` into the shared activation buffer."""
        out = _buffer(VALUE, z)
        getattr(mx.nd, self.act_op)(z, out=out, **self.act_attrs)
        return out

    def forward(self, is_train, req, in_data, out_data, aux):  # noqa: D102 (MXNet's signature)
        if req[0] == "null":
            return
        with pushing():
            g = self._activation(in_data[0])
            weights = in_data[1:2] if self.no_bias else in_data[1:3]
            if req[0] == "write":
                mx.nd.FullyConnected(g, *weights, out=out_data[0], **self.fc_attrs)
            else:
                self.assign(out_data[0], req[0], mx.nd.FullyConnected(g, *weights, **self.fc_attrs))

    def _targets(self, req, in_grad) -> List["mx.nd.NDArray"]:
        """Where each input's gradient is written: MXNet's array when asked to write, else a kept
        buffer (NOTE [ the fused activation's workspace ])."""
        return [grad if request == "write" else _buffer(f"{GRADIENT}{index}", grad)
                for index, (request, grad) in enumerate(zip(req, in_grad))]

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):  # noqa: D102
        z, weight = in_data[0], in_data[1]
        with pushing():
            g = self._activation(z)
            targets = self._targets(req, in_grad)
            # the gradient of g goes where that of z will (the activation's backward may write
            # its result over its head gradient: FInplaceOption {0, 0} in MXNet 1.9.1)
            invoke("_backward_FullyConnected", [out_grad[0], g, weight], targets, **self.fc_attrs)
            if req[0] != "null":
                if self.act_op == "LeakyReLU":  # ograd, data, output (ElemwiseGradUseInOut)
                    invoke("_backward_LeakyReLU", [targets[0], z, g], targets[:1], **self.act_attrs)
                else:  # ograd, output[, data] (ActivationGrad, MXNet 1.9.1 activation.cc)
                    inputs = [targets[0], g] if self.act_attrs["act_type"] == "relu" else [targets[0], g, z]
                    invoke("_backward_Activation", inputs, targets[:1], **self.act_attrs)
            for request, grad, target in zip(req, in_grad, targets):
                if target is not grad:
                    self.assign(grad, request, target)


@mx.operator.register(FUSED_ACTIVATION_OP)
class FusedActivationProp(mx.operator.CustomOpProp):
    """Shapes, types and dependencies of :class:`FusedActivationOp` (parameters arrive as strings)."""

    def __init__(self, act_op: str, act_type: str, num_hidden: str, no_bias: str = "False",
                 flatten: str = "True", **rest: str) -> None:
        super().__init__(need_top_grad=True)
        self.act_op = act_op
        self.act_attrs = {"act_type": act_type}
        self.act_attrs.update({k: v for k, v in rest.items() if k in ("slope", "lower_bound", "upper_bound")})
        self.num_hidden = int(num_hidden)
        self.no_bias = attr_true(no_bias)
        self.flatten = attr_true(flatten)

    def list_arguments(self) -> List[str]:  # noqa: D102
        return ["data", "weight"] if self.no_bias else ["data", "weight", "bias"]

    def list_outputs(self) -> List[str]:  # noqa: D102
        return ["output"]

    def infer_shape(self, in_shape):  # noqa: D102
        data = tuple(in_shape[0])
        features = int(np.prod(data[1:])) if self.flatten else data[-1]
        weights = [data, (self.num_hidden, features)] + ([] if self.no_bias else [(self.num_hidden,)])
        out = (data[0], self.num_hidden) if self.flatten else data[:-1] + (self.num_hidden,)
        return weights, [out], []

    def infer_type(self, in_type):  # noqa: D102
        return [in_type[0]] * len(in_type), [in_type[0]], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):  # noqa: D102
        return [out_grad[0], in_data[0], in_data[1]]

    def create_operator(self, ctx, shapes, dtypes):  # noqa: D102
        fc_attrs = {"num_hidden": str(self.num_hidden), "no_bias": str(self.no_bias),
                    "flatten": str(self.flatten)}
        return FusedActivationOp(self.act_op, dict(self.act_attrs), fc_attrs)


def _fused_node(node: Dict[str, Any], match: FusedActivation, inputs: List[List[int]]) -> Dict[str, Any]:
    """The Custom node standing for ``match``; named as its product was."""
    attrs = {"op_type": FUSED_ACTIVATION_OP, "act_op": match.op, **match.activation_attrs,
             "num_hidden": match.product_attrs["num_hidden"],
             "no_bias": str(attr_true(match.product_attrs.get("no_bias", "False"))),
             "flatten": str(attr_true(match.product_attrs.get("flatten", "True"))), KEEP_ATTR: "True"}
    attrs.update({k: v for k, v in (node.get("attrs") or {}).items() if k.startswith("__")})
    return {"op": "Custom", "name": node["name"], "attrs": attrs, "inputs": inputs}


def recompute_activations(symbol: "mx.sym.Symbol", only_freeing: bool = True) -> "mx.sym.Symbol":
    """``symbol`` with every activation read only by a product's data input recomputed inside it.

    See NOTE [ an activation recomputed inside its product ].  Arguments, outputs, auxiliary
    states and output names are the user's; the symbol given is not modified.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol.
    only_freeing : bool
        Leave alone the pairs whose fusion frees nothing (a relu whose input nothing else reads:
        NOTE [ which activations the fusion frees memory for ] in core/fused_activation.py).

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol, or ``symbol`` itself when nothing is to be replaced.
    """
    document = json.loads(symbol.tojson())
    matches = find_fused_activations(structural_graph(document), only_freeing)
    if not matches:
        return symbol
    by_product = {match.product: match for match in matches}
    removed = {match.activation for match in matches}

    def fused(position: int, node: Dict[str, Any], remap: Dict[int, int]) -> Optional[Dict[str, Any]]:
        if position not in by_product:
            return None
        match = by_product[position]   # its data input, the activation, becomes the activation's source
        inputs = [[remap[e[0]], e[1], e[2]] for e in node["inputs"] if e[0] not in removed]
        return _fused_node(node, match, [[remap[match.source[0]], match.source[1], 0]] + inputs)

    out, heads = rebuild_nodes(document, removed, fused)
    result = load_rewritten(symbol, out, heads, document.get("attrs", {}),
                            "recomputing activations inside their products changed the symbol's arguments, "
                            "outputs or auxiliary states; please report this symbol")
    logger.info("activations: %d recomputed inside the product reading them", len(matches))
    return result
