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
# Measured with the storage profiler (mx/profile.py; SGD with momentum, MXNet 1.9.1, CPU)
# on BERT-shaped symbols of the project's own (testing.models.bert_mlm, seq 128, batch 8,
# width 256, largest MKLDNN request r = 4 MB), the peak with MKLDNN on minus the peak with
# MXNET_MKLDNN_ENABLED=0:
#   4 layers, Module:  one-level -4.5 MB, 2 segments +16, 4 segments +34, 8 segments +36
#   4 layers, Gluon:   one-level -4.6 MB, 4 segments +34, 8 segments +36
#   12 layers, dropout 0.1 replayed, Gluon: one-level +8, 4 segments +34, 16 segments +32
# So a chain with MKLDNN holds about 8r more than the same chain without, saturating at
# MXNET_CPU_TEMP_COPY (4) executors: the temporary spaces, each grown by the chain's
# reorders (boundary arrays arrive in MKLDNN layout and are reordered beside the
# operator's output), which mx/footprint.py counts (min(executors, 4) copies of a
# doubled request for Module, all 4 for Gluon).  It does NOT grow per executor beyond
# that (12 and 16 segments add no more than 4).  What that figure leaves out is one
# re-laid-out copy of the tensors crossing the cuts, which :func:`chain_copies_bytes`
# adds (the plan's boundary bytes, once each): with it the model is within -8..+18 MB of
# the measured difference between the chains and the one-level plan for Gluon and 14 to
# 26 MB above it for Module (an upper bound: 'auto' errs towards the one-level plan).
# Not explained: gluonnlp 0.10's BERT-base in 16 segments (seq 128, batch 8, BERTAdam)
# measured 586 MB above the same chain without MKLDNN, where this model gives about
# 100 MB of temporary space and 47 MB of boundary copies.  Nothing on a GPU (no MKLDNN)
# or with MXNET_MKLDNN_ENABLED=0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .. import env
from ..core.footprint import Footprint
from ..core.segments import SegmentPlan
from ..core.units import to_mb
from .footprint import FootprintSource

__all__ = ["BackendFootprints", "compare_backends", "segment_footprint", "chain_copies_bytes",
           "decision_tag", "mkldnn_runs", "footprint_source_of", "SURFACES"]

#: The surfaces the decision is made for (NOTE [ auto decides on the whole footprint ]).
SURFACES = ("module", "gluon")


def mkldnn_runs(device: str) -> bool:
    """Whether MKLDNN runs on ``device`` in this process (the CPU unless ``MXNET_MKLDNN_ENABLED=0``)."""
    return device == "cpu" and not env.mkldnn_switched_off()


def decision_tag(source: FootprintSource) -> str:
    """What the ``'auto'`` decision depends on beyond the plan's key: the device and MKLDNN
    (``'@cpu+mkldnn'``, ``'@cpu'``, ``'@gpu'``)."""
    return f"@{source.device}" + ("+mkldnn" if mkldnn_runs(source.device) else "")


def chain_copies_bytes(source: FootprintSource, plan: Optional[SegmentPlan]) -> int:
    """Bytes a chain of executors holds on a CPU with MKLDNN beyond what the footprint's
    temporary-space figure counts: one re-laid-out copy of every tensor crossing a cut (NOTE
    [ MKLDNN copies at the cuts ]); 0 for one executor, on a GPU or without MKLDNN."""
    if plan is None or plan.executor_count() <= 1 or not mkldnn_runs(source.device):
        return 0
    return int(plan.boundary_bytes)


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
