"""Executor segments: split the forward graph into pieces that are recomputed one at a time.

One module per concept: :mod:`.plan` (the plan types), :mod:`.crossings` (owned operators and
crossing bytes), :mod:`.cuts` (the cut search), :mod:`.pool` (the shared pool),
:mod:`.layout` (the chain's own arrays, NOTE [ the chain's own arrays ]), :mod:`.tensors`
(an array's shape and element type) and :mod:`.head` (the chunked loss head).

# NOTE [ executor segments ]
# MXNet's mirror is one level: a recomputed node is replayed once during
# backward, and the gradient of every kept node holds its forward inputs (NOTE
# [ what backward keeps ] in liveness.py), so a network whose boundaries are
# small against its per-step working set (an unrolled RNN, a very deep residual
# stack) cannot go below roughly "everything backward reads between two kept
# tensors, plus all kept tensors".  Segments go further (torch.utils.checkpoint's
# scheme, with MXNet executors): the graph is cut into k pieces, each bound as
# its own executor sharing one memory pool; forward keeps only the tensors that
# cross a cut (the boundaries); backward walks the pieces last to first,
# re-runs a piece's forward from its stored inputs and then its backward with
# the gradient of its outputs.  The peak is then about
#
#     boundaries (values, their gradients and each executor's head-gradient copy)
#     + the largest piece's forward-and-backward working set,
#
# at the cost of re-running the forward of every piece but the last (under one
# extra forward).  Inside a piece MXNet's own mirror can still be used (two
# levels): ``SegmentSpec.mirrored``.
#
# The cuts are those of the cut-set chain (planners/dp.py), found on the
# as-late-as-possible order of the graph (NOTE [ linearising for cuts ] in
# graph.py) so that an unrolled RNN has a cut after every step.  Operators that
# do not depend on a data input (an RNN's zero begin state, a transform of a
# parameter), and cheap ones reading only variables (the split or embedding of
# an RNN's input sequence, REPLAYED_OPS), are not owned by any piece: each piece
# that reads them replays them, so they never become boundaries.  Variables (data, labels, parameters,
# auxiliary states) are never boundaries either: every piece binds the same
# arrays, and a parameter read by several pieces (tied weights, the shared
# weights of an unrolled RNN) gets its gradient summed over them.
"""
from __future__ import annotations

from .crossings import REPLAYED_OPS
from .cuts import (MAX_SEGMENTS, alternative_cuts, best_segment_plan, choose_cuts, cut_positions,
                   full_cut_chain, plan_segments, segment_plan_for_cuts)
from .head import (HEAD_CHUNK_BYTES, HEAD_ROW_MULTIPLE, LossHead, head_buffer_floats, head_chunk_count,
                   head_chunk_rows, head_tile, loss_head, plan_segments_with_head)
from .layout import ChainLayout, HeadArrays, gradient_slots
from .plan import HEAD_GRAD_COPIES, Entry, SegmentPlan, SegmentSpec, entry_key
from .pool import MATCH_RANGES, least_pool_choice, shared_pool_bytes
from .tensors import TensorSpec, graph_tensor

__all__ = ["Entry", "SegmentSpec", "SegmentPlan", "segment_plan_for_cuts", "choose_cuts",
           "plan_segments", "best_segment_plan", "HEAD_GRAD_COPIES", "LossHead", "loss_head",
           "head_buffer_floats", "head_tile", "shared_pool_bytes", "full_cut_chain",
           "plan_segments_with_head", "head_chunk_count", "head_chunk_rows", "HEAD_CHUNK_BYTES",
           "alternative_cuts", "cut_positions", "least_pool_choice", "MATCH_RANGES",
           "gradient_slots", "MAX_SEGMENTS", "entry_key", "REPLAYED_OPS", "HEAD_ROW_MULTIPLE",
           "ChainLayout", "HeadArrays", "TensorSpec", "graph_tensor"]
