"""The one bind helper: bind a symbol, read MXNet's errors and plan, set environment variables.

Every module of :mod:`mxnet_mirror_hook.mx` that binds (measuring, capturing
the executed graph, timing) goes through :func:`bind_symbol`, so dtype
handling, error wording and the release of the executor are the same
everywhere.  This module imports nothing else from ``mx/`` but the pure :mod:`.text`.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Iterator, Mapping, Optional, Union

import mxnet as mx
import numpy as np

from .. import env
from ..errors import MeasurementError
from .process import resident_bytes, resident_mb
from .text import parse_planned_mb

__all__ = ["GradReq", "bind_symbol", "bound", "planned_mb_in_process", "parse_planned_mb",
           "mxnet_error_line", "environment", "to_context", "resident_bytes", "resident_mb"]

#: ``grad_req`` as ``simple_bind`` takes it.
GradReq = Union[str, Dict[str, str]]

#: Markers of the line that says what went wrong, most telling first.
_ERROR_MARKERS = (("Check failed",), ("MXNetError:",), ("Error", "error"))
#: Headers the Python front end puts before MXNet's own message (they say nothing of the cause).
_HEADERS = ("simple_bind error",)


def mxnet_error_line(error: BaseException, limit: int = 400) -> str:
    """The line of an MXNet error that says what went wrong (not the stack trace).

    MXNet's messages carry a C++ stack trace, and ``simple_bind``'s a header
    ("simple_bind error. Arguments: ...") before it; the useful line is the first
    failed check, else the first ``MXNetError:`` line, else the first naming an
    error, else the first line.
    """
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(_HEADERS)]
    for markers in _ERROR_MARKERS:
        for line in lines:
            if any(marker in line for marker in markers):
                return line[:limit]
    return (lines or text.splitlines() or [repr(error)])[0][:limit]




def to_context(ctx: Union[None, str, "mx.Context"]) -> "mx.Context":
    """``None`` -> CPU; ``'gpu'``/``'gpu:1'``/``'cpu'`` strings; contexts pass through."""
    if ctx is None:
        return mx.cpu()
    if isinstance(ctx, mx.Context):
        return ctx
    if isinstance(ctx, str):
        kind, _, index = ctx.partition(":")
        if kind in ("cpu", "gpu") and (not index or index.isdigit()):
            return mx.Context(kind, int(index or 0))
    raise TypeError(f"ctx must be an mx.Context or 'cpu'/'gpu[:N]', got {ctx!r}")


def bind_symbol(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                type_dict: Optional[Mapping[str, np.dtype]] = None,
                grad_req: GradReq = "write") -> "mx.executor.Executor":
    """``simple_bind`` with MXNet's error turned into a :class:`MeasurementError`.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The symbol to bind.
    ctx : mx.Context
        Where to bind (a CPU bind allocates lazily and plans like a GPU one).
    shapes : mapping of str to tuple
        Input shapes.
    type_dict : mapping of str to dtype, optional
        Input dtypes (float32 where not given).
    grad_req : str or dict
        As for ``simple_bind``.

    Raises
    ------
    MeasurementError
        If MXNet refuses the bind; the message has MXNet's own error line.
    """
    # An empty type_dict makes MXNet drop its float32 default: pass None then.
    types = {name: np.dtype(value) for name, value in (type_dict or {}).items()} or None
    try:
        with env.scoped(env.quiet_bind()):  # no "Subgraph backend ... activated" line per bind
            return symbol.simple_bind(ctx=ctx, grad_req=grad_req, type_dict=types, **dict(shapes))
    except (mx.base.MXNetError, RuntimeError) as error:  # simple_bind re-raises as RuntimeError
        raise MeasurementError(
            f"MXNet could not bind the symbol on {ctx}: {mxnet_error_line(error)}") from None


@contextlib.contextmanager
def bound(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
          type_dict: Optional[Mapping[str, np.dtype]] = None,
          grad_req: GradReq = "write") -> Iterator["mx.executor.Executor"]:
    """A bound executor for the block, released after it.

    The executor holds no reference cycle (checked with a weak reference and the
    collector off): dropping it frees it, so no ``gc.collect()`` is run, which
    would take 60-200 ms in a process holding MXNet, gluoncv and a large symbol.
    """
    executor = bind_symbol(symbol, ctx, shapes, type_dict, grad_req)
    try:
        yield executor
    finally:
        del executor
        # NOTE [ an in-process bind leaves engine work ]
        # A bind pushes work to MXNet's engine that runs later; left pending, the work of every
        # candidate bound in a row ran at the next ``waitall`` together and allocated all their
        # arrays at once (planning bert_mlm seq 512 with its fused core attention in process,
        # then training: past 14 GB and killed; with a wait after each bind, 0.9 GB).  Waiting
        # here keeps one candidate's arrays alive at a time.
        mx.nd.waitall()


def planned_mb_in_process(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                          type_dict: Optional[Mapping[str, np.dtype]] = None,
                          grad_req: GradReq = "write") -> float:
    """Bind ``symbol`` in this process and return MXNet's planned memory in MB.

    MXNet 1.9 keeps some native memory per bind (NOTE [ why measurements run
    in a worker process ] in :mod:`.worker`); planners measure through the
    workers instead.

    Raises
    ------
    MeasurementError
        If MXNet refuses the bind.
    """
    with bound(symbol, ctx, shapes, type_dict, grad_req) as executor:
        text = executor.debug_str()
    return parse_planned_mb(text)


def environment(variables: Mapping[str, str]) -> ContextManager[None]:
    """Set environment variables for the duration of a block (MXNet reads some at bind time)."""
    return env.scoped(variables)
