"""Capture MXNet's executed forward+backward graph of a bind, for the allocator model.

MXNet prints the graph it plans (operators with their entries and shapes) when
``MXNET_MEM_PLAN_VERBOSE_LOGGING`` is set, to the process's standard error;
``debug_str()`` gives the same operators with names and control dependencies.
Together they are :class:`~mxnet_mirror_hook.core.allocator.ExecutedGraph`
(NOTE [ replaying MXNet's memory plan ] in core/allocator.py).
"""
from __future__ import annotations

import tempfile
from typing import Mapping, Optional

import mxnet as mx
import numpy as np

from .. import env
from ..core.allocator import ExecutedGraph
from .bind import GradReq, bind_symbol, environment
from .process import stderr_into
from .text import capture_match_range, executed_graph_from_text, parse_executed_graph

__all__ = ["capture_executed_graph", "parse_executed_graph"]

def capture_executed_graph(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                           type_dict: Optional[Mapping[str, np.dtype]] = None,
                           grad_req: GradReq = "write") -> ExecutedGraph:
    """Bind ``symbol`` in this process with MXNet's memory log on and return its executed graph.

    The log goes to file descriptor 2; it is redirected to a temporary file
    for the bind.  MXNet reads ``MXNET_MEM_PLAN_VERBOSE_LOGGING`` once per
    process, at its first bind: in a process that has bound anything without
    it, nothing is logged and this raises (the measuring workers start with it
    set; :func:`~mxnet_mirror_hook.mx.measure.executed_graph` uses them).

    Raises
    ------
    MeasurementError
        If MXNet refuses the bind or its log cannot be read.
    """
    match_range = capture_match_range()
    with tempfile.TemporaryFile(mode="w+b") as log_file:
        with stderr_into(log_file), environment({env.MEM_PLAN_VERBOSE: "1"}):
            executor = bind_symbol(symbol, ctx, shapes, type_dict, grad_req)  # logs its plan
        try:
            debug_text = executor.debug_str()
        finally:
            del executor
        log_file.seek(0)
        log_text = log_file.read().decode("utf-8", "replace")
    return executed_graph_from_text(debug_text, log_text, len(symbol.list_outputs()), match_range)
