"""Seed-compatible memonger functions, for people with memonger scripts.

``make_mirror_plan``, ``get_cost`` and ``search_plan`` keep the seed's
signatures, results and printed progress, with two differences that do not
change them on ordinary symbols: parameters and auxiliary states are known from
the symbol's lists instead of name suffixes, and ``get_cost`` binds on the GPU
only when one is there (``ctx=`` chooses).

Like the seed, ``search_plan`` needs ``mirror_stage`` marks and may return a
plan worse than not mirroring; :func:`mxnet_mirror_hook.plan_mirror` does not.

# NOTE [ the memonger compat prints and binds in this process ]
# Two exceptions to the package's rules, both for parity with the seed, whose
# users run these functions from scripts that never configure logging:
# * ``search_plan`` prints the seed's lines ("Search threshold=%d MB, cost=%d
#   MB" per trial, then "Find best plan with threshold=%d, cost=%d MB") to
#   stdout with ``print``, in the seed's order; the same lines go to this
#   module's logger at DEBUG.
# * ``get_cost`` binds in this process, as the seed did: starting a measuring
#   worker (an MXNet import, 2-3 s) costs more than the seed's whole search on
#   a small input, and a lazy CPU bind takes milliseconds.  Each bind leaves
#   some native memory behind (NOTE [ why measurements run in a worker
#   process ] in mx/worker.py), as the seed's did; a program that calls the
#   search many times on big networks sets ``MXNET_MIRROR_HOOK_MEASURE=worker``
#   and the binds go to the recycled worker processes (in parallel for the
#   candidates of one search).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Mapping, Optional

import mxnet as mx

from ..core.planners.memonger import search_thresholds, threshold_plan, user_stages
from ..mx.apply import MirrorTemplate
from ..mx.convert import InputSpec, symbol_to_graph
from .. import env
from ..mx.bind import planned_mb_in_process, to_context
from ..mx.measure import planned_mb_many

__all__ = ["make_mirror_plan", "get_cost", "search_plan"]

logger = logging.getLogger(__name__)


def _graph(sym: "mx.sym.Symbol", shapes: Mapping[str, tuple],
           document: Optional[Dict[str, Any]] = None):
    inputs = [InputSpec(name, tuple(shape)) for name, shape in shapes.items()]
    return symbol_to_graph(sym, inputs, input_names=list(shapes), document=document)


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


def _in_workers() -> bool:
    """Whether binds go to worker processes.

    See NOTE [ the memonger compat prints and binds in this process ].
    """
    return env.measure_mode() == "worker"


def _costs(symbols: List["mx.sym.Symbol"], type_dict: Optional[Dict[str, Any]],
           ctx: Optional["mx.Context"], shapes: Mapping[str, tuple]) -> List[int]:
    """``get_cost`` of several symbols with the same inputs (in parallel workers when asked)."""
    context = to_context(ctx) if ctx is not None else _default_ctx()
    if _in_workers():
        return [int(mb) for mb in planned_mb_many(symbols, context, shapes, type_dict, "write")]
    return [int(planned_mb_in_process(symbol, context, shapes, type_dict, "write"))
            for symbol in symbols]


def get_cost(sym: "mx.sym.Symbol", type_dict: Optional[Dict[str, Any]] = None,
             ctx: Optional["mx.Context"] = None, **kwargs: Any) -> int:
    """MXNet's planned memory of ``sym`` in MB (the seed's ``get_cost``).

    Binds with ``grad_req='write'`` on every argument, as the seed did, on the
    GPU when one is available and the CPU otherwise, unless ``ctx`` is given.
    """
    return _costs([sym], type_dict, ctx, kwargs)[0]


def _progress(line: str) -> None:
    """One of the seed's progress lines: printed, as the seed did, and logged at DEBUG."""
    print(line, flush=True)
    logger.debug("%s", line)


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
    document = json.loads(sym.tojson())  # parsed once for the graph and the template
    graph = _graph(sym, kwargs, document)
    template = MirrorTemplate(sym, document)
    # The seed's thresholds follow from its plans' segment sizes, never from
    # the measured costs: every candidate is known before the first bind.
    trials = [(threshold, template.build(result.mirrored))
              for threshold, result in search_thresholds(graph, user_stages(graph), ntrial)]
    history = []
    if _in_workers():
        costs = _costs([marked for _, marked in trials], type_dict, ctx, kwargs)
    else:
        costs = None
    for index, (threshold, marked) in enumerate(trials):
        cost = costs[index] if costs is not None else get_cost(marked, type_dict, ctx, **kwargs)
        _progress("Search threshold=%d MB, cost=%d MB" % (threshold, cost))
        history.append((cost, threshold, marked))
    history.sort(key=lambda item: item[0])
    cost, threshold, best = history[0]
    _progress("Find best plan with threshold=%d, cost=%d MB" % (threshold, cost))
    return best
