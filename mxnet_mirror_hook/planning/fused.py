"""The fused variant of a one-level plan: the patterns fused operators recompute (the core
attention, LayerNorms and activations read by a product) each one operator, the rest planned by
MXNet's one-level mirror.

# NOTE [ planning the fused variant ]
# :func:`plan_fused` rewrites the user's symbol (mx/fused.py: each core attention one operator
# that keeps only ``qkv``, with ``recompute_dropout`` the attention Dropout inside it; each
# LayerNorm and each activation read by a FullyConnected one operator with it, keeping their
# input; NOTE [ fused recomputation ] in core/fused.py) and plans the rewritten symbol with the
# one-level planners, as the Dropout variants are planned (planning/dropout.py, whose two forms
# it plans in turn for the Dropouts left).  The fused operators are never recomputed by the
# mirror (KEEP_ATTR).  Its estimated overhead is what the fused operators' backwards recompute
# plus the mirror's recomputation, over the user's plain iteration; under ``max_overhead`` the
# one-level part is planned for what the fused operators leave of the limit
# (``Budget.within_overhead``), under a ``memory_budget`` limit for the budget.  Its
# ``baseline_mb`` is the USER's unmirrored plan, so ``ratio`` compares with what the user would
# run; ``outside_plan_mb`` is what the fused operators keep outside MXNet's plan, to be added
# when plans are compared (:attr:`MirrorPlan.activation_mb`).
#
# The plan cache cannot mix the two symbols up: each plan is keyed by its symbol's structure
# hash, and the rewritten symbol's has the ``Custom`` nodes where the user's has the operators
# they replace (a test plans both through one cache directory).
#
# Why fused operators and not the mirror (measured on bert_mlm, seq 512, batch 8, MXNet 1.9.1
# CPU): forcing the mirror on the 12 GELU outputs (4 sbh each, which the second feed-forward
# product reads in backward) left the static plan at 2599 MB: MXNet replays a recomputed node
# as soon as its inputs are there, which for a node recomputed from kept tensors is the start of
# backward, so all 12 copies are alive together (NOTE [ recomputable dropout form ] in
# mx/dropout.py saw the same); and MXNet must never recompute LayerNorm (NEVER_MIRRORED_OPS).
# Inside a fused operator the recomputation happens where its gradient is computed.
#
# Measured (bench/RESULTS.md, attention section; MXNet 1.9.1 CPU, one OpenMP thread, quiet
# machine): BERT-base MLM seq 512 batch 8, max_overhead 0.05: no dropout 3758 -> 1745 MB + 108
# outside (0.49x), est. +1.7%, measured +3.7% CPU time (batch 2); dropout 0.1 with
# recompute_dropout 6362 -> 2045 + 156 (0.35x), +5.7%.  The estimate is low on the CPU mostly
# because the softmax, memory-bound, costs here more than its operation count.
#
# Tried and left out (commit e5486d9 has the code): ``BatchNorm -> relu -> Convolution`` as one
# operator keeping the BatchNorm's input (resnet50_v1b: 32 matches, MXNet's plan 2901 -> 2499 MB
# at batch 32, 0.86x, with 98 MB of buffers outside).  Forward+backward CPU time +4.6% without
# MKLDNN and +33% with it (the default CPU build): 64 Python callbacks (~130 ms an iteration), the
# convolutions slower outside the executor, and the downstream BatchNorms fed the default layout
# instead of MKLDNN's blocked one; with MKLDNN, writing the convolution straight into the Custom
# operator's output also gave wrong numbers downstream (a copy fixed it).  Not worth its time.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

from ..core.attention import find_core_attention
from ..core.budget import Budget
from ..core.cost import iteration_cost
from ..core.fused import fused_counts, fused_outside_bytes, fused_recompute_cost
from ..core.graph import Graph
from ..core.units import to_mb
from ..errors import BudgetUnreachableError, OptionError
from ..options import MirrorOptions
from .dropout import plan_dropout_variants
from .result import PLAN_LOGGER, MirrorPlan
from .setup import PlanningSetup

__all__ = ["plan_fused", "fused_overhead", "lower_with_fused"]

logger = logging.getLogger(PLAN_LOGGER)


def fused_overhead(plain: Graph, rewritten: Graph) -> float:
    """What the fused operators of ``rewritten`` recompute in their backwards, as a fraction of
    one plain iteration of ``plain``."""
    total = iteration_cost(plain)
    return fused_recompute_cost(rewritten) / total if total > 0 else 0.0


def _say_attention_dropout(setup: PlanningSetup, options: MirrorOptions) -> None:
    """One line when core attentions were left for their Dropout (``recompute_dropout`` off)."""
    if options.recompute_dropout:
        return
    found = [m for m in find_core_attention(setup.graph, with_dropout=True) if m.dropout is not None]
    if found:
        logger.info("core attention: %d found with a Dropout on the probabilities; "
                    "recompute_dropout=True lets one operator recompute them", len(found))


def plan_fused(setup: PlanningSetup, options: MirrorOptions,
               started: Optional[float] = None) -> Optional[MirrorPlan]:
    """The one-level plan of ``setup``'s symbol with every pattern a fused operator recomputes
    replaced by it (NOTE [ planning the fused variant ]), or None when there is nothing to
    rewrite or the fused operators alone exceed ``options.max_overhead``.

    Parameters
    ----------
    setup : PlanningSetup
        The user's symbol, prepared.
    options : MirrorOptions
        ``max_overhead`` (the least memory whose estimate is within it), else ``memory_budget``;
        ``recompute_dropout`` takes the attention Dropout into the core-attention operator
        (without it, a core attention with a Dropout is left as it is) and plans both forms of
        the other Dropouts.  ``backend`` and ``segments`` are ignored: the plan is one-level
        (``backend='mirror'``).

    Returns
    -------
    MirrorPlan or None
        None also when ``max_overhead`` and a ``memory_budget`` limit are both given and the plan
        that fits the budget is estimated above the limit.  ``symbol`` is the rewritten symbol
        with its one-level marks (bind it as any plan's); ``baseline_mb`` the user's unmirrored
        plan; ``planned_mb`` MXNet's plan of ``symbol``; ``outside_plan_mb`` what the fused
        operators keep outside it; ``overhead`` their recomputation plus the mirror's, over the
        user's plain iteration.

    Raises
    ------
    BudgetUnreachableError
        When a ``memory_budget`` limit cannot be met by this variant either.
    """
    from ..mx.fused import fuse_for_recomputation

    started = time.perf_counter() if started is None else started
    _say_attention_dropout(setup, options)
    rewritten = fuse_for_recomputation(setup.symbol, with_dropout=options.recompute_dropout,
                                       keep_ops=options.keep_ops)
    if rewritten is setup.symbol:
        return None
    variant = options.replace(backend="mirror", segments=None, max_overhead=None)
    prepared = setup.request.prepare(rewritten, variant)
    fused = fused_overhead(setup.graph, prepared.graph)
    scale = iteration_cost(prepared.graph) / max(iteration_cost(setup.graph), 1e-30)
    if options.max_overhead is not None:
        left = options.max_overhead - fused
        if left < 0:
            logger.info("fused operators: their recomputation (est. %.1f%%) alone exceeds max_overhead=%g",
                        100 * fused, options.max_overhead)
            return None
        if not options.budget.is_limit:
            variant = variant.replace(memory_budget=Budget.within_overhead(left / scale))
    plan = plan_dropout_variants(prepared, variant, started)
    baseline_mb = setup.measure(frozenset())
    if variant.budget.overhead_limit is not None:   # the least memory within the limit
        plan = _unless_negligible(prepared, variant, plan, baseline_mb, started)
    overhead = fused + plan.overhead * scale
    if options.max_overhead is not None and overhead > options.max_overhead + 1e-9:
        logger.info("fused operators: the plan within memory_budget %r is estimated at %.1f%%, above "
                    "max_overhead=%g", options.memory_budget, 100 * overhead, options.max_overhead)
        return None
    budget = str(options.budget) if options.max_overhead is None else f"max_overhead {options.max_overhead:g}"
    chosen = dataclasses.replace(
        plan, baseline_mb=baseline_mb, overhead=overhead, budget=budget,
        outside_plan_mb=to_mb(fused_outside_bytes(prepared.graph)),
        planning_seconds=time.perf_counter() - started)
    counts = ", ".join(f"{count} {name}" for name, count in fused_counts(prepared.graph).items())
    logger.info("fused operators (%s): %s", counts, chosen.summary())
    return chosen


#: A one-level mirror on top of the fused operators that frees less than this fraction of the
#: user's unmirrored plan is not worth its recomputation (NOTE [ negligible mirroring beside
#: fused operators ]).
NEGLIGIBLE_FRACTION = 0.01


# NOTE [ negligible mirroring beside fused operators ]
# Under ``max_overhead`` the one-level part takes the least memory within what the fused operators
# leave of the limit, and spends all of it when it can: on BERT-base (seq 512, batch 8, no
# dropout, max_overhead 0.05) 50 recomputed nodes for 10 MB of 3758 (1745 -> 1735 MB) at an
# estimated +3.0%, more than the fused operators' own +1.7%.  MXNet's figures move by whole MB
# and the estimate by a point or two, so a saving under NEGLIGIBLE_FRACTION of the unmirrored
# plan is taken as none, and the fused operators are planned alone (no node mirrored).
def _unless_negligible(prepared: PlanningSetup, variant: MirrorOptions, plan: MirrorPlan,
                       baseline_mb: float, started: float) -> MirrorPlan:
    """``plan``, or the plan that mirrors nothing when ``plan``'s mirroring frees under
    NEGLIGIBLE_FRACTION of ``baseline_mb``."""
    if not plan.mirrored:
        return plan
    bare = plan_dropout_variants(prepared, variant.replace(memory_budget=Budget.within_overhead(0.0)),
                                 started)
    if bare.planned_mb - plan.planned_mb >= NEGLIGIBLE_FRACTION * baseline_mb:
        return plan
    logger.info("fused operators: mirroring %d more nodes frees %.0f MB (under %.0f%% of %.0f MB); "
                "none mirrored", len(plan.mirrored), bare.planned_mb - plan.planned_mb,
                100 * NEGLIGIBLE_FRACTION, baseline_mb)
    return bare


# NOTE [ the fused variant under 'auto' ]
# Under ``max_overhead`` with ``backend='auto'`` the plan chosen among the selective segments and
# the one-level plans is compared with :func:`plan_fused`'s, by the activations' figure (MXNet's
# plan and what the fused operators keep outside it), and the lower within the limits is taken.
# Under ``memory_budget='min'`` too (the least memory, whatever it costs): on BERT-base at seq 512,
# batch 2 the one-level 'min' plan was 0.64x at +27% measured where the fused operators alone give
# 0.58x at +4%.
# The variant is planned only where a rewrite applies (a core attention, with its Dropout only
# under ``recompute_dropout``; a LayerNorm or an activation read by a FullyConnected); it goes
# through the plan cache under its own symbol's key.  A failure of the variant never fails
# planning: the chosen plan stays, with one warning.  Its estimate is the analytic count.
def lower_with_fused(setup: PlanningSetup, options: MirrorOptions, plan: MirrorPlan,
                     started: Optional[float] = None) -> MirrorPlan:
    """``plan``, or the fused variant when ``'auto'`` plans under ``max_overhead`` or for the least
    memory (``memory_budget='min'``) and the variant is lower within the limits (NOTE [ the fused
    variant under 'auto' ])."""
    if options.backend != "auto" or (options.max_overhead is None and options.budget.kind != "min"):
        return plan
    try:
        variant = plan_fused(setup, options, started)
    except (BudgetUnreachableError, OptionError) as error:
        logger.debug("fused variant: %s", error)
        return plan
    except Exception as error:  # noqa: BLE001 - a variant never fails where the plan stands
        logger.warning("the fused operators could not be planned (%s: %s); the plan without them is "
                       "used", type(error).__name__, str(error).splitlines()[0][:200])
        return plan
    if variant is None:
        return plan
    limit_mb = options.budget.limit_mb(plan.baseline_mb)
    if variant.activation_mb >= plan.activation_mb or (limit_mb is not None
                                                       and variant.activation_mb > limit_mb):
        logger.info("fused variant (%.0f MB) not below the plan (%.0f MB)",
                    variant.activation_mb, plan.activation_mb)
        return plan
    logger.info("max_overhead: fused operators (%.0f MB with %.0f MB outside MXNet's plan, est. "
                "%.1f%%) are below the %s plan (%.0f MB); they are used",
                variant.activation_mb, variant.outside_plan_mb, 100 * variant.overhead, plan.backend,
                plan.activation_mb)
    return dataclasses.replace(variant, footprint_source=plan.footprint_source,
                               candidates=plan.candidates + variant.candidates)
