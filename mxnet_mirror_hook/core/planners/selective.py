"""Selective recomputation: keep the outputs of expensive operators, recompute the cheap ones.

This is the rule of MXNet's own ``MXNET_BACKWARD_DO_MIRROR=1`` (``need_mirror`` in
``src/executor/graph_executor.cc``): convolutions, dense layers, concatenations
and the loss are kept, everything else is recomputed.  It costs little extra
compute, and on graphs without good cut points (unrolled RNNs) it saves more
than any threshold search.  Two variants are proposed: MXNet's (BatchNorm kept
too) and one that also recomputes BatchNorm (safe here, NOTE [ BatchNorm
recomputed ] in ``mx/apply.py``).
"""
from __future__ import annotations

from typing import List

from ..graph import Graph
from .registry import register_planner
from .base import Decision, Planner

__all__ = ["EXPENSIVE_OPS", "selective_decisions", "SelectivePlanner"]

#: Operators whose outputs MXNet's built-in mirroring keeps.
EXPENSIVE_OPS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "Concat", "concat",
                           "SoftmaxOutput", "dot", "batch_dot", "RNN"})
BATCHNORM_OPS = frozenset({"BatchNorm", "CuDNNBatchNorm"})


def selective_decisions(graph: Graph) -> List[Decision]:
    """Recompute every cheap operator; with and without BatchNorm."""
    cheap = frozenset(n.name for n in graph.nodes if n.can_mirror and n.op not in EXPENSIVE_OPS)
    without_bn = frozenset(n for n in cheap if graph.node(n).op not in BATCHNORM_OPS)
    return [Decision(cheap, "selective"), Decision(without_bn, "selective, BatchNorm kept")]


@register_planner("selective")
class SelectivePlanner(Planner):
    """Keeps expensive outputs (convolutions, dense layers...), recomputes the rest."""

    name = "selective"

    def propose(self, graph: Graph) -> List[Decision]:
        return selective_decisions(graph)
