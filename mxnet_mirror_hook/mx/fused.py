"""Every fused recomputing operator applied to a symbol (NOTE [ fused recomputation ] in core/fused.py).

Importing this module registers all of their ``Custom`` operators (:mod:`.apply` imports it, so
every process that plans or binds a plan has them) and makes MXNet's Custom backward dependencies
common to all kinds (NOTE [ one process-wide set of backward dependencies ] in mx/custom_deps.py:
without it, two kinds of fused operator in one symbol crash in backward).
"""
from __future__ import annotations

import logging
from typing import Iterable

import mxnet as mx

from .attention import recompute_core_attention
from .custom_deps import use_common_dependencies
from .fused_activation import recompute_activations
from .fused_layer_norm import recompute_layer_norms

__all__ = ["fuse_for_recomputation", "RECOMPUTED_OPS"]

logger = logging.getLogger(__name__)

use_common_dependencies()


#: The operator types each rewrite recomputes (a kind is left out when ``keep_ops`` names one).
RECOMPUTED_OPS = {
    "core attention": frozenset({"_contrib_interleaved_matmul_selfatt_qk", "softmax", "Dropout"}),
    "LayerNorm": frozenset({"LayerNorm"}),
    "activation": frozenset({"LeakyReLU", "Activation"}),
}


def fuse_for_recomputation(symbol: "mx.sym.Symbol", with_dropout: bool = False,
                           keep_ops: Iterable[str] = ()) -> "mx.sym.Symbol":
    """``symbol`` with every pattern a fused operator recomputes replaced by it: each core
    attention, then each LayerNorm read by a FullyConnected, then each activation read by one.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol (not modified).
    with_dropout : bool
        Take the attention Dropout into the core-attention operator (``recompute_dropout``).
    keep_ops : iterable of str
        Operator types never to recompute (``MirrorOptions.keep_ops``): a kind that would
        recompute one of them is not applied (:data:`RECOMPUTED_OPS`).

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol (arguments, outputs and auxiliary states the user's), or ``symbol``
        itself when nothing matched.
    """
    kept = frozenset(keep_ops)
    rewritten = symbol
    if not kept & RECOMPUTED_OPS["core attention"]:
        rewritten = recompute_core_attention(rewritten, with_dropout=with_dropout)
    if not kept & RECOMPUTED_OPS["LayerNorm"]:
        rewritten = recompute_layer_norms(rewritten)
    if not kept & RECOMPUTED_OPS["activation"]:
        rewritten = recompute_activations(rewritten)
    return rewritten
