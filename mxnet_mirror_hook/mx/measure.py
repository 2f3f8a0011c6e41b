"""MXNet's planned memory of symbols, measured in recycled worker processes.

:func:`planned_mb_many` is what planners measure with (through
``planning.measure.BindMeasure``); :func:`executed_graph` captures the executed graph the
allocator model replays.  Both bind in worker processes (NOTE [ why
measurements run in a worker process ] in :mod:`.worker`) unless a symbol has
``Custom`` operators or ``$MXNET_MIRROR_HOOK_MEASURE`` is ``inprocess``; the
binding itself is :mod:`.bind`'s.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Mapping, Optional, Sequence, Union

import mxnet as mx
import numpy as np

from .. import env
from ..core.allocator import ExecutedGraph
from .bind import GradReq, environment, planned_mb_in_process
from .executed import capture_executed_graph
from .text import UnreadableGraphError
from .worker import get_capture_worker, get_pool

__all__ = ["planned_mb", "planned_mb_many", "executed_graph", "start_executed_graph", "measures_in_process",
           "builtin_mirror_mb", "DO_MIRROR_ENV"]

#: MXNet's own mirroring heuristic, read by every bind.
DO_MIRROR_ENV = {env.DO_MIRROR: "1"}

logger = logging.getLogger(__name__)

SymbolLike = Union[str, "mx.sym.Symbol"]


def _text(symbol: SymbolLike) -> str:
    return symbol if isinstance(symbol, str) else symbol.tojson()


def planned_mb(symbol: SymbolLike, ctx: "mx.Context", shapes: Mapping[str, tuple],
               type_dict: Optional[Mapping[str, np.dtype]] = None,
               grad_req: GradReq = "write") -> float:
    """Bind ``symbol`` (a Symbol or its JSON text) and return MXNet's planned memory in MB.

    See :func:`planned_mb_many`.
    """
    return planned_mb_many([symbol], ctx, shapes, type_dict, grad_req)[0]


def planned_mb_many(symbols: Sequence[SymbolLike], ctx: "mx.Context",
                    shapes: Mapping[str, tuple], type_dict: Optional[Mapping[str, np.dtype]] = None,
                    grad_req: GradReq = "write") -> List[float]:
    """MXNet's planned memory of several symbols with the same inputs, in MB.

    The binds happen in recycled worker processes, in parallel, unless a
    symbol has ``Custom`` operators (registered in this process only) or
    ``$MXNET_MIRROR_HOOK_MEASURE`` is ``inprocess``.

    Raises
    ------
    MeasurementError
        If MXNet refuses a bind or a worker dies.
    """
    texts = [_text(s) for s in symbols]
    if any(measures_in_process(text) for text in texts):
        return [planned_mb_in_process(mx.sym.load_json(text), ctx, shapes, type_dict, grad_req)
                for text in texts]
    return get_pool().measure_many([worker_request(text, ctx, shapes, type_dict, grad_req)
                                    for text in texts])


def worker_request(symbol_json: str, ctx: "mx.Context", shapes: Mapping[str, tuple],
                   type_dict: Optional[Mapping[str, np.dtype]], grad_req: GradReq,
                   capture: bool = False, match_range: int = 0) -> Dict[str, object]:
    """One request to a worker process (protocol in :mod:`.worker`); ``match_range``: bind
    under this ``NNVM_EXEC_MATCH_RANGE`` (0: the worker's setting)."""
    types = {k: np.dtype(v) for k, v in (type_dict or {}).items()}
    request: Dict[str, object] = {
        "symbol": symbol_json, "shapes": {k: list(v) for k, v in shapes.items()},
        "types": {k: v.name for k, v in types.items()},
        "grad_req": grad_req, "ctx": [ctx.device_type, ctx.device_id]}
    # For the C API path (NOTE [ binding without the mxnet package ] in capi.py): MXNet's
    # device type id and dtype ids, as ``simple_bind`` converts them (dtypes without an
    # id are left out, as it leaves them out).
    codes = _dtype_codes()
    if codes is not None:
        request["device"] = [ctx.device_typeid, ctx.device_id]
        request["type_ids"] = {k: codes[v.type] for k, v in types.items() if v.type in codes}
    if capture:
        request["capture"] = True
    if match_range:
        request["match_range"] = int(match_range)
    return request


def _dtype_codes() -> Optional[Mapping[type, int]]:
    """MXNet's numpy-type -> dtype id table (None if this MXNet has none where expected)."""
    table = getattr(mx.ndarray.ndarray, "_DTYPE_NP_TO_MX", None)
    return table if isinstance(table, dict) else None


def measures_in_process(symbol_json: str) -> bool:
    """Whether a symbol is bound in this process: ``$MXNET_MIRROR_HOOK_MEASURE=inprocess``, or
    ``Custom`` operators (registered in this process only)."""
    return env.measure_in_process() or '"op": "Custom"' in symbol_json


def executed_graph(symbol: SymbolLike, ctx: "mx.Context", shapes: Mapping[str, tuple],
                   type_dict: Optional[Mapping[str, np.dtype]] = None,
                   grad_req: GradReq = "write") -> ExecutedGraph:
    """MXNet's executed graph of a bind of ``symbol`` (NOTE [ replaying MXNet's memory plan ]).

    Bound in a worker process started with MXNet's memory-plan log on (in this
    process under the conditions :func:`planned_mb_many` binds in it, which
    fails unless this process was started with the log on); ``measured_mb``
    holds the bind's planned MB.

    Raises
    ------
    MeasurementError
        If MXNet refuses the bind or its memory log cannot be read.
    """
    text = _text(symbol)
    if measures_in_process(text):
        return capture_executed_graph(mx.sym.load_json(text), ctx, shapes, type_dict, grad_req)
    reply = get_capture_worker().exchange(
        worker_request(text, ctx, shapes, type_dict, grad_req, capture=True))
    if reply.get("executed") is None:  # NOTE [ a figure without its graph ] in text.py
        raise UnreadableGraphError(reply.get("unreadable", "the executed graph cannot be read"),
                                   float(reply["mb"]))
    return ExecutedGraph.from_dict(reply["executed"])


# NOTE [ captures asked for ahead ]
# Planning the pieces of a split one after the other, the planning process waited
# for each piece's capture (the executed graph its allocator model replays) and the
# capture worker then waited for the planner's search.  A caller that knows which
# captures it will need (the pieces it is about to plan) asks for them ahead: they
# are made in one background thread, in the order asked, by the same capture worker
# :func:`executed_graph` uses, so each graph is the one it would have captured, while
# the planner searches the piece before.  The thread only exchanges with the worker
# and reads its reply; symbols bound in this process are never asked for ahead.
_AHEAD: Optional[ThreadPoolExecutor] = None
_AHEAD_LOCK = threading.Lock()


def start_executed_graph(symbol_json: str, ctx: "mx.Context", shapes: Mapping[str, tuple],
                         type_dict: Optional[Mapping[str, np.dtype]] = None,
                         grad_req: GradReq = "write") -> "Future[ExecutedGraph]":
    """:func:`executed_graph` of a symbol the workers bind, started in the background (NOTE
    [ captures asked for ahead ]); the future raises what :func:`executed_graph` raises.

    Raises
    ------
    ValueError
        If the symbol would be bound in this process (:func:`measures_in_process`).
    """
    global _AHEAD
    if measures_in_process(symbol_json):
        raise ValueError("a symbol bound in this process is not captured ahead")
    with _AHEAD_LOCK:
        if _AHEAD is None:
            _AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-capture-ahead")
        return _AHEAD.submit(executed_graph, symbol_json, ctx, dict(shapes), dict(type_dict or {}) or None,
                             grad_req)


def builtin_mirror_mb(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                      type_dict: Optional[Mapping[str, np.dtype]] = None,
                      grad_req: GradReq = "write") -> float:
    """Planned MB of ``symbol`` under MXNet's own ``MXNET_BACKWARD_DO_MIRROR=1`` (bound in
    this process, where the variable is set for the bind)."""
    with environment(DO_MIRROR_ENV):
        return planned_mb_in_process(symbol, ctx, shapes, type_dict, grad_req)
