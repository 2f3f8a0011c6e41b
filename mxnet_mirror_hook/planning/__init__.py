"""Planning orchestration behind :func:`mxnet_mirror_hook.plan.plan_mirror`.

One module per concern: :mod:`.setup` (the request checked, the graph, template and
measurement prepared once), :mod:`.measure` (the planners' bind callback), :mod:`.cached`
(the cache sequence: get, lock, get again, compute, put), :mod:`.one_level` (MXNet's
one-level mirror), :mod:`.dropout` (the two Dropout forms), :mod:`.segments` and
:mod:`.candidates` (the executor-segments backend), :mod:`.result` (:class:`MirrorPlan`).
"""
from __future__ import annotations

from .dropout import plan_dropout_variants
from .result import MirrorPlan
from .segments import plan_with_segments
from .setup import PlanningSetup, PlanRequest, prepare_planning

__all__ = ["MirrorPlan", "PlanningSetup", "PlanRequest", "prepare_planning", "plan_dropout_variants",
           "plan_with_segments"]
