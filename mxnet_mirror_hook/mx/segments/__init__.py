"""Executor segments on MXNet: split a symbol by a :class:`~mxnet_mirror_hook.core.segments.SegmentPlan`,
bind a chain of executors sharing one memory pool, and run forward/backward with recomputation.

One module per concept: :mod:`.split` (symbol surgery by JSON), :mod:`.gather` (segments that
only gather boundaries), :mod:`.layout` (the chain's own arrays), :mod:`.head` (the chunked loss
head), :mod:`.chain` (the chain), :mod:`.executor_group` (Module's executor group),
:mod:`.measure` (the static figure) and :mod:`.environment` (the variables binds run under).

See NOTE [ executor segments ] in :mod:`mxnet_mirror_hook.core.segments` for the scheme.
"""
from __future__ import annotations

from .chain import SegmentChain
from .environment import DEFAULT_GRAD_SUM_CAP, GRAD_SUM_CAP_ENV
from .executor_group import SegmentedExecutorGroup, executor_group_for
from .gather import GatherLayout, gather_layout
from .head import ChunkedHead
from .measure import segment_planned_mb, tune_match_ranges
from .split import boundary_name, reader_name, segment_documents, source_name, split_symbol

__all__ = ["executor_group_for", "boundary_name", "reader_name", "source_name", "segment_documents",
           "split_symbol", "SegmentChain", "GRAD_SUM_CAP_ENV", "DEFAULT_GRAD_SUM_CAP",
           "tune_match_ranges", "segment_planned_mb", "SegmentedExecutorGroup", "ChunkedHead",
           "GatherLayout", "gather_layout"]
