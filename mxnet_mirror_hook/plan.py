"""``plan_mirror``: plan, measure and cache a mirroring decision for a symbol.

The work is done by :mod:`mxnet_mirror_hook.planning`; this module keeps the public names
(:class:`MirrorPlan`, :func:`plan_mirror`, :func:`prepare_planning`, :class:`PlanningSetup`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Optional, Sequence, Union

import mxnet as mx

from .options import MirrorOptions, takes_options
from .planning.device import plan_request
from .planning.footprint import FootprintSource
from .planning.result import PLAN_LOGGER, MirrorPlan
from .planning.setup import PlanningSetup, PlanRequest, prepare_planning

logger = logging.getLogger(PLAN_LOGGER)

__all__ = ["MirrorPlan", "plan_mirror", "prepare_planning", "PlanningSetup"]


@takes_options
def plan_mirror(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None, *,
                options: Optional[MirrorOptions] = None,
                grad_req: Union[str, Dict[str, str]] = "write",
                fixed_param_names: Optional[Sequence[str]] = None,
                inputs_need_grad: bool = False, optimizer: Any = None,
                optimizer_params: Optional[Dict[str, Any]] = None,
                device: Optional[str] = None, surface: str = "module", **overrides: Any) -> MirrorPlan:
    """Plan which forward nodes to recompute during backward.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol, loss included.
    data_shapes : list of DataDesc or (name, shape), or dict
        Input shapes as ``Module.bind`` takes them (per device).
    label_shapes : same as data_shapes, optional
        Label shapes; labels MXNet can infer may be left out.
    options : MirrorOptions, optional
        The mirroring options in one object; the keyword arguments below
        override its fields.
    grad_req : str or dict
        Gradient request of the parameters, as in ``Module.bind``.
    fixed_param_names : list of str, optional
        Parameters that get no gradient.
    inputs_need_grad : bool
        Whether data inputs get gradients.
    optimizer : str or mx.optimizer.Optimizer, optional
        The optimizer training will use, for :attr:`MirrorPlan.footprint` and ``device_memory``
        (default: SGD with momentum 0.9, said to be assumed).
    optimizer_params : dict, optional
        Its options when given by name (``momentum``, ``multi_precision``...).
    device : str, optional
        ``'cpu'`` or ``'gpu'``: the device whose memory the footprint counts (default: where the
        plan is measured).
    surface : str
        ``'module'`` (its parameter copies and the batch's copy counted) or ``'gluon'`` (the outputs'
        head gradients counted) for the footprint.
    <mirror options>

    Returns
    -------
    MirrorPlan
        Never worse than the unmirrored symbol: when nothing beats it, the
        plan is the unmirrored symbol.

    Raises
    ------
    TypeError
        For a symbol, budget or planner of the wrong type.
    ShapeError
        For shapes that do not fit the symbol.
    UnknownPlannerError
        For an unknown planner name.
    BudgetError
        For a budget that makes no sense; ``BudgetUnreachableError`` when no
        plan fits it.
    """
    started = time.perf_counter()
    options = MirrorOptions.coerce(options, **overrides)
    request = PlanRequest(data_shapes, label_shapes, grad_req, fixed_param_names, inputs_need_grad)
    setup = request.prepare(symbol, options)  # once, for every plan below
    source = FootprintSource.of_setup(setup, optimizer, optimizer_params)
    if device is not None or surface != "module":
        source = source.replace(device=device or source.device, surface=surface)
    setup.footprint_source = source  # 'auto' decides on the footprint on this device
    plan = plan_request(setup, options, started, source)
    # The seconds of the whole call: a plan the backend decision kept (the one-level plan, after
    # segment plans were measured against it) carried its own stage's seconds, far fewer.
    seconds = time.perf_counter() - started
    if seconds - plan.planning_seconds >= 1.0:
        logger.info("planning took %.1f s in all (the plan's own stage %.1f s; the rest measured the "
                    "other backend's plans)", seconds, plan.planning_seconds)
    return dataclasses.replace(plan, planning_seconds=seconds)
