"""The one place that binds a symbol and reads MXNet's planned memory."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import mxnet as mx
import numpy as np

from ..errors import MeasurementError

if TYPE_CHECKING:  # pragma: no cover
    from ..core.allocator import ExecutedGraph

__all__ = ["planned_mb", "planned_mb_many", "executed_graph", "measures_in_process", "planned_mb_in_process", "parse_planned_mb", "resident_bytes", "to_context",
           "MEASURE_MODE_ENV", "DO_MIRROR_ENV", "environment", "builtin_mirror_mb"]

MEASURE_MODE_ENV = "MXNET_MIRROR_HOOK_MEASURE"
#: MXNet's own mirroring heuristic, read by every bind.
DO_MIRROR_ENV = {"MXNET_BACKWARD_DO_MIRROR": "1"}

logger = logging.getLogger(__name__)

_TOTAL = re.compile(r"Total\s+(\d+(?:\.\d+)?)\s+MB\s+allocated")


def parse_planned_mb(debug_text: str) -> float:
    """Read ``Total N MB allocated`` from an executor's ``debug_str()``.

    The line's position varies between MXNet builds (the seed read it by
    position); this finds it wherever it is, and takes the last one.

    Raises
    ------
    MeasurementError
        If the text has no such line.
    """
    found = _TOTAL.findall(debug_text)
    if not found:
        raise MeasurementError(
            "MXNet's debug_str() has no 'Total N MB allocated' line; this MXNet build does not "
            "report its memory plan, so plans cannot be measured")
    return float(found[-1])


def to_context(ctx: Union[None, str, "mx.Context"]) -> "mx.Context":
    """``None`` -> CPU; ``'gpu'``/``'gpu:1'``/``'cpu'`` strings; contexts pass through."""
    if ctx is None:
        return mx.cpu()
    if isinstance(ctx, mx.Context):
        return ctx
    if isinstance(ctx, str):
        kind, _, index = ctx.partition(":")
        if kind in ("cpu", "gpu"):
            return mx.Context(kind, int(index or 0))
    raise TypeError(f"ctx must be an mx.Context or 'cpu'/'gpu[:N]', got {ctx!r}")


def planned_mb(symbol: Union[str, "mx.sym.Symbol"], ctx: "mx.Context", shapes: Mapping[str, tuple],
               type_dict: Optional[Mapping[str, np.dtype]] = None,
               grad_req: Union[str, Dict[str, str]] = "write") -> float:
    """Bind ``symbol`` (a Symbol or its JSON text) and return MXNet's planned memory in MB.

    See :func:`planned_mb_many`.
    """
    return planned_mb_many([symbol], ctx, shapes, type_dict, grad_req)[0]


def planned_mb_many(symbols: Sequence[Union[str, "mx.sym.Symbol"]], ctx: "mx.Context",
                    shapes: Mapping[str, tuple], type_dict: Optional[Mapping[str, np.dtype]] = None,
                    grad_req: Union[str, Dict[str, str]] = "write") -> List[float]:
    """MXNet's planned memory of several symbols with the same inputs, in MB.

    The binds happen in recycled worker processes, in parallel (see NOTE [ why
    measurements run in a worker process ] in :mod:`.worker`), unless a
    symbol has ``Custom`` operators (registered in this process only) or
    ``$MXNET_MIRROR_HOOK_MEASURE`` is ``inprocess``.

    Raises
    ------
    MeasurementError
        If MXNet refuses a bind or a worker dies.
    """
    texts = [s if isinstance(s, str) else s.tojson() for s in symbols]
    if any(measures_in_process(text) for text in texts):
        return [planned_mb_in_process(mx.sym.load_json(text), ctx, shapes, type_dict, grad_req)
                for text in texts]
    from .worker import get_pool

    return get_pool().measure_many([_worker_request(text, ctx, shapes, type_dict, grad_req)
                                    for text in texts])


def _worker_request(symbol_json: str, ctx: "mx.Context", shapes: Mapping[str, tuple],
                    type_dict: Optional[Mapping[str, np.dtype]],
                    grad_req: Union[str, Dict[str, str]], **extra) -> Dict[str, object]:
    """One request to a worker process (protocol in :mod:`.worker`)."""
    return {"symbol": symbol_json, "shapes": {k: list(v) for k, v in shapes.items()},
            "types": {k: np.dtype(v).name for k, v in (type_dict or {}).items()},
            "grad_req": grad_req, "ctx": [ctx.device_type, ctx.device_id], **extra}


def measures_in_process(symbol_json: str) -> bool:
    """Whether a symbol is bound in this process: ``$MXNET_MIRROR_HOOK_MEASURE=inprocess``, or
    ``Custom`` operators (registered in this process only)."""
    return (os.environ.get(MEASURE_MODE_ENV, "worker").lower() == "inprocess"
            or '"op": "Custom"' in symbol_json)


def executed_graph(symbol: Union[str, "mx.sym.Symbol"], ctx: "mx.Context", shapes: Mapping[str, tuple],
                   type_dict: Optional[Mapping[str, np.dtype]] = None,
                   grad_req: Union[str, Dict[str, str]] = "write") -> "ExecutedGraph":
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
    from ..core.allocator import ExecutedGraph
    from .executed import capture_executed_graph

    text = symbol if isinstance(symbol, str) else symbol.tojson()
    if measures_in_process(text):
        return capture_executed_graph(mx.sym.load_json(text), ctx, shapes, type_dict, grad_req)
    from .worker import get_capture_worker, get_pool

    get_pool().warm()  # the measuring workers start while the graph is captured
    reply = get_capture_worker().exchange(
        _worker_request(text, ctx, shapes, type_dict, grad_req, capture=True))
    return ExecutedGraph.from_dict(reply["executed"])


def planned_mb_in_process(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                          type_dict: Optional[Mapping[str, np.dtype]] = None,
                          grad_req: Union[str, Dict[str, str]] = "write") -> float:
    """Bind ``symbol`` in this process and return MXNet's planned memory in MB.

    The executor is released and the cyclic garbage collector run before
    returning, which frees the executor's Python objects (MXNet 1.9 still
    keeps some native memory per bind; :func:`planned_mb` avoids that).

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The symbol to measure.
    ctx : mx.Context
        Where to bind (a CPU bind allocates lazily and plans like a GPU one).
    shapes : mapping of str to tuple
        Input shapes.
    type_dict : mapping of str to dtype, optional
        Input dtypes.
    grad_req : str or dict
        As for ``simple_bind``.

    Raises
    ------
    MeasurementError
        If MXNet refuses the bind.
    """
    try:
        # An empty type_dict makes MXNet drop its float32 default: pass None then.
        executor = symbol.simple_bind(ctx=ctx, grad_req=grad_req, type_dict=dict(type_dict) or None
                                      if type_dict else None, **dict(shapes))
    except (mx.base.MXNetError, RuntimeError) as error:  # simple_bind re-raises as RuntimeError
        lines = [line for line in str(error).splitlines() if "Error" in line] or [str(error)]
        raise MeasurementError(f"MXNet could not bind the symbol on {ctx}: {lines[-1][:400]}") from None
    try:
        text = executor.debug_str()
    finally:
        del executor
        gc.collect()
    return parse_planned_mb(text)


@contextlib.contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block (MXNet reads some at bind time)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def builtin_mirror_mb(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                      type_dict: Optional[Mapping[str, np.dtype]] = None,
                      grad_req: Union[str, Dict[str, str]] = "write") -> float:
    """Planned MB of ``symbol`` under MXNet's own ``MXNET_BACKWARD_DO_MIRROR=1`` (bound in
    this process, where the variable is set for the bind)."""
    with environment(DO_MIRROR_ENV):
        return planned_mb_in_process(symbol, ctx, shapes, type_dict, grad_req)


def resident_bytes() -> int:
    """Resident memory of this process in bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "r", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
