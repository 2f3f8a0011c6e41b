"""The fused operators that recompute inside their own backward, as one registry (pure Python).

# NOTE [ fused recomputation ]
# MXNet 1.9.1's one-level mirror replays a recomputed node as soon as its inputs are there, which
# for a node recomputed from kept tensors is the start of backward: recomputing a transformer's
# cheap parts (the core attention, the GELU, the LayerNorms) frees little or nothing, all copies
# being alive together (NOTE [ planning the fused variant ] in planning/fused.py).  A fused
# operator is one ``Custom`` node standing for a few operators: it keeps only its inputs and
# recomputes the rest inside its own backward, right where the gradients read it, then calls
# MXNet's backward kernels (NOTE [ calling MXNet's backward operators ] in mx/backward_ops.py):
#
# - the core attention (core/attention.py, mx/attention.py): query-key product, softmax,
#   attention Dropout and product with the values, keeping ``qkv``;
# - a LayerNorm and the FullyConnected reading it (core/fused_layer_norm.py), keeping the
#   LayerNorm's input;
# - an element-wise activation and the FullyConnected reading it (core/fused_activation.py),
#   keeping the activation's input.
#
# Each kind gives the cost of its whole forward (what ``forward_cost`` counts for the node, so an
# iteration of the rewritten graph costs what the user's does), the cost its backward adds (the
# recomputation: the plan's overhead) and the bytes it keeps outside MXNet's static plan (its
# buffers, kept between calls and shared by the operators of its kind; different kinds keep
# different buffers, so the figures add up).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .attention import (core_attention_cost, core_attention_recompute_cost, core_attention_workspace,
                        is_core_attention)
from .fused_activation import (activation_recompute_cost, fused_activation_cost, fused_activation_workspace,
                               is_fused_activation)
from .fused_layer_norm import (fused_layer_norm_forward_cost, fused_layer_norm_workspace, is_fused_layer_norm,
                               layer_norm_recompute_cost)
from .graph import Graph, Node

__all__ = ["FusedKind", "FUSED_KINDS", "fused_kind", "fused_forward_cost", "fused_recompute_cost",
           "fused_outside_bytes", "fused_counts"]


@dataclass(frozen=True)
class FusedKind:
    """One kind of fused operator.

    Attributes
    ----------
    name : str
        What it stands for, in messages (``'core attention'``).
    is_node : callable
        Whether a node is one.
    forward_cost : callable
        ``(graph, node) -> operations`` of its whole forward.
    recompute_cost : callable
        ``(graph, node) -> operations`` its backward adds.
    outside_bytes : callable
        ``graph -> bytes`` the operators of this kind keep outside MXNet's static plan.
    """

    name: str
    is_node: Callable[[Node], bool]
    forward_cost: Callable[[Graph, Node], float]
    recompute_cost: Callable[[Graph, Node], float]
    outside_bytes: Callable[[Graph], int]


def _attention_bytes(graph: Graph) -> int:
    temporaries, masks = core_attention_workspace(graph)
    return temporaries + masks


#: Every kind, in the order the rewrites run (mx/fused.py).
FUSED_KINDS: Tuple[FusedKind, ...] = (
    FusedKind("core attention", is_core_attention, core_attention_cost, core_attention_recompute_cost,
              _attention_bytes),
    FusedKind("LayerNorm", is_fused_layer_norm, fused_layer_norm_forward_cost, layer_norm_recompute_cost,
              fused_layer_norm_workspace),
    FusedKind("activation", is_fused_activation, fused_activation_cost, activation_recompute_cost,
              fused_activation_workspace),
)


def fused_kind(node: Node) -> Optional[FusedKind]:
    """The kind of fused operator ``node`` is, or None."""
    if node.op != "Custom":
        return None
    return next((kind for kind in FUSED_KINDS if kind.is_node(node)), None)


def fused_forward_cost(graph: Graph, node: Node) -> Optional[float]:
    """Operations of one forward of a fused node (None when ``node`` is not one)."""
    kind = fused_kind(node)
    return None if kind is None else kind.forward_cost(graph, node)


def fused_recompute_cost(graph: Graph) -> float:
    """Operations every fused node of ``graph`` adds in backward, together."""
    total = 0.0
    for node in graph.nodes:
        kind = fused_kind(node)
        if kind is not None:
            total += kind.recompute_cost(graph, node)
    return total


def fused_outside_bytes(graph: Graph) -> int:
    """Bytes the fused operators of ``graph`` keep outside MXNet's static plan, all kinds."""
    return sum(kind.outside_bytes(graph) for kind in FUSED_KINDS)


def fused_counts(graph: Graph) -> Dict[str, int]:
    """Fused nodes of ``graph`` per kind (kinds with none left out)."""
    counts: Dict[str, int] = {}
    for node in graph.nodes:
        kind = fused_kind(node)
        if kind is not None:
            counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts
