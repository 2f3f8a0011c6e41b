"""The core-attention variant of a one-level plan: the core attention recomputed in one operator,
the rest planned by MXNet's one-level mirror.

# NOTE [ planning the core-attention variant ]
# :func:`plan_core_attention` rewrites the user's symbol (mx/attention.py: each core attention
# one operator that keeps only ``qkv``; with ``recompute_dropout`` the attention Dropout inside
# it) and plans the rewritten symbol with the one-level planners, as the Dropout variants are
# planned (planning/dropout.py, whose two forms it plans in turn for the Dropouts left).  The
# fused operators are never recomputed by the mirror (KEEP_ATTR).  Its estimated overhead is the
# fused operators' forward (run again in their backward) plus the mirror's recomputation, over
# the user's plain iteration; under ``max_overhead`` the one-level part is planned for what the
# attention leaves of the limit (``Budget.within_overhead``), under a ``memory_budget`` limit
# for the budget.  Its ``baseline_mb`` is the USER's unmirrored plan, so ``ratio`` compares with
# what the user would run; ``outside_plan_mb`` is what the fused operators allocate outside
# MXNet's plan (NOTE [ what the core attention operator allocates ] in mx/attention.py), to be
# added when plans are compared (:attr:`MirrorPlan.activation_mb`).
#
# The plan cache cannot mix the two symbols up: each plan is keyed by its symbol's structure
# hash, and the rewritten symbol's has the ``Custom`` nodes where the user's has the three or
# four operators they replace (a test plans both through one cache directory).
#
# Measured on bert_mlm (seq 512, batch 8, MXNet 1.9.1 CPU): the one-level mirror gains nothing
# cheap beside the fused attention.  Forcing the mirror on the 12 GELU outputs (4 sbh each,
# which the second feed-forward product reads in backward) leaves the static plan at 2599 MB:
# MXNet replays a recomputed node as soon as its inputs are there, which for a node recomputed
# from kept tensors is the start of backward, so all 12 copies are alive together (NOTE [
# recomputable dropout form ] in mx/dropout.py saw the same).  Only recomputing the products as
# well frees memory, at the price of the products.
#
# The estimate is low on this CPU: the analytic cost model puts the core attention's forward at
# 3.6-3.7% of a BERT-base iteration at seq 512 (its FLOPs), but MXNet's CPU softmax and the
# interleaved products with a 64-wide inner dimension run far below the dense products' rate;
# the bench measured the plan within max_overhead 0.05 at +9% CPU time without dropout and +10%
# with it (bench/RESULTS.md, attention section).  Measured operator times (mx/calibrate.py) were
# not tried with the fused node.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

from ..core.attention import (core_attention_cost, core_attention_workspace, find_core_attention,
                              is_core_attention)
from ..core.budget import Budget
from ..core.cost import iteration_cost
from ..core.graph import Graph
from ..core.units import to_mb
from ..errors import BudgetUnreachableError, OptionError
from ..options import MirrorOptions
from .dropout import plan_dropout_variants
from .result import PLAN_LOGGER, MirrorPlan
from .setup import PlanningSetup

__all__ = ["plan_core_attention", "attention_overhead", "lower_with_core_attention"]

logger = logging.getLogger(PLAN_LOGGER)


def attention_overhead(plain: Graph, rewritten: Graph) -> float:
    """The fused core attentions' forward cost (run again in their backward) as a fraction of
    one plain iteration of ``plain``."""
    total = iteration_cost(plain)
    extra = sum(core_attention_cost(rewritten, node) for node in rewritten.nodes if is_core_attention(node))
    return extra / total if total > 0 else 0.0


def plan_core_attention(setup: PlanningSetup, options: MirrorOptions,
                        started: Optional[float] = None) -> Optional[MirrorPlan]:
    """The one-level plan of ``setup``'s symbol with each core attention recomputed in one
    operator (NOTE [ planning the core-attention variant ]), or None when there is nothing to
    rewrite or the attention alone exceeds ``options.max_overhead``.

    Parameters
    ----------
    setup : PlanningSetup
        The user's symbol, prepared.
    options : MirrorOptions
        ``max_overhead`` (the least memory whose estimate is within it), else ``memory_budget``;
        ``recompute_dropout`` takes the attention Dropout into the operator (without it, a core
        attention with a Dropout is left as it is) and plans both forms of the other Dropouts.
        ``backend`` and ``segments`` are ignored: the plan is one-level (``backend='mirror'``).

    Returns
    -------
    MirrorPlan or None
        None also when ``max_overhead`` and a ``memory_budget`` limit are both given and the plan
        that fits the budget is estimated above the limit.  ``symbol`` is the rewritten symbol
        with its one-level marks (bind it as any plan's); ``baseline_mb`` the user's unmirrored
        plan; ``planned_mb`` MXNet's plan of ``symbol``; ``outside_plan_mb`` the fused
        operators' temporaries and kept masks; ``overhead`` the attention's recomputation plus
        the mirror's, over the user's plain iteration.

    Raises
    ------
    BudgetUnreachableError
        When a ``memory_budget`` limit cannot be met by this variant either.
    """
    from ..mx.attention import recompute_core_attention

    started = time.perf_counter() if started is None else started
    rewritten = recompute_core_attention(setup.symbol, with_dropout=options.recompute_dropout)
    if rewritten is setup.symbol:
        if not options.recompute_dropout and find_core_attention(setup.graph, with_dropout=True):
            logger.info("core attention: %d found with a Dropout on the probabilities; "
                        "recompute_dropout=True lets one operator recompute them",
                        len(find_core_attention(setup.graph, with_dropout=True)))
        return None
    variant = options.replace(backend="mirror", segments=None, max_overhead=None)
    prepared = setup.request.prepare(rewritten, variant)
    attention = attention_overhead(setup.graph, prepared.graph)
    scale = iteration_cost(prepared.graph) / max(iteration_cost(setup.graph), 1e-30)
    if options.max_overhead is not None:
        left = options.max_overhead - attention
        if left < 0:
            logger.info("core attention: its recomputation (est. %.1f%%) alone exceeds max_overhead=%g",
                        100 * attention, options.max_overhead)
            return None
        if not options.budget.is_limit:
            variant = variant.replace(memory_budget=Budget.within_overhead(left / scale))
    plan = plan_dropout_variants(prepared, variant, started)
    temporaries, masks = core_attention_workspace(prepared.graph)
    baseline_mb = setup.measure(frozenset())
    overhead = attention + plan.overhead * scale
    if options.max_overhead is not None and overhead > options.max_overhead + 1e-9:
        logger.info("core attention: the plan within memory_budget %r is estimated at %.1f%%, above "
                    "max_overhead=%g", options.memory_budget, 100 * overhead, options.max_overhead)
        return None
    budget = str(options.budget) if options.max_overhead is None else f"max_overhead {options.max_overhead:g}"
    chosen = dataclasses.replace(
        plan, baseline_mb=baseline_mb, overhead=overhead, budget=budget,
        outside_plan_mb=to_mb(temporaries + masks), planning_seconds=time.perf_counter() - started)
    logger.info("core attention recomputed in one operator: %s", chosen.summary())
    return chosen


# NOTE [ the core-attention variant under 'auto' ]
# Under ``max_overhead`` with ``backend='auto'`` the plan chosen among the selective segments and
# the one-level plans is compared with :func:`plan_core_attention`'s, by the activations' figure
# (MXNet's plan and what the fused operators allocate outside it), and the lower within the
# limits is taken.  The variant is planned only where its rewrite applies (a core attention,
# with its Dropout only under ``recompute_dropout``); it goes through the plan cache under its
# own symbol's key.  A failure of the variant never fails planning: the chosen plan stays, with
# one warning.  Its estimate is the analytic count (see the NOTE above: on this CPU the fused
# attention measured +9-10% where the count says 3.6-4.5%).
def lower_with_core_attention(setup: PlanningSetup, options: MirrorOptions, plan: MirrorPlan,
                              started: Optional[float] = None) -> MirrorPlan:
    """``plan``, or the core-attention variant when ``'auto'`` plans under ``max_overhead`` and
    the variant is lower within the limits (NOTE [ the core-attention variant under 'auto' ])."""
    if options.backend != "auto" or options.max_overhead is None:
        return plan
    try:
        variant = plan_core_attention(setup, options, started)
    except (BudgetUnreachableError, OptionError) as error:
        logger.debug("core attention variant: %s", error)
        return plan
    except Exception as error:  # noqa: BLE001 - a variant never fails where the plan stands
        logger.warning("the core attention could not be planned as one operator (%s: %s); the "
                       "plan without it is used", type(error).__name__, str(error).splitlines()[0][:200])
        return plan
    if variant is None:
        return plan
    limit_mb = options.budget.limit_mb(plan.baseline_mb)
    if variant.activation_mb >= plan.activation_mb or (limit_mb is not None
                                                       and variant.activation_mb > limit_mb):
        logger.info("core attention variant (%.0f MB) not below the plan (%.0f MB)",
                    variant.activation_mb, plan.activation_mb)
        return plan
    logger.info("max_overhead: the core attention recomputed in one operator (%.0f MB with %.0f MB "
                "outside MXNet's plan, est. %.1f%%) is below the %s plan (%.0f MB); it is used",
                variant.activation_mb, variant.outside_plan_mb, 100 * variant.overhead, plan.backend,
                plan.activation_mb)
    return dataclasses.replace(variant, footprint_source=plan.footprint_source,
                               candidates=plan.candidates + variant.candidates)
