"""The whole footprint of a segment chain beside the one-level plan's, as ``backend='auto'`` compares
them: :func:`segment_footprint` (the chain's footprint, MKLDNN's copies at the cuts included) and
:func:`compare_backends`.

# NOTE [ auto decides on the whole footprint ]
# ``'auto'`` used to take executor segments when their static figure (MXNet's plan of
# the activations) was clearly below the one-level plan's.  A chain of executors holds
# more than its static figure says, and on a CPU with MKLDNN much more: gluonnlp's
# BERT-base (seq 128, batch 8, BERTAdam) planned 226 MB in 16 segments against 720 MB
# one-level, and peaked at 2580 MB against 2484 MB with MKLDNN (1994 against 2504
# without).  So the decision compares whole footprints (core/footprint.py's
# ``Footprint``) on the device the plan will run on: parameters, gradients, optimizer
# state and inputs are the same for both plans and cancel; the activations, the
# temporary-space copies (one per executor up to MXNET_CPU_TEMP_COPY, grown larger in
# a chain with MKLDNN: mx/footprint.py) and the copies at the cuts (NOTE [ MKLDNN copies
# at the cuts ]) do not.  The margin stays what it was: the segments must save at least
# (1 - SEGMENT_WIN_FRACTION) of the one-level plan's activation figure, now in whole
# footprint.  The comparison is made for both surfaces (a bound ``Module`` and a Gluon
# block count temporary space differently) and the segments must win under both, so
# one cached decision serves either; the device and whether MKLDNN runs are part of the
# decision's cache key (:func:`decision_tag`).
#
# NOTE [ MKLDNN copies at the cuts ]
# Measured with the storage profiler (mx/profile.py; SGD with momentum, MXNet 1.9.1, CPU,
# two training steps) on BERT-shaped symbols of the project's own (testing.models.bert_mlm,
# seq 128, batch 8, tied decoder), the peak with MKLDNN on minus the peak with
# MXNET_MKLDNN_ENABLED=0 (MB):
#   4 layers x 256, vocab 2000, Module: one-level -4.5; 2 / 4 / 8 segments +16 / +34 / +36
#   same, Gluon:                        one-level -4.6; 4 / 8 segments +34 / +36
#   12 x 256, vocab 2000, dropout 0.1 replayed, Gluon: one-level +8; 4 / 16 segments +34 / +32
#   4 x 256, vocab 30522, Gluon:        one-level -8; 4 segments +240
#   12 x 768 (BERT-base), vocab 30522, dropout 0.1, Gluon: one-level +24; 16 segments +719
# Three things a chain holds with MKLDNN:
# - Temporary spaces grown by the chain's reorders (boundary arrays arrive in MKLDNN
#   layout and are reordered beside the operator's output), about 8x the largest request
#   and saturating at MXNET_CPU_TEMP_COPY (4) executors (12 and 16 segments add no more
#   than 4): mx/footprint.py counts them (min(executors, 4) copies for Module, all 4 for
#   Gluon, of four times the request in a chain).
# - One re-laid-out copy of the tensors crossing the cuts (the plan's boundary bytes).
# - A weight that several segments read has its gradient summed ('add', NOTE [ one variable
#   per reader ]); an MKLDNN FullyConnected or Convolution adding to a gradient computes it in
#   a TmpMemMgr buffer first (doubled, and again in a chain).  That is what grows with the
#   vocabulary: the tied 30522-word decoder weight (89 MB at width 768, 30 MB at 256) costs
#   553 MB (6.2x) and 214 MB (7.2x) beyond the two terms above; counted as
#   SUMMED_GRADIENT_COPIES = 6 copies of each such weight (MB here are MiB).
# With all three (predicted against measured, MKLDNN on, Gluon): BERT-base one-level 1937 /
# 1908 MB and 16 segments 2244 / 2288 (both decided right: the chain is above the one-level
# plan); 4 x 256 vocab 30522: 280 / 295 and 452 / 519; the chains of vocabulary 2000 within
# -8..+30 MB of their measured difference to the one-level plan (an upper bound: on the
# 12-layer one, 16 segments 37 MB below the one-level plan measured, 7 MB predicted, so 'auto'
# keeps the one-level plan there).  Nothing on a GPU (no MKLDNN) or with
# MXNET_MKLDNN_ENABLED=0.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import env
from ..core.footprint import Footprint, tensor_bytes
from ..core.segments import SegmentPlan
from ..core.units import to_mb
from .footprint import FootprintSource

__all__ = ["BackendFootprints", "compare_backends", "segment_footprint", "chain_copies_bytes",
           "SUMMED_GRADIENT_COPIES",
           "decision_tag", "mkldnn_runs", "footprint_source_of", "SURFACES"]

#: Operators whose MKLDNN kernels write their weight's gradient (with 'add': through TmpMemMgr).
_WEIGHTED_MKLDNN = frozenset({"Convolution", "Deconvolution", "FullyConnected"})
#: The surfaces the decision is made for (NOTE [ auto decides on the whole footprint ]).
SURFACES = ("module", "gluon")


def mkldnn_runs(device: str) -> bool:
    """Whether MKLDNN runs on ``device`` in this process (the CPU unless ``MXNET_MKLDNN_ENABLED=0``)."""
    return device == "cpu" and not env.mkldnn_switched_off()


def decision_tag(source: FootprintSource) -> str:
    """What the ``'auto'`` decision depends on beyond the plan's key: the device and MKLDNN
    (``'@cpu+mkldnn'``, ``'@cpu'``, ``'@gpu'``)."""
    return f"@{source.device}" + ("+mkldnn" if mkldnn_runs(source.device) else "")


#: TmpMemMgr bytes per byte of a summed weight gradient an MKLDNN operator adds to in a chain
#: (NOTE [ MKLDNN copies at the cuts ]).
SUMMED_GRADIENT_COPIES = 6


def _summed_mkldnn_weights(source: FootprintSource, plan: SegmentPlan) -> int:
    """Bytes of the float32 weights several segments read (their gradients summed, 'add') that a
    Convolution, Deconvolution or FullyConnected reads as its weight."""
    shared = set(plan.shared_variables())
    requests = dict(source.grad_req)
    nodes = json.loads(source.symbol.tojson())["nodes"]
    weights = {nodes[node["inputs"][1][0]]["name"] for node in nodes
               if node["op"] in _WEIGHTED_MKLDNN and len(node["inputs"]) > 1}
    names = source.symbol.list_arguments()
    arg_shapes, _, _ = source.symbol.infer_shape(**dict(source.shapes))
    arg_types, _, _ = source.symbol.infer_type(**dict(source.dtypes))
    total = 0
    for name, shape, dtype in zip(names, arg_shapes, arg_types):
        if name in shared & weights and requests.get(name, "null") != "null" \
                and np.dtype(dtype) == np.float32:
            total += tensor_bytes(tuple(shape), "float32")
    return total


def chain_copies_bytes(source: FootprintSource, plan: Optional[SegmentPlan]) -> int:
    """Bytes a chain of executors holds on a CPU with MKLDNN beyond what the footprint's
    temporary-space figure counts (NOTE [ MKLDNN copies at the cuts ]): one re-laid-out copy of
    every tensor crossing a cut, and :data:`SUMMED_GRADIENT_COPIES` copies of every weight
    gradient an MKLDNN operator adds to; 0 for one executor, on a GPU or without MKLDNN."""
    if plan is None or plan.executor_count() <= 1 or not mkldnn_runs(source.device):
        return 0
    return int(plan.boundary_bytes) + SUMMED_GRADIENT_COPIES * _summed_mkldnn_weights(source, plan)


def segment_footprint(source: FootprintSource, planned_mb: float, plan: Optional[SegmentPlan]) -> Footprint:
    """The whole footprint of ``plan`` (None: the one-level plan) with ``planned_mb`` of
    activations, MKLDNN's copies at the cuts in ``mkldnn_copies``."""
    executors = plan.executor_count() if plan is not None else 1
    found = source.footprint(planned_mb, executors)
    extra = chain_copies_bytes(source, plan)
    if not extra:
        return found
    return dataclasses.replace(found, mkldnn_copies=found.mkldnn_copies + to_mb(extra))


@dataclass(frozen=True)
class BackendFootprints:
    """The one-level plan's and a segment plan's whole footprints, per surface (MB).

    Attributes
    ----------
    one_level, segments : dict of str to Footprint
        By surface (:data:`SURFACES`).
    margin_mb : float
        How much lower the segments' footprint must be to be taken.
    """

    one_level: Dict[str, Footprint]
    segments: Dict[str, Footprint]
    margin_mb: float

    def excess_mb(self) -> float:
        """The segments' footprint above the one-level plan's, the worst surface (MB; negative
        when lower)."""
        return max(self.segments[s].total - self.one_level[s].total for s in self.one_level)

    @property
    def segments_win(self) -> bool:
        """Whether the segments are lower by at least :attr:`margin_mb` on every surface."""
        return self.excess_mb() <= -self.margin_mb

    def words(self) -> str:
        """``'segments N MB against one-level M MB (module)'`` for the worst surface."""
        surface = max(self.one_level, key=lambda s: self.segments[s].total - self.one_level[s].total)
        return (f"whole footprint of the segments {self.segments[surface].total:.0f} MB against "
                f"{self.one_level[surface].total:.0f} MB one-level ({surface}, "
                f"{'MKLDNN copies ' + format(self.segments[surface].mkldnn_copies, '.0f') + ' MB'})")


def compare_backends(source: FootprintSource, one_level_mb: float, planned_mb: float,
                     plan: SegmentPlan, margin_mb: float = 0.0,
                     surfaces: Tuple[str, ...] = SURFACES) -> BackendFootprints:
    """The one-level plan (``one_level_mb`` of activations) against ``plan`` (``planned_mb``),
    whole footprints on ``source``'s device (NOTE [ auto decides on the whole footprint ])."""
    one: Dict[str, Footprint] = {}
    chain: Dict[str, Footprint] = {}
    for surface in surfaces:
        here = source if source.surface == surface else source.replace(surface=surface)
        one[surface] = segment_footprint(here, one_level_mb, None)
        chain[surface] = segment_footprint(here, planned_mb, plan)
    return BackendFootprints(one, chain, float(margin_mb))


def footprint_source_of(setup: Any) -> FootprintSource:
    """The setup's footprint source (set by ``plan_mirror``), else one made from the setup."""
    source = getattr(setup, "footprint_source", None)
    return source if source is not None else FootprintSource.of_setup(setup)
