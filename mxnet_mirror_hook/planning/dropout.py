"""Dropout variants of a one-level plan: the user's Dropout or a recomputable rewrite, the lower."""
from __future__ import annotations

import logging
import time
from typing import List, Optional

from ..errors import BudgetUnreachableError
from ..options import MirrorOptions
from .one_level import plan_one_level
from .result import PLAN_LOGGER, MirrorPlan
from .setup import PlanningSetup

__all__ = ["plan_dropout_variants"]

logger = logging.getLogger(PLAN_LOGGER)


def plan_dropout_variants(setup: PlanningSetup, options: MirrorOptions,
                          started: Optional[float] = None) -> MirrorPlan:
    """The one-level plan, with ``recompute_dropout`` the lower of the two Dropout forms.

    # NOTE [ recomputable dropout, both ways ]
    # Making Dropout recomputable lowers MXNet's plan for some networks (a
    # dropout MLP) and raises it for others (attention, where a kept Dropout
    # output is a free checkpoint for MXNet's one-level mirror: NOTE [
    # recomputable dropout form ] in mx/dropout.py).  With the option on, both
    # symbols are planned (each through the cache: the rewritten one under a
    # key with ``recompute_dropout``, the user's under today's key) and the
    # lower planned MB is returned; on a tie, the user's symbol (MXNet's own
    # Dropout draws).  So the option never plans more than leaving it off.
    # ``plan.symbol`` tells which was taken (a rewritten symbol has
    # ``<dropout>_mask_draw`` nodes).  A budget that only one of them reaches
    # takes that one; when neither does, the error with the lower reachable
    # figure is raised.

    Parameters
    ----------
    setup : PlanningSetup
        The user's symbol, prepared (the rewrite is prepared for the same request).
    options : MirrorOptions
        The options (``recompute_dropout`` on: both forms are planned).
    started : float, optional
        ``time.perf_counter()`` when planning began.
    """
    if not options.recompute_dropout:
        return plan_one_level(setup, options, started)
    from ..mx.dropout import recomputable_dropout

    rewritten = recomputable_dropout(setup.symbol)
    if rewritten is setup.symbol:
        return plan_one_level(setup, options, started)
    plans: List[MirrorPlan] = []
    errors: List[BudgetUnreachableError] = []
    for flag in (False, True):
        variant = options.replace(recompute_dropout=flag)
        try:
            prepared = setup.request.prepare(rewritten, variant) if flag else setup
            plans.append(plan_one_level(prepared, variant, time.perf_counter()))
        except BudgetUnreachableError as error:
            errors.append(error)
    if not plans:
        raise min(errors, key=lambda e: e.min_reachable_mb) from None
    chosen = min(plans, key=lambda plan: plan.planned_mb)  # first (the user's) on a tie
    if len(plans) == 2:
        logger.info("recomputable dropout: %.0f MB with Dropout rewritten, %.0f MB as written; %s",
                    plans[1].planned_mb, plans[0].planned_mb,
                    "rewritten" if chosen is plans[1] else "keeping the user's Dropout")
    return chosen
