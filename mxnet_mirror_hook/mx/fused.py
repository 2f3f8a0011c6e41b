"""Every fused recomputing operator applied to a symbol (NOTE [ fused recomputation ] in core/fused.py).

Importing this module registers all of their ``Custom`` operators (:mod:`.apply` imports it, so
every process that plans or binds a plan has them) and makes MXNet's Custom backward dependencies
common to all kinds (NOTE [ one process-wide set of backward dependencies ] in mx/custom_deps.py:
without it, two kinds of fused operator in one symbol crash in backward).
"""
from __future__ import annotations

import logging

import mxnet as mx

from .attention import recompute_core_attention
from .custom_deps import use_common_dependencies
from .fused_activation import recompute_activations
from .fused_layer_norm import recompute_layer_norms

__all__ = ["fuse_for_recomputation"]

logger = logging.getLogger(__name__)

use_common_dependencies()


def fuse_for_recomputation(symbol: "mx.sym.Symbol", with_dropout: bool = False) -> "mx.sym.Symbol":
    """``symbol`` with every pattern a fused operator recomputes replaced by it: each core
    attention, then each LayerNorm read by a FullyConnected, then each activation read by one.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The user's symbol (not modified).
    with_dropout : bool
        Take the attention Dropout into the core-attention operator (``recompute_dropout``).

    Returns
    -------
    mx.sym.Symbol
        The rewritten symbol (arguments, outputs and auxiliary states the user's), or ``symbol``
        itself when nothing matched.
    """
    rewritten = recompute_core_attention(symbol, with_dropout=with_dropout)
    rewritten = recompute_layer_norms(rewritten)
    return recompute_activations(rewritten)
