"""Recomputable dropout: rewrite ``Dropout`` so its product can be recomputed.

MXNet never recomputes ``Dropout`` (a second draw would give a new mask), so in
a mirrored network every Dropout output and its float32 mask stay alive until
backward.  :func:`recomputable_dropout` rewrites each Dropout of a symbol into
a mask drawn once by a node that is never recomputed, and an elementwise
product the planners may recompute.

# NOTE [ recomputable dropout form ]
# For ``y = Dropout(x, p, mode, axes)`` named N the rewrite is
#
#   d = BlockGrad(Dropout(ones_like(x'), p, mode))   N_mask (N_mask_ones, N_mask_draw): kept
#   N = x * d                                        elemwise_mul (broadcast_mul with axes)
#
# where x' is x sliced to length 1 on each of ``axes`` (the mask is drawn at the
# reduced shape and broadcast, as MXNet's ``axes`` does).  In training MXNet's
# Dropout of ones is 0 or exactly its scale ``1.0f / (1.0f - p)``, so N is
# ``x * scale`` where kept, bit for bit what MXNet's Dropout computes for that
# mask; in inference (mode 'training', ``is_train=False``) the ones pass
# through and N is x.  The final node takes the Dropout's name, so output names
# are unchanged; no variable is added, so checkpoints are unaffected.
#
# The nodes that draw and hold d carry KEEP_ATTR (core.graph): never
# recomputed, so backward always sees the mask forward used; the draw is a
# ``Dropout`` anyway (never recomputed by MXNet).  BlockGrad stops the gradient
# pass at d (without it, the draw's backward would keep its own mask alive).
# The product N is an ordinary elementwise node the planners may recompute.
#
# Measured alternatives (MXNet 1.9.1, CPU, static plan, ``memory_budget='min'``):
# a 1-byte mask (``Cast(..., uint8)`` and ``where`` to select and scale) plans
# MORE memory, not less: nnvm's memory planner counts every element as 4 bytes
# whatever its dtype (a uint8 intermediate of 1M elements adds 4 MB to
# ``Total N MB allocated``), and the selects need two conditions and two
# two-output backward nodes.  A 4-layer post-norm transformer (hidden 128, seq 256,
# batch 8, flattened into the classifier): 98 MB as written, 137 MB with the byte
# mask, 122 MB with this form;
# 6-layer dropout MLP (2048 wide, batch 512): 48, 52, 44 MB.  MXNet's one-level
# mirror replays recomputed nodes early in backward, so a recomputed Dropout
# product lives about as long as a kept one; a kept Dropout output even acts
# as a free checkpoint in attention.  The rewrite therefore helps some
# networks and hurts others, and ``plan_mirror`` plans both and keeps the lower
# (NOTE [ recomputable dropout, both ways ] in plan.py).
#
# The masks come from MXNet's own random stream, but drawn on a tensor of ones
# by an extra node, so they are not bit-identical to the draws the user's
# Dropout would have made at the same seed; hence an option, off by default.
# Dropout nodes whose mask output (index 1) is read by another node, and
# ``p == 0``, are left as they are.  The rewrite is idempotent: draws carry
# KEEP_ATTR and are never rewritten again.
"""
from __future__ import annotations

import ast
import json
import logging
from typing import Any, Dict, List, Optional, Tuple

import mxnet as mx
import numpy as np

from ..core.graph import KEEP_ATTR
from .convert import load_rewritten

__all__ = ["recomputable_dropout", "dropout_scale", "SOURCE_ATTR", "MASK_SUFFIX"]

logger = logging.getLogger(__name__)

#: Attribute marking the nodes that draw and store a mask: never recomputed (the planners read it,
#: :data:`~mxnet_mirror_hook.core.graph.KEEP_ATTR`) and never rewritten again.
SOURCE_ATTR = KEEP_ATTR
#: Suffix of the stored 1-byte mask node of a rewritten Dropout named N (``N_mask``).
MASK_SUFFIX = "_mask"

Entry = List[int]


def dropout_scale(p: float) -> float:
    """The factor MXNet's Dropout multiplies kept elements by: ``1.0f / (1.0f - p)`` in float32."""
    return float(np.float32(1.0) / (np.float32(1.0) - np.float32(p)))


def _axes(text: str) -> Tuple[int, ...]:
    if not text:
        return ()
    value = ast.literal_eval(text)
    return tuple(int(a) for a in (value if isinstance(value, (tuple, list)) else (value,)))


def recomputable_dropout(symbol: "mx.sym.Symbol") -> "mx.sym.Symbol":
    """``symbol`` with every rewritable ``Dropout`` in the recomputable form.

    See NOTE [ recomputable dropout form ].  Arguments, auxiliary states and
    output names are the user's; the symbol given is not modified.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol.

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol, or ``symbol`` itself when it has no Dropout to
        rewrite.
    """
    document = json.loads(symbol.tojson())
    nodes: List[Dict[str, Any]] = document["nodes"]
    mask_readers = {entry[0] for node in nodes for entry in node["inputs"] if entry[1] == 1}
    mask_readers |= {entry[0] for entry in document["heads"] if entry[1] == 1}

    def rewritable(index: int, node: Dict[str, Any]) -> bool:
        if node["op"] != "Dropout" or SOURCE_ATTR in (node.get("attrs") or {}):
            return False
        if index in mask_readers:
            logger.warning("Dropout %s: its mask output is read by another node; not rewritten",
                           node["name"])
            return False
        return float((node.get("attrs") or {}).get("p", "0.5")) > 0.0

    targets = [i for i, node in enumerate(nodes) if rewritable(i, node)]
    if not targets:
        return symbol
    out: List[Dict[str, Any]] = []
    remap: Dict[int, int] = {}

    def add(op: str, name: str, inputs: List[Entry], attrs: Optional[Dict[str, str]] = None,
            keep: bool = False) -> Entry:
        # A name the symbol has already (two Dropouts of one name) is allowed: nodes are
        # told apart by position (NOTE [ nodes are identified by key, not by name ]).
        node: Dict[str, Any] = {"op": op, "name": name, "inputs": inputs}
        if keep:
            attrs = {**(attrs or {}), SOURCE_ATTR: "True"}
        if attrs:
            node["attrs"] = attrs
        out.append(node)
        return [len(out) - 1, 0, 0]

    rewrite = set(targets)
    for index, node in enumerate(nodes):
        inputs = [[remap[e[0]], e[1], e[2]] for e in node["inputs"]]
        if index not in rewrite:
            out.append({**node, "inputs": inputs})
            remap[index] = len(out) - 1
            continue
        name, attrs = node["name"], dict(node.get("attrs") or {})  # the final node keeps the name
        x = inputs[0]
        source = x
        for k, axis in enumerate(_axes(attrs.get("axes", ""))):
            source = add("slice_axis", f"{name}_mask_slice{k}", [source],
                         {"axis": str(axis), "begin": "0", "end": "1"}, keep=True)
        ones = add("ones_like", f"{name}_mask_ones", [source], keep=True)
        draw_attrs = {"p": attrs.get("p", "0.5")}
        for key in ("mode", "cudnn_off"):
            if key in attrs:
                draw_attrs[key] = attrs[key]
        draw = add("Dropout", f"{name}_mask_draw", [ones], draw_attrs, keep=True)
        mask = add("BlockGrad", f"{name}{MASK_SUFFIX}", [draw], keep=True)
        final = add("elemwise_mul" if source is x else "broadcast_mul", name, [x, mask],
                    {k: v for k, v in attrs.items() if k.startswith("__")})
        remap[index] = final[0]
    result = load_rewritten(symbol, out, [[remap[e[0]], e[1], e[2]] for e in document["heads"]],
                            document.get("attrs", {}),
                            "rewriting Dropout changed the symbol's arguments, outputs or auxiliary "
                            "states; leave recompute_dropout off for this network")
    logger.info("recomputable dropout: %d Dropout node(s) rewritten", len(targets))
    return result
