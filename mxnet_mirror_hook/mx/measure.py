"""The one place that binds a symbol and reads MXNet's planned memory."""
from __future__ import annotations

import gc
import logging
import re
from typing import Dict, Mapping, Optional, Union

import mxnet as mx
import numpy as np

from ..errors import MeasurementError

__all__ = ["planned_mb", "parse_planned_mb", "resident_bytes", "to_context"]

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


def planned_mb(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
               type_dict: Optional[Mapping[str, np.dtype]] = None,
               grad_req: Union[str, Dict[str, str]] = "write") -> float:
    """Bind ``symbol`` and return MXNet's planned intermediate memory in MB.

    The executor is released and the cyclic garbage collector run before
    returning: an MXNet 1.9 Executor is only freed by the cyclic collector,
    and a planner that binds in a loop would otherwise grow by the size of
    every plan it measured.

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
        executor = symbol.simple_bind(ctx=ctx, grad_req=grad_req, type_dict=dict(type_dict or {}),
                                      **dict(shapes))
    except mx.base.MXNetError as error:
        raise MeasurementError(f"MXNet could not bind the symbol on {ctx}: "
                               f"{str(error).strip().splitlines()[0][:400]}") from None
    try:
        text = executor.debug_str()
    finally:
        del executor
        gc.collect()
    return parse_planned_mb(text)


def resident_bytes() -> int:
    """Resident memory of this process in bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "r", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
