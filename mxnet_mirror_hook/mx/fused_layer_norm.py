"""LayerNorm recomputed inside the FullyConnected that reads it: one operator keeping only its input.

:func:`recompute_layer_norms` replaces each ``LayerNorm -> FullyConnected`` pair of a symbol
(:mod:`mxnet_mirror_hook.core.fused_layer_norm`) by one ``Custom`` operator, ``op_type``
:data:`FUSED_LAYER_NORM_OP`, registered when this module is imported.

# NOTE [ LayerNorm recomputed inside the product that reads it ]
# In a post-norm transformer layer ``x = LayerNorm(r)`` is read by a FullyConnected and by the
# next residual sum.  The plain graph keeps ``r`` with LayerNorm's mean and standard deviation
# (LayerNorm's backward reads its data, gamma and both moments) and ``x`` (the FullyConnected's
# weight gradient reads it): two batch x seq x hidden tensors per LayerNorm.  MXNet's own mirror
# must never recompute LayerNorm (NEVER_MIRRORED_OPS in core/graph.py: wrong and non-finite
# gradients on gluonnlp's BERT) and replays recomputed nodes at the start of backward anyway.
# One operator computing LayerNorm then the FullyConnected keeps only ``r`` (gamma, beta, the
# weight are arguments): its backward recomputes ``x``, mean and standard deviation with
# LayerNorm's kernel, runs ``_backward_FullyConnected`` on them, adds the head gradient of its
# second output (``x`` itself, for the sum: the plain graph sums the same two terms, and the
# sum of two floats is one correctly rounded operation in any order) and runs
# ``_backward_LayerNorm`` once: MXNet's own kernels on the same numbers (NOTE [ calling MXNet's
# backward operators ] in backward_ops.py), so the gradients are the plain graph's bit for bit
# (tests without MKLDNN).  The second output is not a backward dependency, so MXNet's static
# plan frees it after its readers ran.  With more than one sum reading ``x`` MXNet adds their
# gradients before the operator sees them, so three or more terms may be added in another
# order than the plain graph's (equal up to rounding).  The node carries KEEP_ATTR, so the
# one-level mirror never runs it twice.
#
# NOTE [ what the fused LayerNorm operator allocates ]
# Fresh imperative temporaries of a few MB cost page faults on every call (measured: they doubled
# the time of a 12 MB operator), so the recomputed ``x``, the gradient reaching it and the two
# moments live in buffers kept between calls (mx/workspace.py, NOTE [ a workspace kept between
# calls ]), one per role, context and dtype, grown to the largest request and shared by every
# instance (2 x 12.6 MB plus 2 x 16 KB at BERT-base seq 512, batch 8).  Forward writes ``x``
# and the product straight into the operator's outputs and backward writes every gradient whose
# request is ``'write'`` straight into MXNet's array; the gradient of ``r`` under any other
# request goes through the ``x`` buffer (free by then) and a parameter's through a kept buffer
# of its own.  The engine orders the reads and writes of one array in the order they are pushed;
# MXNet runs Custom callbacks on several threads, so each callback pushes its whole sequence
# inside workspace.pushing() (pushing does not wait for the engine) and no two callbacks' uses
# of a buffer interleave.  core.fused_layer_norm.fused_layer_norm_workspace counts these buffers.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, List, Tuple

import mxnet as mx

from ..core.fused_layer_norm import (FULLY_CONNECTED_KEYS, FUSED_LAYER_NORM_OP, LAYER_NORM_KEYS, SLOT_PREFIX,
                                     LayerNormFusion, find_layer_norm_fusions)
from ..core.graph import KEEP_ATTR
from .backward_ops import invoke
from .convert import attr_true, load_rewritten, structural_graph
from .workspace import buffer, pushing
from .custom_deps import use_common_dependencies

__all__ = ["recompute_layer_norms", "FUSED_LAYER_NORM_OP", "FusedLayerNormOp", "FusedLayerNormProp"]

logger = logging.getLogger(__name__)

use_common_dependencies()  # NOTE [ one process-wide set of backward dependencies ] (custom_deps.py)


def _buffer(role: str, like: "mx.nd.NDArray", shape: Tuple[int, ...] = ()) -> "mx.nd.NDArray":
    """The kept array of ``role`` shaped as ``like`` (or ``shape``), on its context and dtype
    (NOTE [ what the fused LayerNorm operator allocates ])."""
    return buffer(f"{SLOT_PREFIX}{role}", tuple(shape or like.shape), like.context, like.dtype)


class FusedLayerNormOp(mx.operator.CustomOp):
    """Forward: LayerNorm then FullyConnected; backward: LayerNorm recomputed, then both backwards
    (NOTE [ LayerNorm recomputed inside the product that reads it ])."""

    def __init__(self, layer_norm: Dict[str, str], fc: Dict[str, str], normalized_read: bool) -> None:
        super().__init__()
        self.layer_norm = layer_norm
        self.fc = fc
        self.normalized_read = normalized_read
        self.bias = not attr_true(fc.get("no_bias", "False"))

    def _normalize(self, in_data, normalized: "mx.nd.NDArray") -> Tuple["mx.nd.NDArray", "mx.nd.NDArray"]:
        """LayerNorm of ``in_data[0]`` into ``normalized``; its moments (in kept buffers)."""
        data, gamma, beta = in_data[:3]
        moments = list(data.shape)
        moments[int(self.layer_norm.get("axis", "-1")) % data.ndim] = 1
        mean = _buffer("mean", data, tuple(moments))
        std = _buffer("std", data, tuple(moments))
        invoke("LayerNorm", [data, gamma, beta], [normalized, mean, std],
               **{**self.layer_norm, "output_mean_var": True})
        return mean, std

    def forward(self, is_train, req, in_data, out_data, aux):  # noqa: D102 (MXNet's signature)
        with pushing():
            direct = req[1] == "write"
            normalized = out_data[1] if direct else _buffer("normalized", in_data[0])
            self._normalize(in_data, normalized)
            weights = list(in_data[3:5] if self.bias else in_data[3:4])
            if req[0] == "write":
                invoke("FullyConnected", [normalized] + weights, [out_data[0]], **self.fc)
            elif req[0] != "null":
                self.assign(out_data[0], req[0], mx.nd.FullyConnected(normalized, *weights, **self.fc))
            if not direct:
                self.assign(out_data[1], req[1], normalized)

    def _targets(self, req, in_grad, first: "mx.nd.NDArray") -> List["mx.nd.NDArray"]:
        """Where each input's gradient is written: MXNet's array when asked to write, else a buffer
        (``first`` for the data's; a kept one of its shape for a parameter's)."""
        targets = []
        for index, (request, grad) in enumerate(zip(req, in_grad)):
            if request == "write":
                targets.append(grad)
            else:
                targets.append(first if index == 0 else _buffer(f"gradient{index}", grad))
        return targets

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):  # noqa: D102
        with pushing():
            data, gamma, _, weight = in_data[:4]
            normalized = _buffer("normalized", data)
            mean, std = self._normalize(in_data, normalized)
            gradient = _buffer("gradient", data)
            targets = self._targets(req, in_grad, normalized)
            invoke("_backward_FullyConnected", [out_grad[0], normalized, weight],
                   [gradient] + targets[3:], **self.fc)
            if self.normalized_read:
                gradient += out_grad[1]
            invoke("_backward_LayerNorm", [gradient, data, gamma, mean, std], targets[:3], **self.layer_norm)
            for request, grad, target in zip(req, in_grad, targets):
                if target is not grad:
                    self.assign(grad, request, target)


@mx.operator.register(FUSED_LAYER_NORM_OP)
class FusedLayerNormProp(mx.operator.CustomOpProp):
    """Shapes, types and dependencies of :class:`FusedLayerNormOp` (parameters arrive as strings:
    LayerNorm's and FullyConnected's by their own names, which differ)."""

    def __init__(self, num_hidden: str, normalized_read: str = "True", **params: str) -> None:
        super().__init__(need_top_grad=True)
        self.layer_norm = {k: v for k, v in params.items() if k in LAYER_NORM_KEYS}
        self.fc = {k: v for k, v in params.items() if k in FULLY_CONNECTED_KEYS}
        self.fc["num_hidden"] = num_hidden
        self.normalized_read = attr_true(normalized_read)
        self.bias = not attr_true(self.fc.get("no_bias", "False"))

    def list_arguments(self) -> List[str]:  # noqa: D102
        return ["data", "gamma", "beta", "weight"] + (["bias"] if self.bias else [])

    def list_outputs(self) -> List[str]:  # noqa: D102
        return ["output", "normalized"]

    def infer_shape(self, in_shape):  # noqa: D102
        data = tuple(in_shape[0])
        hidden = int(self.fc["num_hidden"])
        channels = data[int(self.layer_norm.get("axis", "-1")) % len(data)]
        if attr_true(self.fc.get("flatten", "True")):
            units, out = math.prod(data[1:]), (data[0], hidden)
        else:
            units, out = data[-1], data[:-1] + (hidden,)
        shapes = [data, (channels,), (channels,), (hidden, units)] + ([(hidden,)] if self.bias else [])
        return shapes, [out, data], []

    def infer_type(self, in_type):  # noqa: D102
        return [in_type[0]] * len(in_type), [in_type[0]] * 2, []

    def declare_backward_dependency(self, out_grad, in_data, out_data):  # noqa: D102
        # NOTE [ LayerNorm recomputed inside the product that reads it ]: no output, no bias.
        return [out_grad[0]] + ([out_grad[1]] if self.normalized_read else []) + list(in_data[:4])

    def create_operator(self, ctx, shapes, dtypes):  # noqa: D102
        return FusedLayerNormOp(self.layer_norm, self.fc, self.normalized_read)


def _fused_node(layer_norm: Dict[str, Any], fc: Dict[str, Any], fusion: LayerNormFusion,
                inputs: List[List[int]]) -> Dict[str, Any]:
    """The Custom node standing for ``fusion``; named as its FullyConnected was (so its first output
    keeps the FullyConnected's output name)."""
    attrs = {"op_type": FUSED_LAYER_NORM_OP, **fusion.layer_norm_attrs, **fusion.fc_attrs,
             "normalized_read": str(fusion.normalized_read)}
    for node in (layer_norm, fc):
        attrs.update({k: v for k, v in (node.get("attrs") or {}).items() if k.startswith("__")})
    attrs[KEEP_ATTR] = "True"
    return {"op": "Custom", "name": fc["name"], "attrs": attrs, "inputs": inputs}


def _topological(nodes: Dict[int, Dict[str, Any]]) -> List[int]:
    """Keys of ``nodes`` (inputs name keys) in an order where every node follows its inputs: the
    given order, with a node moved up before its first reader (a fused node, placed where its
    FullyConnected was, is read by sums that may come before it)."""
    order: List[int] = []
    seen = set()
    for start in nodes:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(nodes[start]["inputs"]))]
        while stack:
            key, pending = stack[-1]
            following = next((entry[0] for entry in pending if entry[0] not in seen), None)
            if following is None:
                order.append(key)
                stack.pop()
                continue
            seen.add(following)
            stack.append((following, iter(nodes[following]["inputs"])))
    return order


def recompute_layer_norms(symbol: "mx.sym.Symbol") -> "mx.sym.Symbol":
    """``symbol`` with every LayerNorm read by one FullyConnected (and otherwise only by sums)
    replaced, with that FullyConnected, by one operator that recomputes the LayerNorm in backward.

    See NOTE [ LayerNorm recomputed inside the product that reads it ].  Arguments, outputs,
    auxiliary states and output names are the user's; the symbol given is not modified.

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol, or ``symbol`` itself when it has no such LayerNorm.
    """
    document = json.loads(symbol.tojson())
    fusions = find_layer_norm_fusions(structural_graph(document))
    if not fusions:
        return symbol
    by_fc = {fusion.fc: fusion for fusion in fusions}
    to_fc = {fusion.layer_norm: fusion.fc for fusion in fusions}

    def entry(source: int, output: int, version: int = 0) -> List[int]:
        return [to_fc[source], 1, 0] if source in to_fc else [source, output, version]

    nodes: Dict[int, Dict[str, Any]] = {}
    for position, node in enumerate(document["nodes"]):
        if position in to_fc:
            continue
        if position in by_fc:
            fusion = by_fc[position]
            node = _fused_node(document["nodes"][fusion.layer_norm], node, fusion,
                               [entry(*source) for source in fusion.inputs])
        else:
            node = {**node, "inputs": [entry(*e) for e in node["inputs"]]}
        nodes[position] = node
    order = _topological(nodes)
    index = {key: position for position, key in enumerate(order)}
    out = [{**nodes[key], "inputs": [[index[e[0]], e[1], e[2]] for e in nodes[key]["inputs"]]}
           for key in order]
    heads = [[index[e[0]], e[1], e[2]] for e in (entry(*h) for h in document["heads"])]
    result = load_rewritten(symbol, out, heads, document.get("attrs", {}),
                            "recomputing LayerNorm inside its FullyConnected changed the symbol's arguments, "
                            "outputs or auxiliary states; please report this symbol")
    logger.info("LayerNorm: %d recomputed inside the FullyConnected reading it", len(fusions))
    return result
