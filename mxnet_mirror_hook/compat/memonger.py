"""Seed-compatible memonger functions, for people with memonger scripts.

``make_mirror_plan``, ``get_cost`` and ``search_plan`` keep the seed's
signatures and results, with three differences that do not change them on
ordinary symbols: parameters and auxiliary states are known from the symbol's
lists instead of name suffixes, ``get_cost`` binds on the GPU only when one is
there (``ctx=`` chooses), and progress goes through ``logging``.

Like the seed, ``search_plan`` needs ``mirror_stage`` marks and may return a
plan worse than not mirroring; :func:`mxnet_mirror_hook.plan_mirror` does not.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import mxnet as mx

from ..core.planners.memonger import search_thresholds, threshold_plan, user_stages
from ..mx.apply import MirrorTemplate
from ..mx.convert import InputSpec, symbol_to_graph
from ..mx.measure import planned_mb, to_context

__all__ = ["make_mirror_plan", "get_cost", "search_plan"]

logger = logging.getLogger(__name__)


def _graph(sym: "mx.sym.Symbol", shapes: Mapping[str, tuple]):
    inputs = [InputSpec(name, tuple(shape)) for name, shape in shapes.items()]
    return symbol_to_graph(sym, inputs, input_names=list(shapes))


def make_mirror_plan(sym: "mx.sym.Symbol", threshold: int, plan_info: Optional[Dict[str, int]] = None,
                     **kwargs: Any) -> "mx.sym.Symbol":
    """Mark nodes ``force_mirroring`` with the seed's threshold heuristic.

    Parameters
    ----------
    sym : mx.sym.Symbol
        A symbol whose stage nodes carry ``mirror_stage`` marks.
    threshold : int
        Approximate segment size in MB.
    plan_info : dict, optional
        Receives ``max_size`` and ``save_size`` in bytes, as in the seed.
    **kwargs
        Input shapes, as for ``infer_shape``.

    Returns
    -------
    mx.sym.Symbol
        A copy of ``sym`` with ``force_mirroring`` on the recomputed nodes.
    """
    graph = _graph(sym, kwargs)
    result = threshold_plan(graph, int(threshold) << 20, user_stages(graph))
    if plan_info is not None:
        plan_info["max_size"] = result.max_segment_bytes
        plan_info["save_size"] = result.saved_bytes
    return MirrorTemplate(sym).build(result.mirrored)


def _default_ctx() -> "mx.Context":
    try:
        return mx.gpu() if mx.context.num_gpus() > 0 else mx.cpu()
    except mx.base.MXNetError:
        return mx.cpu()


def get_cost(sym: "mx.sym.Symbol", type_dict: Optional[Dict[str, Any]] = None,
             ctx: Optional["mx.Context"] = None, **kwargs: Any) -> int:
    """MXNet's planned memory of ``sym`` in MB (the seed's ``get_cost``).

    Binds with ``grad_req='write'`` on every argument, as the seed did, on the
    GPU when one is available and the CPU otherwise, unless ``ctx`` is given.
    """
    context = to_context(ctx) if ctx is not None else _default_ctx()
    return int(planned_mb(sym, context, kwargs, type_dict, "write"))


def search_plan(sym: "mx.sym.Symbol", ntrial: int = 6, type_dict: Optional[Dict[str, Any]] = None,
                ctx: Optional["mx.Context"] = None, **kwargs: Any) -> "mx.sym.Symbol":
    """The seed's threshold search: returns the measured-cheapest marked symbol.

    Parameters
    ----------
    sym : mx.sym.Symbol
        A symbol with ``mirror_stage`` marks.
    ntrial : int
        Grid steps after the first three guesses.
    type_dict : dict, optional
        Input dtypes.
    ctx : mx.Context, optional
        Where to measure (GPU if available, else CPU).
    **kwargs
        Input shapes.
    """
    graph = _graph(sym, kwargs)
    template = MirrorTemplate(sym)
    history = []
    for threshold, result in search_thresholds(graph, user_stages(graph), ntrial):
        marked = template.build(result.mirrored)
        cost = get_cost(marked, type_dict, ctx, **kwargs)
        logger.info("Search threshold=%d MB, cost=%d MB", threshold, cost)
        history.append((cost, threshold, marked))
    history.sort(key=lambda item: item[0])
    cost, threshold, best = history[0]
    logger.info("Find best plan with threshold=%d, cost=%d MB", threshold, cost)
    return best
