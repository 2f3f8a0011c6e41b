"""``plan_mirror``: plan, measure and cache a mirroring decision for a symbol.

The work is done by :mod:`mxnet_mirror_hook.planning`; this module keeps the public names
(:class:`MirrorPlan`, :func:`plan_mirror`, :func:`prepare_planning`, :class:`PlanningSetup`).
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import mxnet as mx

from .core.budget import BudgetLike
from .options import MirrorOptions
from .planning.device import plan_request
from .planning.footprint import FootprintSource
from .planning.result import MirrorPlan
from .planning.setup import PlanningSetup, PlanRequest, prepare_planning

__all__ = ["MirrorPlan", "plan_mirror", "prepare_planning", "PlanningSetup"]


def plan_mirror(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None, *,
                options: Optional[MirrorOptions] = None,
                planner: Optional[str] = None, memory_budget: BudgetLike = None,
                ctx: Union[None, str, "mx.Context"] = None,
                cache_dir: Union[None, str, bool] = None,
                grad_req: Union[str, Dict[str, str]] = "write",
                fixed_param_names: Optional[Sequence[str]] = None,
                inputs_need_grad: bool = False,
                keep_ops: Optional[Iterable[str]] = None,
                backend: Optional[str] = None, segments: Optional[int] = None,
                recompute_dropout: Optional[bool] = None, max_overhead: Optional[float] = None,
                device_memory: Union[None, str, int] = None, optimizer: Any = None,
                optimizer_params: Optional[Dict[str, Any]] = None,
                device: Optional[str] = None, surface: str = "module") -> MirrorPlan:
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
        Planner, budget, cache, measuring context and kept operators in one
        object; the keyword arguments below override its fields.
    planner : str
        A registered planner (``'auto'`` by default, ``'dp'``, ``'memonger'``,
        ``'none'``...).
    memory_budget : None, 'min', float, int or str
        See :func:`~mxnet_mirror_hook.core.budget.parse_budget`.
    ctx : mx.Context or str, optional
        Where to measure the plan (CPU by default; ``mx.gpu()`` for cuDNN's figures).
    cache_dir : str, None or False
        Plan cache directory (``None``: the default; ``False``: memory only).
    grad_req : str or dict
        Gradient request of the parameters, as in ``Module.bind``.
    fixed_param_names : list of str, optional
        Parameters that get no gradient.
    inputs_need_grad : bool
        Whether data inputs get gradients.
    keep_ops : iterable of str, optional
        Operator types never to recompute (their outputs are kept).  Dropout
        and BatchNorm variants that update statistics in their forward call
        are never recomputed in any case (see NOTE [ BatchNorm recomputed ] in
        :mod:`.mx.apply`).
    backend : str
        ``'auto'`` (the default: executor segments when their whole footprint
        on the device is clearly below the one-level plan's, else the one-level
        plan; see NOTE [ choosing the backend ] in :mod:`.planning.segments`),
        ``'mirror'`` (MXNet's one-level mirror, bit-identical training) or
        ``'segments'`` (executor segments, always).
    segments : int, optional
        Number of segments for the segments backend (default: chosen by the
        memory estimate).
    recompute_dropout : bool, optional
        Rewrite each ``Dropout`` before planning so that its output may be
        recomputed (:func:`~mxnet_mirror_hook.mx.dropout.recomputable_dropout`);
        :attr:`MirrorPlan.symbol` is then the rewritten, mirrored symbol (same
        arguments, outputs and auxiliary states).  With executor segments,
        networks with Dropout may be split instead, re-run segments replaying
        their draws (``segment_plan.replay_random``).  Off by default.
    max_overhead, device_memory : optional
        See :class:`~mxnet_mirror_hook.options.MirrorOptions`.
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
    options = MirrorOptions.coerce(options, planner=planner, memory_budget=memory_budget,
                                   cache_dir=cache_dir, cost_ctx=ctx, keep_ops=keep_ops,
                                   backend=backend, segments=segments,
                                   recompute_dropout=recompute_dropout, max_overhead=max_overhead,
                                   device_memory=device_memory)
    request = PlanRequest(data_shapes, label_shapes, grad_req, fixed_param_names, inputs_need_grad)
    setup = request.prepare(symbol, options)  # once, for every plan below
    source = FootprintSource.of_setup(setup, optimizer, optimizer_params)
    if device is not None or surface != "module":
        source = source.replace(device=device or source.device, surface=surface)
    setup.footprint_source = source  # 'auto' decides on the footprint on this device
    return plan_request(setup, options, started, source)
