"""Selective segment planning under ``max_overhead``: the dynamic program's labelled cut set,
measured (NOTE [ selective segments ] in core/segments/selective.py).

# NOTE [ planning under an overhead limit ]
# ``max_overhead`` asks for the least memory whose estimated extra time is
# within that fraction of an iteration; with a ``memory_budget`` limit (a
# fraction or a size) it asks for the least recomputation that fits.  The
# program runs on the model's bytes, so the limit is carried over as a ratio of
# the unmirrored plan (the model's figure of one unsplit segment against
# MXNet's measured baseline).  The chosen plan is then measured (MXNet's plan of
# each segment, the shared pool and each kept pool, the chain's own arrays); a
# measured figure above the budget tightens the model's limit by the measured
# over-run and solves again, REFINE_PASSES times at most.  Without a budget
# the program is also solved at HEDGE fractions of the limit and the least
# measured of those plans and the unsplit chain is taken: the model's figure
# of a segment is not MXNet's (bert_mlm seq 512 batch 8: a kept [output
# projection .. next query/key/value] segment is modelled at 276 MB, planned
# at 252 MB; a re-run core attention modelled at 396 MB, planned at 252 MB;
# see the bench's frontier for what the limits give).  When no plan meets
# both limits the request contradicts itself: one ``OptionError`` line names
# the least memory within the overhead and the least overhead within the budget.
# Under ``'auto'`` the one-level plan is returned instead when its estimated
# overhead is within the limit and it measures lower.
#
# NOTE [ the one-level plan within an overhead limit ]
# The one-level plan made at the user's budget (the default: about one extra
# forward) is rarely within a few percent, so under ``'auto'`` a second
# one-level plan is made for the limit itself: ``Budget.within_overhead`` asks
# the planner for the least memory whose estimated overhead is within
# ``max_overhead``.  ``auto`` plans it as it plans the default budget, with the
# limit as its cap: the least-compute program bisected to the least modelled
# memory within the limit (a count of program runs: work, never the clock), the
# allocator-guided search from the best start accepting only plans within the
# cap, MXNet's bind confirming the result.  The lower of the two one-level
# plans within the limits stands beside the selective segments, and the least
# memory is taken.  On resnet50_v1b (batch 32) a one-level plan recomputes
# convolutions whatever it frees: MXNet 1.9's gradient of a kept convolution
# reads the forward ReLU output it consumed (NOTE [ what backward keeps ] in
# core/liveness.py), so recomputing BatchNorm and ReLU alone frees nothing
# (bench/RESULTS.md, the selective section).  When no selective plan meets a
# budget and the limit together but this one-level plan does, it is returned
# rather than the contradiction.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

from ..core.budget import Budget
from ..core.graph import draws_random
from ..core.segments import full_cut_chain
from ..core.segments.selective import (SelectiveChain, SelectiveChoice, selective_chain, selective_plan,
                                       solve_selective)
from ..errors import OptionError
from ..options import MirrorOptions
from .candidates import Measured, measure_segments
from .dropout import plan_dropout_variants
from .result import PLAN_LOGGER, MirrorPlan
from .setup import PlanningSetup

__all__ = ["plan_selective", "prefer_one_level", "one_level_within", "within_limits", "REFINE_PASSES",
           "HEDGE"]

logger = logging.getLogger(PLAN_LOGGER)

#: Re-solves with a tightened limit when the measured figure exceeds the budget.
REFINE_PASSES = 3
#: Fractions of ``max_overhead`` the program is also solved at (without a budget limit); the least
#: measured of those plans and the unsplit chain is taken.
HEDGE = (1.0, 0.5)


def plan_selective(setup: PlanningSetup, options: MirrorOptions, one_level: MirrorPlan) -> Measured:
    """The measured selective plan under ``options.max_overhead`` (and a budget limit, if any).

    Raises
    ------
    OptionError
        When ``max_overhead`` and the memory budget contradict (no plan meets both).
    """
    graph = setup.graph
    cut_chain = full_cut_chain(graph)
    chain = selective_chain(graph, cut_chain)
    limit_mb = options.budget.limit_mb(one_level.baseline_mb)
    ratio = _ratio(options, limit_mb, one_level.baseline_mb)
    model_full = chain.working[0][chain.last]
    replay = options.recompute_dropout and any(draws_random(n.op, n.attrs) for n in graph.op_nodes)
    if ratio is None:
        return _least_measured(setup, options, chain, cut_chain, replay)
    scale = 1.0
    for _ in range(REFINE_PASSES):
        max_bytes = None if ratio is None else ratio * model_full * scale
        choice = solve_selective(chain, max_bytes=max_bytes, max_cost=options.max_overhead)
        if choice is None:
            raise _contradiction(chain, options, limit_mb, one_level.baseline_mb)
        plan = selective_plan(graph, choice, chain, cut_chain).with_replay_random(replay)
        measured = measure_segments(setup, plan)
        logger.info("selective plan: %d segments, %d kept, %.0f MB static, estimated overhead %.1f%%",
                    plan.count, len(plan.kept), measured.mb, 100 * measured.overhead)
        if limit_mb is None or measured.mb <= limit_mb:
            return measured
        scale *= limit_mb / measured.mb
    raise OptionError(f"memory_budget {options.memory_budget!r} ({limit_mb:.0f} MB) is not reached by "
                      f"a selective plan within max_overhead={options.max_overhead:g} (measured "
                      f"{measured.mb:.0f} MB); raise max_overhead or the budget")


def _least_measured(setup: PlanningSetup, options: MirrorOptions, chain: SelectiveChain, cut_chain: Any,
                    replay: bool) -> Measured:
    """The least measured of the program's choices at HEDGE fractions of the overhead limit and the
    unsplit chain (NOTE [ planning under an overhead limit ]: the model's figure of a kept
    executor is not MXNet's, so a lower limit may measure lower)."""
    limit = _overhead_limit(options)
    choices: Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], SelectiveChoice] = {
        ((), ()): SelectiveChoice((), (), chain.working[0][chain.last], 0.0)}
    for fraction in HEDGE:
        choice = solve_selective(chain, max_cost=fraction * limit)
        if choice is not None:
            choices.setdefault((choice.cuts, choice.kept), choice)
    found = []
    for choice in choices.values():
        plan = selective_plan(setup.graph, choice, chain, cut_chain).with_replay_random(replay)
        found.append(measure_segments(setup, plan))
        logger.info("selective plan: %d segments, %d kept, %.0f MB static, estimated overhead %.1f%%",
                    plan.count, len(plan.kept), found[-1].mb, 100 * found[-1].overhead)
    return min(found, key=lambda item: (item.mb, item.overhead))


def _overhead_limit(options: MirrorOptions) -> float:
    """``options.max_overhead``, which selective planning is only entered with."""
    if options.max_overhead is None:
        raise ValueError("selective planning needs max_overhead")
    return float(options.max_overhead)


def _ratio(options: MirrorOptions, limit_mb: Optional[float], baseline_mb: float) -> Optional[float]:
    """The budget as a fraction of the unmirrored plan (None: no limit)."""
    if limit_mb is None:
        return None
    if options.budget.kind == "fraction":
        return options.budget.value
    return limit_mb / baseline_mb if baseline_mb > 0 else float("inf")


def _contradiction(chain: SelectiveChain, options: MirrorOptions, limit_mb: Optional[float],
                   baseline_mb: float) -> OptionError:
    """The one-line error for a budget and an overhead limit no plan meets together."""
    limit = _overhead_limit(options)
    least = solve_selective(chain, max_cost=limit)
    model_full = chain.working[0][chain.last] or 1
    reachable = baseline_mb * least.memory / model_full if least is not None else float("nan")
    fits: Optional[SelectiveChoice] = None
    ratio = _ratio(options, limit_mb, baseline_mb)
    if ratio is not None:
        fits = solve_selective(chain, max_bytes=ratio * model_full)
    needed = f"{100 * fits.cost:.1f}%" if fits is not None else "no segment plan"
    return OptionError(
        f"memory_budget {options.memory_budget!r} and max_overhead={limit:g} "
        f"contradict: within {100 * limit:g}% extra time the least memory is about "
        f"{reachable:.0f} MB (budget {limit_mb:.0f} MB), and fitting the budget takes {needed} "
        f"recomputation; raise one of them")


def prefer_one_level(options: MirrorOptions, one_level: MirrorPlan,
                     measured: Measured) -> Tuple[bool, str]:
    """Whether ``'auto'`` keeps the one-level plan: its estimated overhead within the limit and its
    figure below the selective plan's (and within the budget)."""
    if options.backend != "auto" or not within_limits(options, one_level):
        return False, ""
    if one_level.planned_mb < measured.mb:
        return True, (f"the one-level plan ({one_level.planned_mb:.0f} MB, overhead "
                      f"{100 * one_level.overhead:.1f}%) is below the selective segments "
                      f"({measured.mb:.0f} MB)")
    return False, ""


def within_limits(options: MirrorOptions, plan: MirrorPlan) -> bool:
    """Whether a one-level plan's estimated overhead is within ``max_overhead`` and its figure
    within the budget (if the budget is a limit)."""
    if plan.overhead > _overhead_limit(options) + 1e-9:
        return False
    limit_mb = options.budget.limit_mb(plan.baseline_mb)
    return limit_mb is None or plan.planned_mb <= limit_mb


def one_level_within(setup: PlanningSetup, options: MirrorOptions, one_level: MirrorPlan,
                     started: float) -> MirrorPlan:
    """Under ``'auto'`` with ``max_overhead``, the lower of ``one_level`` and the least-memory
    one-level plan within the limit, of those within the limits (NOTE [ the one-level plan
    within an overhead limit ]); ``one_level`` otherwise.

    The plan within the limit goes through the plan cache under its own budget's key.
    """
    if options.backend != "auto" or options.max_overhead is None:
        return one_level
    within_options = options.replace(backend="mirror", segments=None, max_overhead=None,
                                     memory_budget=Budget.within_overhead(options.max_overhead))
    within = plan_dropout_variants(setup, within_options, started)
    usable = [plan for plan in (one_level, within) if within_limits(options, plan)]
    if not usable:
        return one_level
    chosen = min(usable, key=lambda plan: (plan.planned_mb, plan.overhead))  # one_level on a tie
    if chosen is within:
        logger.info("max_overhead: the least one-level memory within the limit is %.0f MB "
                    "(estimated overhead %.1f%%)", within.planned_mb, 100 * within.overhead)
    return chosen
