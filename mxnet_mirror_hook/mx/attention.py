"""The core attention as one operator that keeps only its input and recomputes in backward.

:func:`recompute_core_attention` replaces each core attention of a symbol (the query-key product,
softmax, attention Dropout and product with the values: :mod:`mxnet_mirror_hook.core.attention`)
by one ``Custom`` operator, ``op_type`` :data:`CORE_ATTENTION_OP`, registered when this module
is imported (:mod:`.apply` imports it, so every process that plans or binds a plan has it).

# NOTE [ core attention in one operator ]
# Megatron-LM's selective recomputation keeps everything of a transformer layer but the core
# attention, whose batch x heads x seq x seq tensors are about half of a layer's activations at
# seq 512 and about 3% of its work.  MXNet cannot do this by itself: its one-level mirror,
# asked to recompute the core attention's nodes, keeps more than their recomputation frees
# (issue 22: 0.78x), and executor segments that re-run it cannot share one memory pool with
# the kept executors (0.86x).  One operator whose backward recomputes the scores and
# probabilities from its input ``qkv`` is opaque to MXNet's planner: the static plan keeps
# ``qkv`` (which the plain graph keeps too) and no s^2 tensor.  Its backward recomputes only
# what the gradients read (the product with the values is not run again) and then calls the
# backward operators MXNet's gradient pass runs (NOTE [ calling MXNet's backward operators ]
# in mx/backward_ops.py: interleaved products, softmax, elementwise product with the mask), so
# the gradients are bit for bit the plain graph's (tests without MKLDNN).  The
# node carries KEEP_ATTR, so the one-level mirror never runs it twice (a second forward would
# draw a new mask and cost the whole product again).
#
# Measured (2-layer BERT-base-wide bert_mlm, seq 512, batch 2, CPU clock, median of 6 steps
# beside plain): recomputing under autograd into fresh arrays cost +9.6% (+10.8% with dropout);
# the backward operators into kept buffers (mx/workspace.py) +3.4% (+3.3%).
#
# NOTE [ what the core attention operator allocates ]
# Outside MXNet's static plan: the s^2 buffers the operators keep between calls (mx/workspace.py:
# scores and then their gradient, probabilities, the probabilities' gradient; with dropout the
# float mask), shared by every instance.  Over the whole batch each is 100 MB for BERT-base at
# seq 512, batch 8 (batch x heads x seq x seq), which would undo a third of the saving; so the
# operator runs a few sequences at a time (``pass_mb``: one s^2 tensor of a pass within 16 MB,
# one sequence of BERT-base at seq 512), slicing ``qkv`` on its batch axis and concatenating
# outputs and gradients.  Every sequence's products and softmax rows are computed by the same
# kernels on the same numbers, so the results are those of one pass (tests compare with the
# plain graph bit for bit).
# With dropout, the kept masks of all layers, as bits.  core.attention.core_attention_workspace
# counts both; the footprint and the bench report them beside the static figure.
#
# NOTE [ the attention dropout's mask ]
# The mask is drawn with NumPy, not with MXNet's generator: a draw pushed from inside the
# operator's callback competes with the executor's own Dropouts (pushed before the callback
# runs) for the generator's engine variable, so which draws which numbers is the engine's
# order, not the graph's, and a feared deadlock was the reason to avoid it (measured: 20
# iterations of a 2-layer model with downstream Dropouts drawing through ``mx.nd.random`` did
# not hang, MKLDNN on and off; not a proof).  Each operator instance has a
# ``numpy.random.Generator`` (SFC64) seeded from MXNet's stream when it is created (so
# ``mx.random.seed`` makes runs repeat), keeps ``rand >= p`` as bits (``np.packbits``: 1 bit
# per element, 3 MB per BERT-base layer at seq 512, batch 8) and unpacks them in backward
# (drawing again from a kept per-call seed, Megatron's replay, would keep nothing but cost a
# second draw of 25M numbers per layer, ~80 ms on this CPU, against ~10 ms to unpack).
# The kept element is scaled by MXNet's ``1.0f / (1.0f - p)``, so the product is bit for bit
# what MXNet's Dropout computes for that mask.  The draws are not MXNet's Dropout draws at
# the same seed; like ``recompute_dropout`` this is opt-in.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Tuple

import mxnet as mx
import numpy as np

from ..core.attention import (CORE_ATTENTION_OP, DEFAULT_PASS_MB, CoreAttention, find_core_attention,
                              sequences_per_pass)
from ..core.graph import KEEP_ATTR
from .backward_ops import invoke
from .convert import attr_true, load_rewritten, rebuild_nodes, structural_graph
from .dropout import dropout_scale
from .workspace import buffer, pushing

__all__ = ["recompute_core_attention", "CORE_ATTENTION_OP", "CoreAttentionOp"]

logger = logging.getLogger(__name__)


class CoreAttentionOp(mx.operator.CustomOp):
    """Forward: the core attention; backward: the probabilities recomputed from ``qkv`` and MXNet's
    backward operators, a few sequences at a time (NOTE [ core attention in one operator ])."""

    def __init__(self, heads: int, softmax: Dict[str, str], p: float, mode: str, seed: int,
                 per_pass: int) -> None:
        super().__init__()
        self.heads = heads
        self.softmax = softmax
        self.use_length = attr_true(softmax.get("use_length", "False"))
        self.p = p
        self.mode = mode
        self.per_pass = per_pass
        self._rng = np.random.Generator(np.random.SFC64(seed))
        self._bits: List[Tuple[np.ndarray, Tuple[int, ...]]] = []

    def _keep(self, shape: Tuple[int, ...]) -> np.ndarray:
        """A fresh keep mask (True where the probability is kept) of ``shape``."""
        return self._rng.random(shape, dtype=np.float32) >= np.float32(self.p)

    def _mask(self, keep: np.ndarray, ctx: "mx.Context") -> "mx.nd.NDArray":
        """The float32 mask MXNet's Dropout multiplies by: 0 or exactly ``1.0f / (1.0f - p)``
        (copied over as bytes, scaled by MXNet's multi-threaded operators, in a kept buffer)."""
        kept = mx.nd.array(keep.view(np.uint8), ctx=ctx, dtype=np.uint8)
        mask = buffer("attention_mask", keep.shape, ctx)
        mx.nd.cast(kept, dtype="float32", out=mask)
        mask *= float(np.float32(dropout_scale(self.p)))
        return mask

    def _passes(self, qkv: "mx.nd.NDArray", length: Optional["mx.nd.NDArray"]):
        """``(qkv, length)`` of each pass: ``per_pass`` sequences (axis 1 of ``qkv``)."""
        batch = qkv.shape[1]
        if self.per_pass >= batch:
            yield qkv, length
            return
        for low in range(0, batch, self.per_pass):
            high = min(low + self.per_pass, batch)
            rows = None if length is None else length[low * self.heads:high * self.heads]
            yield mx.nd.slice_axis(qkv, axis=1, begin=low, end=high), rows

    def _probabilities(self, qkv: "mx.nd.NDArray", length: Optional["mx.nd.NDArray"],
                       mask: Optional["mx.nd.NDArray"]) -> Tuple["mx.nd.NDArray", "mx.nd.NDArray"]:
        """``(softmax probabilities, what the product with the values reads)`` of one pass, in
        kept buffers (NOTE [ a workspace kept between calls ] in mx/workspace.py)."""
        seq, batch, _ = qkv.shape
        square = (batch * self.heads, seq, seq)
        scores = buffer("attention_a", square, qkv.context)
        probs = buffer("attention_b", square, qkv.context)
        mx.nd.contrib.interleaved_matmul_selfatt_qk(qkv, heads=self.heads, out=scores)
        if length is not None:
            mx.nd.softmax(scores, length, out=probs, **self.softmax)
        else:
            mx.nd.softmax(scores, out=probs, **self.softmax)
        if mask is None:
            return probs, probs
        dropped = buffer("attention_c", square, qkv.context)
        mx.nd.elemwise_mul(probs, mask, out=dropped)
        return probs, dropped

    def _pass_mask(self, qkv: "mx.nd.NDArray", is_train: bool) -> Optional["mx.nd.NDArray"]:
        """The mask of a forward pass over ``qkv`` (its bits kept for backward in training)."""
        if not self.p > 0 or not (is_train or self.mode == "always"):
            return None
        seq, batch, _ = qkv.shape
        shape = (batch * self.heads, seq, seq)
        keep = self._keep(shape)
        if is_train:
            self._bits.append((np.packbits(keep, axis=None), shape))
        return self._mask(keep, qkv.context)

    def forward(self, is_train, req, in_data, out_data, aux):  # noqa: D102 (MXNet's signature)
        with pushing():
            self._forward(is_train, req, in_data, out_data)

    def _forward(self, is_train, req, in_data, out_data) -> None:
        self._bits = []
        length = in_data[1] if self.use_length else None
        outputs = []
        for qkv, rows in self._passes(in_data[0], length):
            _, read = self._probabilities(qkv, rows, self._pass_mask(qkv, is_train))
            outputs.append(mx.nd.contrib.interleaved_matmul_selfatt_valatt(qkv, read, heads=self.heads))
        out = outputs[0] if len(outputs) == 1 else mx.nd.concat(*outputs, dim=1)
        self.assign(out_data[0], req[0], out)

    def _pass_gradient(self, qkv: "mx.nd.NDArray", length: Optional["mx.nd.NDArray"],
                       head_grad: "mx.nd.NDArray", mask: Optional["mx.nd.NDArray"]) -> "mx.nd.NDArray":
        """The gradient of one pass's ``qkv``: the probabilities recomputed, then the gradient
        pass's own backward operators (NOTE [ calling MXNet's backward operators ])."""
        probs, read = self._probabilities(qkv, length, mask)
        scores_grad = buffer("attention_a", probs.shape, qkv.context)   # the scores are spent
        from_values = mx.nd.empty(qkv.shape, ctx=qkv.context, dtype=qkv.dtype)
        invoke("_backward_interleaved_matmul_selfatt_valatt", [head_grad, qkv, read],
               [from_values, scores_grad], heads=self.heads)
        probs_grad = scores_grad
        if mask is not None:
            probs_grad = buffer("attention_c", probs.shape, qkv.context)
            mx.nd.elemwise_mul(scores_grad, mask, out=probs_grad)
        softmax_grad = buffer("attention_a" if mask is not None else "attention_c", probs.shape,
                              qkv.context)
        if length is not None:   # ElemwiseGradUseInOut: ograd, data (not read), length, output
            invoke("_backward_softmax", [probs_grad, probs_grad, length, probs],
                   [softmax_grad, mx.nd.empty(length.shape, ctx=qkv.context, dtype=length.dtype)],
                   **self.softmax)
        else:                    # ElemwiseGradUseOut: ograd, output
            invoke("_backward_softmax", [probs_grad, probs], [softmax_grad], **self.softmax)
        from_keys = mx.nd.empty(qkv.shape, ctx=qkv.context, dtype=qkv.dtype)
        invoke("_backward_interleaved_matmul_selfatt_qk", [softmax_grad, qkv], [from_keys],
               heads=self.heads)
        return from_values + from_keys

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):  # noqa: D102
        with pushing():
            self._backward(req, out_grad, in_data, in_grad)

    def _backward(self, req, out_grad, in_data, in_grad) -> None:
        length = in_data[1] if self.use_length else None
        grads = []
        passes = zip(self._passes(in_data[0], length), self._passes(out_grad[0], None))
        for index, ((qkv, rows), (head_grad, _)) in enumerate(passes):
            mask = None
            if self._bits:
                bits, shape = self._bits[index]
                keep = np.unpackbits(bits, count=int(np.prod(shape))).view(bool).reshape(shape)
                mask = self._mask(keep, qkv.context)
            grads.append(self._pass_gradient(qkv, rows, head_grad, mask))
        self.assign(in_grad[0], req[0], grads[0] if len(grads) == 1 else mx.nd.concat(*grads, dim=1))
        if self.use_length:
            self.assign(in_grad[1], req[1], mx.nd.zeros_like(in_grad[1]))


@mx.operator.register(CORE_ATTENTION_OP)
class CoreAttentionProp(mx.operator.CustomOpProp):
    """Shapes, types and dependencies of :class:`CoreAttentionOp` (parameters arrive as strings)."""

    def __init__(self, heads: str, p: str = "0", mode: str = "training", axis: str = "-1",
                 temperature: Optional[str] = None, use_length: str = "False",
                 pass_mb: str = str(DEFAULT_PASS_MB), **_user: str) -> None:
        super().__init__(need_top_grad=True)
        self.heads = int(heads)
        self.p = float(p)
        self.mode = mode
        self.pass_mb = float(pass_mb)
        self.softmax = {"axis": axis, "use_length": use_length}
        if temperature is not None and temperature != "None":
            self.softmax["temperature"] = temperature
        self.use_length = attr_true(use_length)

    def list_arguments(self) -> List[str]:  # noqa: D102
        return ["qkv", "length"] if self.use_length else ["qkv"]

    def list_outputs(self) -> List[str]:  # noqa: D102
        return ["output"]

    def infer_shape(self, in_shape):  # noqa: D102
        seq, batch, width = in_shape[0]
        return in_shape, [(seq, batch, width // 3)], []

    def infer_type(self, in_type):  # noqa: D102
        return in_type, [in_type[0]], []

    def declare_backward_dependency(self, out_grad, in_data, out_data):  # noqa: D102
        return [out_grad[0]] + list(in_data)

    def create_operator(self, ctx, shapes, dtypes):  # noqa: D102
        seq = shapes[0][0]
        seed = 0
        if self.p:  # from MXNet's stream: mx.random.seed makes the masks repeat
            seed = int(mx.nd.random.randint(0, 2 ** 31 - 1, shape=(1,), ctx=mx.cpu()).asnumpy()[0])
        return CoreAttentionOp(self.heads, self.softmax, self.p, self.mode, seed,
                               sequences_per_pass(self.pass_mb, self.heads, seq))


def _fused_node(node: Dict[str, Any], match: CoreAttention, inputs: List[List[int]],
                pass_mb: float) -> Dict[str, Any]:
    """The Custom node standing for ``match``; named as its product with the values was."""
    attrs = {"op_type": CORE_ATTENTION_OP, "heads": str(match.heads), "pass_mb": repr(float(pass_mb)),
             KEEP_ATTR: "True", **match.softmax_attrs}
    if match.dropout is not None:
        attrs.update(p=repr(match.p), mode=match.mode)
    attrs.update({k: v for k, v in (node.get("attrs") or {}).items() if k.startswith("__")})
    return {"op": "Custom", "name": node["name"], "attrs": attrs, "inputs": inputs}


def recompute_core_attention(symbol: "mx.sym.Symbol", with_dropout: bool = False,
                             pass_mb: float = DEFAULT_PASS_MB) -> "mx.sym.Symbol":
    """``symbol`` with every core attention replaced by one recomputing operator.

    See NOTE [ core attention in one operator ].  Arguments, outputs, auxiliary states and
    output names are the user's; the symbol given is not modified.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol.
    with_dropout : bool
        Take in the Dropout of the attention probabilities (its mask then drawn by the operator:
        NOTE [ the attention dropout's mask ]; ``recompute_dropout``).
    pass_mb : float
        The operator runs over as many sequences at once as keep one s^2 temporary within this
        many MB (NOTE [ what the core attention operator allocates ]).

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol, or ``symbol`` itself when it has no core attention to replace.
    """
    document = json.loads(symbol.tojson())
    matches = find_core_attention(structural_graph(document), with_dropout)
    if not matches:
        return symbol
    by_valatt = {match.valatt: match for match in matches}

    def fused(position: int, node: Dict[str, Any], remap: Dict[int, int]) -> Optional[Dict[str, Any]]:
        if position not in by_valatt:
            return None
        match = by_valatt[position]
        sources = [match.qkv] + ([match.length] if match.length is not None else [])
        return _fused_node(node, match, [[remap[s], o, 0] for s, o in sources], pass_mb)

    out, heads = rebuild_nodes(document, {p for match in matches for p in match.removed}, fused)
    result = load_rewritten(symbol, out, heads, document.get("attrs", {}),
                            "replacing the core attention changed the symbol's arguments, outputs or "
                            "auxiliary states; please report this symbol")
    logger.info("core attention: %d recomputed in one operator each", len(matches))
    return result
