"""Segment plan candidates: the splits, the chunked loss head, two levels, and their measurement."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..core.cost import recompute_overhead
from ..core.graph import Graph
from ..core.planners.auto.modelled import ALLOCATOR_MODEL_MAX_OPERATORS
from ..core.segments import (MAX_SEGMENTS, SegmentPlan, alternative_cuts, best_segment_plan,
                             cut_positions, head_chunk_count, loss_head, plan_segments,
                             plan_segments_with_head, segment_plan_for_cuts)
from ..errors import MeasurementError
from ..mx.segments import (GRAD_SUM_CAP_ENV, boundary_name, segment_planned_mb, source_name, split_symbol,
                           tune_match_ranges)
from ..mx.segments.measure import start_segment_planned_mb
from ..options import MirrorOptions
from ..cache import get_cache
from .one_level import nothing_to_gain, plan_one_level
from .result import PLAN_LOGGER
from .setup import PlanRequest, PlanningSetup

__all__ = ["Measured", "splits_to_try", "head_splits", "per_segment_two_level", "measure_segments",
           "start_measuring_segments",
           "tune_shared_pool", "MAX_PER_SEGMENT_PLANS", "NEIGHBOUR_CUTS", "TUNING_GAIN"]

logger = logging.getLogger(PLAN_LOGGER)

#: Splits of at most this many segments also get a mirror plan made per segment under 'min'.
MAX_PER_SEGMENT_PLANS = 4

#: Neighbouring cut lists measured around the best per-segment plan of each segment count
#: under 'min' (:func:`alternative_cuts`).
NEIGHBOUR_CUTS = 8
#: The most tuning has lowered a segment count's least static figure (resnet152_v1b, batch 32,
#: 'min': 2 segments, 1143 -> 1042 MB, 8.8%); a count that could not become the choice even so
#: is not tuned (NOTE [ tuning bounded by work ]).
TUNING_GAIN = 0.10


class Measured(NamedTuple):
    """A candidate segment plan with MXNet's static figure and the estimated overhead."""

    mb: float
    overhead: float
    plan: SegmentPlan


def splits_to_try(graph: Graph, segments: Optional[int], chain: Any) -> List[SegmentPlan]:
    """The splits measured: ``segments`` pieces when asked, else the estimate's choice and others.

    The estimate misses parts of MXNet's per-segment plan (weight-gradient sums of unrolled
    steps, replayed inputs), so finer splits than its choice are measured too.  Coarse splits
    too: in deep CNNs the early boundaries are large (resnet152_v1b, batch 32, 'min': 3
    segments plan 1151 MB, 6 segments 1568 MB).
    """
    if segments:
        return [plan_segments(graph, segments, chain=chain)]
    first = best_segment_plan(graph, chain=chain)
    splits, counts = [], set()
    for count in sorted({2, 3, 4, first.count, first.count * 2, first.count * 3}):
        split = first if count == first.count else plan_segments(graph, count, chain=chain)
        if split.count > 1 and split.count not in counts:
            counts.add(split.count)
            splits.append(split)
    return splits or [first]


def head_splits(graph: Graph, segments: Optional[int], splits: Sequence[SegmentPlan],
                chain: Any) -> List[SegmentPlan]:
    """Splits with a chunked loss head as their own last segment, new ones only.

    NOTE [ chunked loss head ] in core/segments: a FullyConnected + SoftmaxOutput head is
    also tried as its own last segment run in row chunks, beside ``splits`` (so the choice
    can only get lower).
    """
    head, why = loss_head(graph)
    if head is None:
        logger.info("loss head not chunked: %s", why)
        return []
    if not head_chunk_count(head):
        logger.info("loss head not chunked: its output fits one chunk")
        return []
    # With the head out of the way the recurrent part is the peak, and finer splits pay
    # (2x512 language model: 10 segments 245 MB, 21 segments 229 MB).
    widest = max(s.count for s in splits)
    counts = ([segments] if segments else
              sorted({s.count for s in splits} | {2 * s.count for s in splits}
                     | {min(MAX_SEGMENTS, 4 * widest)}))
    found: List[SegmentPlan] = []
    for count in counts:
        try:
            split = plan_segments_with_head(graph, max(2, count), head, chain=chain)
        except ValueError as error:
            logger.info("loss head not chunked for %d segments: %s", count, error)
            continue
        if all(split.segments != other.segments or other.head_chunks != split.head_chunks
               for other in list(splits) + found):
            found.append(split)
    return found


# NOTE [ a network the cap cannot bind ]
# Segments are measured and bound under MXNET_EXEC_INPLACE_GRAD_SUM_CAP=2 (NOTE [ the
# gradient-sum cap is read once per process ] in mx/segments/environment.py).  Under a
# cap below 8, MXNet 1.9.1 cannot bind some networks at all, not even whole and plain:
# AggregateGradient chains in-place gradient sums with control dependencies that are
# only safe when the contributions arrive in dependency order, and the branches of
# gluoncv's residual-attention networks break that ("control dep not found in graph").
# A candidate whose measurement fails under the cap is measured again under MXNet's
# default and carries ``grad_sum_cap=None``, which the chain then binds under.
def measure_segments(setup: PlanningSetup, candidate: SegmentPlan) -> Measured:
    """MXNet's static figure of ``candidate`` and its estimated overhead (NOTE [ a network
    the cap cannot bind ])."""
    return _measured(setup, candidate, segment_planned_mb)


def start_measuring_segments(setup: PlanningSetup, candidate: SegmentPlan) -> Callable[[], Measured]:
    """:func:`measure_segments` started: the segments are captured in the background (NOTE
    [ segments captured two at a time ] in mx/segments/measure.py) while the caller goes on;
    the returned function waits and gives the :class:`Measured` (raising what
    :func:`measure_segments` raises)."""
    try:
        pending = start_segment_planned_mb(setup.symbol, candidate, setup.context, *setup.bind_inputs)
    except MeasurementError:
        return lambda: measure_segments(setup, candidate)  # measured again there, with its fallback
    return lambda: _measured(setup, candidate, lambda *args: pending.result())


def _measured(setup: PlanningSetup, candidate: SegmentPlan,
              first: Callable[..., Tuple[float, List[float]]]) -> Measured:
    """:func:`measure_segments` with ``first`` giving the figure under the plan's own cap."""
    try:
        mb, per_segment = first(setup.symbol, candidate, setup.context, *setup.bind_inputs)
    except MeasurementError as error:
        if candidate.grad_sum_cap is None:
            raise
        logger.info("segments do not bind under %s=%d (%s); measured under MXNet's default",
                    GRAD_SUM_CAP_ENV, candidate.grad_sum_cap, error)
        candidate = dataclasses.replace(candidate, grad_sum_cap=None)
        mb, per_segment = segment_planned_mb(setup.symbol, candidate, setup.context, *setup.bind_inputs)
    # The segment MXNet plans largest owns the shared pool (bound first).
    candidate = candidate.with_working_bytes([int(m * 2 ** 20) for m in per_segment])
    inner = [n for s in candidate.segments for n in s.mirrored]
    overhead = candidate.recompute_fraction + recompute_overhead(setup.graph, inner)
    logger.info("segment plan: %d segments, %s%s, %.0f MB static, overhead %.1f%%",
                candidate.count, "two levels" if inner else "one level",
                ", match ranges " + "/".join(str(s.match_range or "-") for s in candidate.segments)
                if any(s.match_range for s in candidate.segments) else "", mb, 100 * overhead)
    return Measured(mb, overhead, candidate)


def per_segment_two_level(split: SegmentPlan, setup: PlanningSetup,
                          options: MirrorOptions) -> SegmentPlan:
    """``split`` with a least-memory mirror plan made for each segment symbol on its own."""
    given = {name: (shape, dtype) for name, shape, dtype in setup.all_inputs}
    # The pieces are bound as written (a replayed Dropout is the user's), so planned so.
    piece_options = options.replace(memory_budget="min", backend="mirror", segments=None, max_overhead=None,
                                    recompute_dropout=False)
    mirrored: set = set()
    piece_setups: List[PlanningSetup] = []
    pieces = list(zip(split.segments, split_symbol(setup.symbol, split)))
    if split.head_chunks:
        pieces = pieces[:-1]  # a chunked head runs no executor
    for segment, piece in pieces:
        arguments = piece.list_arguments()
        inputs = [(n, given[source_name(n)][0], given[source_name(n)][1]) for n in arguments
                  if source_name(n) in given]
        for entry in segment.inputs:
            inputs.append((boundary_name(entry), tuple(split.boundary_shapes[f"{entry[0]}:{entry[1]}"]),
                           "float32"))
        requests: Dict[str, str] = {n: setup.requests.get(source_name(n), "null") for n in arguments}
        requests.update({boundary_name(e): "write" for e in segment.inputs})
        piece_setups.append(PlanRequest(inputs, None, grad_req=requests).prepare(piece, piece_options))
    for piece_setup in piece_setups:  # NOTE [ captures asked for ahead ] in mx/measure.py
        if _plans_from_a_capture(piece_setup, piece_options):
            piece_setup.measure.capture_ahead()
    for piece_setup in piece_setups:
        mirrored.update(plan_one_level(piece_setup, piece_options).mirrored)
    return split.with_mirrored(mirrored, setup.graph)


def _plans_from_a_capture(piece_setup: PlanningSetup, piece_options: MirrorOptions) -> bool:
    """Whether planning the piece will capture its executed graph: the ``'auto'`` planner with its
    allocator model under no limit, the plan not in the cache, and not decided without candidates
    (NOTE [ deciding without candidates ] in planning/one_level.py)."""
    return (piece_options.planner == "auto" and not piece_options.budget.is_limit
            and len(piece_setup.graph.op_nodes) <= ALLOCATOR_MODEL_MAX_OPERATORS
            and get_cache(piece_options.cache_dir).get(piece_setup.key(piece_options)) is None
            and nothing_to_gain(piece_setup.graph, piece_options.budget) is None)


def tune_shared_pool(setup: PlanningSetup, options: MirrorOptions, chain: Any,
                     measured: List[Measured], tolerance: float = 1.03,
                     ceiling_mb: Optional[float] = None) -> List[Measured]:
    """Under ``'min'``: plans that make the shared pool of the executors smaller.

    The best measured plan of each segment count with a mirror plan made per segment is
    tried with its cuts moved to the ``NEIGHBOUR_CUTS`` nearest positions crossed by no more bytes
    (:func:`alternative_cuts`: the pool depends on how the segments' blocks dovetail,
    which only measuring tells), and the least plan of each count, the originals among them,
    with a match range per segment (NOTE [ a match range per segment ] in core/segments).
    The work is bounded by counts, not by time (NOTE [ tuning bounded by work ]).
    ``tolerance``: the chosen plan is the one with fewest segments within this factor of the least.
    ``ceiling_mb``: the most static figure a segment plan may have to be taken at all (None: no
    such figure); when no count can come down to it, nothing is tuned (NOTE [ tuning bounded by
    work ]).
    """
    eligible = [item for item in measured if _two_level_per_segment(item.plan)]
    if not eligible or _none_can_be_taken(measured, ceiling_mb):
        return []
    found: List[Measured] = []
    for best in _worth_tuning(_least_of_each_count(eligible), measured, tolerance):
        found += _neighbours(setup, options, chain, best)
    tuned = []
    for least in _worth_tuning(_least_of_each_count(eligible + found), measured + found, tolerance):
        plan = tune_match_ranges(setup.symbol, least.plan, setup.context, *setup.bind_inputs)
        if any(s.match_range for s in plan.segments):
            tuned.append(measure_segments(setup, plan))
    return found + tuned


# NOTE [ tuning bounded by work ]
# Tuning the shared pool was most of a 'min' + 'auto' plan's time (resnet152_v1b,
# batch 32: 24 neighbouring cut lists, each with a mirror plan made for every
# segment, and every segment bound under five match ranges: 80% of 226 s on a
# loaded two-core machine).  The bound is by count, not by time, so a plan is
# the same on every machine: a segment count is tuned only if tuning could make
# it the plan chosen (the fewest segments within the tolerance of the least): a
# count above the one chosen must be able to pull the least below the chosen
# figure over the tolerance, a count below it to come within the tolerance of
# the least, each lowered by at most ``TUNING_GAIN`` (the most tuning has
# lowered a count's least figure in the bench networks).  A cheaper ranking of
# the neighbours (measured with the best plan's mirrored nodes carried over,
# only the two least planned per segment) was tried and dropped: on
# mobilenetv2_1.0 it missed the neighbour that planned per segment gives
# 823 MB, and the plan chosen rose to 889 MB.
#
# Nor is anything tuned when no segment plan could be taken even so: under
# 'auto' the chain must come below the one-level plan by a margin in whole
# footprint, and its whole footprint is at least its static figure above the
# one-level plan's (more executors never hold less temporary space; MKLDNN's
# copies at the cuts are never negative), so its static figure must come down to
# SEGMENT_WIN_FRACTION of the one-level plan's.  A caller that knows that figure
# passes it (``ceiling_mb``); when every measured plan, lowered by ``TUNING_GAIN``,
# stays above it, whatever tuning finds, the one-level plan is the answer
# (resnet50_v1b, batch 32: one-level 845 MB, the least segment plan 999 MB;
# tuning was half of that plan's time).  Only all counts at once: skipping one
# count could move the choice among the others, and the chosen plan is the one
# compared.


def _none_can_be_taken(measured: List[Measured], ceiling_mb: Optional[float]) -> bool:
    """Whether no plan of ``measured``, lowered by ``TUNING_GAIN``, comes down to ``ceiling_mb``
    (NOTE [ tuning bounded by work ])."""
    if ceiling_mb is None:
        return False
    least = min(item.mb for item in measured)
    if least * (1 - TUNING_GAIN) <= ceiling_mb:
        return False
    logger.info("shared pool not tuned: the least segment plan (%.0f MB) cannot come down to %.0f MB, "
                "what it must to be taken", least, ceiling_mb)
    return True


def _worth_tuning(bests: List[Measured], measured: List[Measured], tolerance: float) -> List[Measured]:
    """The plans of ``bests`` (one per segment count) whose count tuning could make the choice
    (NOTE [ tuning bounded by work ])."""
    least = min(item.mb for item in measured)
    chosen = min((item for item in measured if item.mb <= least * tolerance),
                 key=lambda item: (item.plan.count, item.overhead, item.mb))
    worth = []
    for best in bests:
        lowest = best.mb * (1 - TUNING_GAIN)
        if best.plan.count == chosen.plan.count:
            worth.append(best)
        elif best.plan.count < chosen.plan.count and lowest <= least * tolerance:
            worth.append(best)
        elif best.plan.count > chosen.plan.count and lowest * tolerance < chosen.mb:
            worth.append(best)
        else:
            logger.info("segment count %d not tuned: %.0f MB cannot become the choice (%d segments, "
                        "%.0f MB)", best.plan.count, best.mb, chosen.plan.count, chosen.mb)
    return worth


def _neighbours(setup: PlanningSetup, options: MirrorOptions, chain: Any, best: Measured) -> List[Measured]:
    """``best`` with its cuts moved, each with a mirror plan made per segment."""
    cuts = cut_positions(setup.graph, best.plan)
    per_cut = max(1, NEIGHBOUR_CUTS // len(cuts))
    pending = []
    for moved in alternative_cuts(setup.graph, cuts, per_cut, chain)[:NEIGHBOUR_CUTS]:
        split = segment_plan_for_cuts(setup.graph, moved, chain).with_replay_random(best.plan.replay_random)
        # Captured while the next neighbour's pieces are planned (NOTE [ segments captured two
        # at a time ] in mx/segments/measure.py); taken in order, so the list is the same.
        pending.append(start_measuring_segments(setup, per_segment_two_level(split, setup, options)))
    return [finish() for finish in pending]


def _two_level_per_segment(plan: SegmentPlan) -> bool:
    return (1 < plan.count <= MAX_PER_SEGMENT_PLANS and not plan.head_chunks
            and any(s.mirrored for s in plan.segments))


def _least_of_each_count(measured: List[Measured]) -> List[Measured]:
    """The measured plan of least static MB for each segment count, fewest segments first."""
    least: Dict[int, Measured] = {}
    for item in measured:
        count = item.plan.count
        if count not in least or item.mb < least[count].mb:
            least[count] = item
    return [least[count] for count in sorted(least)]
