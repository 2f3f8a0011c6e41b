"""Segment planning: the executor-segments backend (``'segments'`` or ``'auto'``) beside the one-level plan.

# NOTE [ choosing the backend ]
# The one-level plan is made first (through the cache, unchanged).  A segment
# plan is then chosen by the memory estimate of :mod:`.core.segments` (or with
# ``segments`` pieces) and measured statically (NOTE [ static memory of a
# segment plan ] in mx/segments).  With the ``'min'`` budget the same split is
# also measured with the one-level plan's mirrored nodes inside each segment (two
# levels) and the lower kept.  ``'auto'`` takes the segments only when they
# are clearly below the one-level plan in whole footprint on the device the plan
# runs on, MKLDNN's copies at the cuts included (NOTE [ auto decides on the whole
# footprint ] in planning/chain_footprint.py), and re-run at most about one forward
# under the default budget, so it never returns a plan whose footprint is above the
# one-level one; ``'segments'`` always takes them.
#
# NOTE [ the segment path falls back ]
# ``'auto'`` never fails where ``'mirror'`` plans: whatever fails on the segment
# path (a bind or measurement the worker refuses, a split the graph does not
# allow, an executed graph the capture cannot read) is logged as one warning
# line naming the step and the error, and the one-level plan is returned with
# ``plan.fallback`` saying why (its summary says so too).  The entry under the
# ``'auto'`` key records the fallback, so the next run takes the one-level plan
# from the cache without retrying (a new plugin version retries: its version is
# in the key).  An explicit ``'segments'`` has nothing to fall back to: it raises
# one ``BackendError`` with the step, the error and what to use instead.  Only
# ``Exception`` is caught: an interrupt still stops planning and leaves no entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Iterator, List, Optional, Tuple

from ..cache import BackendEntry, get_cache
from ..core.graph import draws_random, replays_random
from ..core.liveness import kept_bytes
from ..core.segments import SegmentPlan, full_cut_chain
from ..errors import BackendError, OptionError
from ..options import MirrorOptions
from .cached import cached_plan
from .chain_footprint import compare_backends, decision_tag, footprint_source_of
from .candidates import (MAX_PER_SEGMENT_PLANS, Measured, head_splits, per_segment_two_level,
                         splits_to_try, start_measuring_segments, tune_shared_pool)
from .fused import lower_with_fused
from .dropout import plan_dropout_variants
from .one_level import SMALL_ACTIVATIONS_BYTES, unmirrored_plan
from .result import PLAN_LOGGER, MirrorPlan
from .selective import one_level_within, plan_selective, prefer_one_level, within_limits
from .setup import PlanningSetup

__all__ = ["plan_with_segments", "SEGMENT_RECOMPUTE_LIMIT", "SEGMENT_WIN_FRACTION",
           "SEGMENT_COUNT_TOLERANCE"]

logger = logging.getLogger(PLAN_LOGGER)

#: Re-run forward allowed by the default budget, as a fraction of one plain iteration: about one
#: extra forward (forward : backward = 1 : 2).  Plain segments re-run at most one forward.
SEGMENT_RECOMPUTE_LIMIT = 0.4
#: 'auto' takes segments only when their whole footprint is below the one-level plan's by at least
#: (1 - this) of the one-level plan's activation figure (NOTE [ auto decides on the whole
#: footprint ] in planning/chain_footprint.py; before, their static figure had to be at most this
#: fraction of the one-level plan's).  The storage profiler (bench/bench_segments.py, beyond
#: the bind-time arrays every backend has) matched the static figure of the bench LSTM to ~1 MB
#: but measured the 13-segment language model ~55 MB above it (pool sharing between executors,
#: per-executor buffers), so a small win is not trusted.
SEGMENT_WIN_FRACTION = 0.9
#: A plan with fewer segments is taken when its static figure is within this factor of the
#: least.
SEGMENT_COUNT_TOLERANCE = 1.03


def plan_with_segments(setup: PlanningSetup, options: MirrorOptions,
                       started: Optional[float] = None) -> MirrorPlan:
    """The plan under ``options.backend`` ``'auto'`` or ``'segments'`` (NOTE [ choosing the backend ]).

    Parameters
    ----------
    setup : PlanningSetup
        The user's symbol, prepared once (the one-level plan and the segments share it).
    options : MirrorOptions
        With ``backend`` ``'auto'`` or ``'segments'`` and ``segments`` (None: chosen by the
        estimate).
    started : float, optional
        ``time.perf_counter()`` when planning began.
    """
    started = time.perf_counter() if started is None else started
    one_level_options = options.replace(backend="mirror", segments=None, max_overhead=None)
    if options.max_overhead is not None and options.budget.is_limit:
        # The budget is the selective plan's to meet (NOTE [ planning under an overhead limit ]).
        one_level_options = one_level_options.replace(memory_budget=None)
    one_level = plan_dropout_variants(setup, one_level_options, started)
    if _too_small_for_segments(setup, options) or _draws_unreplayable_random(setup, options):
        return lower_with_fused(setup, options, one_level_within(setup, options, one_level, started),
                                started)
    request = options.backend if options.segments is None else f"{options.backend}:{options.segments}"
    if options.max_overhead is not None:
        request += f":overhead={options.max_overhead!r}"  # NOTE [ planning under an overhead limit ]
    if options.backend == "auto":  # the decision depends on the device and MKLDNN
        request += decision_tag(footprint_source_of(setup))
    key = dataclasses.replace(setup.key(options), backend=request)

    def use(entry: BackendEntry) -> Optional[MirrorPlan]:
        if entry.backend == "mirror":
            if entry.fallback is not None:
                return _fallen_back(one_level_within(setup, options, one_level, started), entry.fallback)
            return _recorded_one_level(setup, options, one_level, entry, started)
        try:
            chosen = SegmentPlan.from_dict(entry.segments or {})
        except (KeyError, TypeError, ValueError):
            return None
        if not all(n in setup.graph for s in chosen.segments for n in s.nodes):
            return None
        return _segments_result(setup, one_level, chosen, entry.planned_mb, entry.overhead,
                                started, from_cache=True)

    chosen = cached_plan(get_cache(options.cache_dir), key, BackendEntry, use,
                         lambda: _choose_or_fall_back(setup, options, one_level, started))
    return lower_with_fused(setup, options, chosen, started)


def _too_small_for_segments(setup: PlanningSetup, options: MirrorOptions) -> bool:
    """Whether ``'auto'`` under the default budget keeps the one-level plan without measuring segments:
    backward keeps under 1 MB of activations, so no chain could show a saving in MXNet's whole-MB
    figures (NOTE [ deciding without candidates ] in planning/one_level.py)."""
    return (options.backend == "auto" and options.segments is None and options.max_overhead is None
            and options.budget.kind == "auto" and kept_bytes(setup.graph) < SMALL_ACTIVATIONS_BYTES)


def _draws_unreplayable_random(setup: PlanningSetup, options: MirrorOptions) -> bool:
    """Whether segments are out for this network's random draws (``'segments'`` raises).

    # NOTE [ segments and random operators ]
    # A segment's forward runs again before its backward; a Dropout (or sampler)
    # in it would draw a new mask there, and backward would differentiate a mask
    # forward never used: silently wrong gradients.  Without recompute_dropout
    # such networks keep MXNet's one-level mirror, which never recomputes
    # Dropout.  With it, the chain re-seeds the context's generator so that a
    # re-run segment draws what its forward drew (NOTE [ replaying random draws
    # in re-run segments ] in mx/segments); operators re-seeding is not known
    # to replay (a fused RNN's dropout, rrelu) are refused all the same.
    """
    random_nodes = [n.name for n in setup.graph.op_nodes if draws_random(n.op, n.attrs)]
    if random_nodes and options.recompute_dropout:
        random_nodes = [n.name for n in setup.graph.op_nodes if not replays_random(n.op, n.attrs)]
    if not random_nodes:
        return False
    if options.backend == "segments":
        raise BackendError(
            f"backend='segments' re-runs forward passes during backward, and this network "
            f"draws random numbers in forward ({', '.join(random_nodes[:3])}"
            f"{' ...' if len(random_nodes) > 3 else ''}): the re-run would use other dropout "
            f"masks. " + ("Re-seeding is not known to replay these operators' draws; "
                          if options.recompute_dropout else
                          "Pass recompute_dropout=True to replay Dropout draws (masks drawn "
                          "from per-segment seeds, not MXNet's own draws), or ")
            + "use backend='mirror' (or 'auto', which keeps the one-level plan here)")
    names = sorted(set(random_nodes))
    many = len(random_nodes) > 1
    what = (f"{len(random_nodes)} node{'s' if many else ''} draw{'' if many else 's'} random numbers in "
            f"forward ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})")
    if options.max_overhead is not None:
        # Segments would redraw the masks; the one-level plan within the limit keeps them.
        logger.info("max_overhead=%g: segments not considered, %s; the least one-level memory within "
                    "the limit is planned (recompute_dropout=True replays the draws in segments, "
                    "which can free more)", options.max_overhead, what)
    else:
        logger.info("segments not considered: %s", what)
    return True


def _measured_candidates(setup: PlanningSetup, options: MirrorOptions,
                         one_level: MirrorPlan) -> List[Measured]:
    """Every candidate segment plan, measured (under ``'min'`` with two levels and tuning)."""
    graph = setup.graph
    with _step("splitting the graph into segments"):
        chain = full_cut_chain(graph)  # shared by every split below
        splits = splits_to_try(graph, options.segments, chain)
        splits += head_splits(graph, options.segments, splits, chain)
    replay = options.recompute_dropout and any(draws_random(n.op, n.attrs) for n in graph.op_nodes)
    splits = [split.with_replay_random(replay) for split in splits]
    candidates = list(splits)
    if options.budget.key == "min":
        # Two levels: the one-level decision inside each segment, and (for coarse splits) a plan
        # made for each segment on its own, which knows the segment's own cuts (resnet152_v1b,
        # batch 32: 2 segments, 1138 MB with the global decision, 980 MB planned per segment).
        if one_level.mirrored:
            candidates += [split.with_mirrored(one_level.mirrored, graph) for split in splits]
    # Each candidate is captured in the background as soon as it is made (NOTE [ segments
    # captured two at a time ] in mx/segments/measure.py), the per-segment plans meanwhile.
    pending = []
    for candidate in candidates:
        with _step(f"measuring a {candidate.count}-segment plan"):
            pending.append((candidate, start_measuring_segments(setup, candidate)))
    if options.budget.key == "min":
        for split in splits:
            if split.count <= MAX_PER_SEGMENT_PLANS:
                with _step("planning the mirror inside each segment"):
                    candidate = per_segment_two_level(split, setup, options)
                pending.append((candidate, start_measuring_segments(setup, candidate)))
    measured = []
    for candidate, finish in pending:
        with _step(f"measuring a {candidate.count}-segment plan"):
            measured.append(finish())
    if options.budget.key == "min":
        # Under 'auto' no chain whose static figure stays above this can be taken (NOTE [ tuning
        # bounded by work ] in planning/candidates.py).
        ceiling = SEGMENT_WIN_FRACTION * one_level.planned_mb if options.backend == "auto" else None
        with _step("tuning the segments' shared pool"):
            measured += tune_shared_pool(setup, options, chain, measured, SEGMENT_COUNT_TOLERANCE, ceiling)
    return measured


class _SegmentPathError(Exception):
    """A failure on the segment path, its message naming the step (NOTE [ the segment path
    falls back ])."""


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Name the step in whatever the block raises (an interrupt passes unchanged)."""
    try:
        yield
    except (_SegmentPathError, OptionError):
        raise  # an OptionError is the user's contradiction (NOTE [ planning under an overhead limit ])
    except Exception as error:
        raise _SegmentPathError(f"{what}: {_one_line(error)}") from error


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``error`` as one line: its type and message, whitespace folded, at most ``limit`` chars."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _choose_or_fall_back(setup: PlanningSetup, options: MirrorOptions, one_level: MirrorPlan,
                         started: float) -> Tuple[MirrorPlan, BackendEntry]:
    """:func:`_choose`, or, when the segment path fails, the one-level plan under ``'auto'`` and
    one ``BackendError`` under ``'segments'`` (NOTE [ the segment path falls back ])."""
    try:
        return _choose(setup, options, one_level, started)
    except OptionError:
        raise
    except Exception as error:
        reason = str(error) if isinstance(error, _SegmentPathError) else _one_line(error)
        cause = error.__cause__ if isinstance(error, _SegmentPathError) else error
        if options.backend == "segments":
            raise BackendError(
                f"backend='segments' cannot be used for this network: {reason}. Use "
                f"backend='auto' (which keeps the one-level plan when segments fail) or "
                f"backend='mirror'") from cause
        logger.warning("executor segments failed (%s); backend='auto' uses the one-level plan", reason)
        logger.debug("the segment path's failure", exc_info=cause)
        one_level = one_level_within(setup, options, one_level, started)
        plan = _fallen_back(one_level, reason, planning_seconds=time.perf_counter() - started)
        return plan, dataclasses.replace(_one_level_entry(one_level), fallback=reason)


def _fallen_back(one_level: MirrorPlan, reason: str, **changes: Any) -> MirrorPlan:
    """``one_level``, recording why the segment path was not taken, with its summary logged."""
    plan = dataclasses.replace(one_level, fallback=reason, **changes)
    logger.info("%s", plan.summary())
    return plan


def _choose(setup: PlanningSetup, options: MirrorOptions, one_level: MirrorPlan,
            started: float) -> Tuple[MirrorPlan, BackendEntry]:
    """Measure the candidates and take the segments or keep ``one_level``; the plan and its entry."""
    if options.max_overhead is not None:
        return _choose_selective(setup, options, one_level, started)
    measured = _measured_candidates(setup, options, one_level)
    least = min(item.mb for item in measured)
    # Within 3% of the least memory, fewer segments: fewer executor calls per iteration, and
    # less of what the static figure leaves out (each executor's temporary space; resnet152_v1b,
    # batch 32, 'min': 3 segments 1029 MB static and 2236 MB profiler peak, 2 segments 1042 MB
    # and 2074 MB).
    mb, overhead, chosen = min((item for item in measured if item.mb <= least * SEGMENT_COUNT_TOLERANCE),
                               key=lambda item: (item.plan.count, item.overhead, item.mb))
    wins = (chosen.count > 1 and (options.budget.key == "min" or overhead <= SEGMENT_RECOMPUTE_LIMIT)
            and (options.backend != "auto" or _footprint_wins(setup, one_level, mb, chosen)))
    if options.backend == "auto" and not wins:
        tried = [{"label": f"segments x{c.count}", "planned_mb": m, "overhead": o,
                  "mirrored_count": sum(len(s.mirrored) for s in c.segments)} for m, o, c in measured]
        return (dataclasses.replace(one_level, candidates=one_level.candidates + tried),
                _one_level_entry(one_level))
    if options.backend == "segments" and mb > one_level.planned_mb:
        logger.warning("the segment plan (%.0f MB) is above the one-level mirror plan (%.0f MB) for "
                       "this network; backend='segments' was asked for, so it is used "
                       "(backend='auto' keeps the lower plan)", mb, one_level.planned_mb)
    entry = BackendEntry("segments", tuple(sorted(n for s in chosen.segments for n in s.mirrored)),
                         one_level.baseline_mb, mb, overhead, segments=chosen.to_dict())
    return _segments_result(setup, one_level, chosen, mb, overhead, started, from_cache=False), entry


def _footprint_wins(setup: PlanningSetup, one_level: MirrorPlan, mb: float, chosen: SegmentPlan,
                    margin: bool = True) -> bool:
    """Whether ``chosen`` (``mb`` of activations) is below ``one_level`` in whole footprint on the
    device the plan runs on, by the margin unless ``margin`` is False (NOTE [ auto decides on the
    whole footprint ] in planning/chain_footprint.py)."""
    margin_mb = (1 - SEGMENT_WIN_FRACTION) * one_level.planned_mb if margin else 0.0
    compared = compare_backends(footprint_source_of(setup), one_level.planned_mb, mb, chosen, margin_mb)
    wins = compared.segments_win
    logger.info("backend='auto': %s: %s", compared.words(),
                "segments lower" if wins else "segments not lower by the margin")
    return wins


def _choose_selective(setup: PlanningSetup, options: MirrorOptions, one_level: MirrorPlan,
                      started: float) -> Tuple[MirrorPlan, BackendEntry]:
    """The selective plan under ``max_overhead``, or ``one_level`` under ``'auto'`` when it is lower
    within the limit (NOTE [ planning under an overhead limit ] in planning/selective.py)."""
    one_level = one_level_within(setup, options, one_level, started)
    try:
        with _step("planning a selective segment chain"):
            mb, overhead, chosen = plan_selective(setup, options, one_level)
    except OptionError:
        # No selective plan meets the budget within the limit; under 'auto' a one-level plan
        # within both is the answer (NOTE [ the one-level plan within an overhead limit ]).
        if options.backend != "auto" or not within_limits(options, one_level):
            raise
        logger.info("max_overhead: no selective plan meets both limits; the one-level plan does")
        return one_level, _one_level_entry(one_level)
    keep, why = prefer_one_level(options, one_level, Measured(mb, overhead, chosen))
    if not keep and options.backend == "auto" and not _footprint_wins(setup, one_level, mb, chosen,
                                                                      margin=False):
        # The same rule on whole footprints: the one-level plan, when it is within the limits,
        # is kept unless the selective chain's footprint is lower.
        keep, _ = prefer_one_level(options, one_level, Measured(float("inf"), overhead, chosen))
        why = "the selective segments' whole footprint is not below the one-level plan's"
    tried = [{"label": f"selective segments x{chosen.count}", "planned_mb": mb, "overhead": overhead,
              "mirrored_count": 0}]
    if keep:
        logger.info("max_overhead: %s; the one-level plan is used", why)
        return (dataclasses.replace(one_level, candidates=one_level.candidates + tried),
                _one_level_entry(one_level))
    if options.backend == "auto" and mb >= one_level.baseline_mb:
        # Never above not mirroring: under 'auto', a chain that measures no lower than the
        # unmirrored plan (its kept pools and boundary copies outweigh what it re-runs) is not
        # bound (an explicit backend='segments' is, as asked).
        logger.info("max_overhead: the selective segments (%.0f MB) are not below the unmirrored "
                    "plan (%.0f MB); nothing is recomputed", mb, one_level.baseline_mb)
        plain = unmirrored_plan(setup, options, started, one_level.baseline_mb, tried)
        return plain, BackendEntry("mirror", (), one_level.baseline_mb, one_level.baseline_mb, 0.0)
    entry = BackendEntry("segments", (), one_level.baseline_mb, mb, overhead, segments=chosen.to_dict())
    return _segments_result(setup, one_level, chosen, mb, overhead, started, from_cache=False), entry


def _recorded_one_level(setup: PlanningSetup, options: MirrorOptions, one_level: MirrorPlan,
                        entry: BackendEntry, started: float) -> Optional[MirrorPlan]:
    """The one-level plan a cached ``'mirror'`` entry recorded: ``one_level``, the unmirrored plan,
    or the one-level plan within ``max_overhead`` (None: none of them, plan again)."""
    recorded = set(entry.mirrored)
    if options.max_overhead is None or recorded == set(one_level.mirrored):
        return one_level
    if not recorded:
        return unmirrored_plan(setup, options, started, one_level.baseline_mb)
    within = one_level_within(setup, options, one_level, started)
    return within if recorded == set(within.mirrored) else None


def _one_level_entry(one_level: MirrorPlan) -> BackendEntry:
    """The entry recording that a segments request keeps the one-level plan."""
    return BackendEntry("mirror", tuple(one_level.mirrored), one_level.baseline_mb,
                        one_level.planned_mb, one_level.overhead)


def _segments_result(setup: PlanningSetup, one_level: MirrorPlan, chosen: SegmentPlan,
                     planned_mb: float, overhead: float, started: float, from_cache: bool) -> MirrorPlan:
    """The :class:`MirrorPlan` of a segment plan (the bound symbol is the user's, split at bind)."""
    mirrored = tuple(n for s in chosen.segments for n in s.nodes if n in s.mirrored)
    plan = MirrorPlan(symbol=setup.symbol, baseline_mb=one_level.baseline_mb,
                      planned_mb=planned_mb, mirrored=mirrored, planner=one_level.planner,
                      overhead=overhead, budget=one_level.budget, context=one_level.context,
                      kept_count=one_level.kept_count + len(one_level.mirrored) - len(mirrored),
                      planning_seconds=time.perf_counter() - started, from_cache=from_cache,
                      inputs=one_level.inputs, backend="segments", segment_plan=chosen)
    logger.info("%s", plan.summary())
    return plan
