"""Measured CPU time of one training iteration (forward and backward) of a bound symbol."""
from __future__ import annotations

import gc
import logging
import statistics
import time
from typing import List, Mapping, Optional, Sequence

import mxnet as mx
import numpy as np

from .bind import GradReq, bind_symbol, environment

__all__ = ["iteration_seconds", "bind_filled", "CLOCKS"]

#: Clocks a measurement can read: ``'wall'`` (elapsed time) or ``'cpu'`` (this process's CPU
#: time, all threads; on a machine shared with other work, with one OpenMP thread, the figure
#: other processes disturb least).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

logger = logging.getLogger(__name__)


def bind_filled(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                grad_req: GradReq = "write", seed: int = 0) -> "mx.executor.Executor":
    """An executor of ``symbol`` with inputs in [0, 1) and small random weights, ready to step."""
    executor = bind_symbol(symbol, ctx, shapes, grad_req=grad_req)
    generator = np.random.RandomState(seed)
    for name, array in executor.arg_dict.items():
        if name in shapes:
            # Labels and data: values in [0, 1) work as class indices rounded down too.
            array[:] = generator.uniform(0, 1, array.shape)
        else:
            array[:] = generator.normal(0, 0.01, array.shape)
    return executor


def _step(executor: "mx.executor.Executor", clock: str = "wall") -> float:
    now = CLOCKS[clock]
    started = now()
    executor.forward(is_train=True)
    executor.backward()
    mx.nd.waitall()
    return now() - started


def iteration_seconds(symbols: Sequence["mx.sym.Symbol"], shapes: Mapping[str, tuple],
                      ctx: Optional["mx.Context"] = None, grad_req: GradReq = "write",
                      repeats: int = 5, warmup: int = 2,
                      bind_env: Optional[Sequence[Mapping[str, str]]] = None,
                      clock: str = "wall") -> List[float]:
    """Median seconds per training iteration of each symbol, measured side by side.

    The executors are bound together and stepped in turn, round after round,
    so that a noisy shared machine slows them alike; compare the ratios, not
    the seconds.

    Parameters
    ----------
    symbols : sequence of mx.sym.Symbol
        Symbols with the same inputs (a plain one and its mirrored variants).
    shapes : mapping of str to tuple
        Input shapes, labels included.
    ctx : mx.Context, optional
        Where to run (CPU by default).
    grad_req : str or dict
        As for ``simple_bind``.
    repeats : int
        Timed rounds.
    warmup : int
        Untimed rounds first.
    bind_env : sequence of mapping, optional
        Environment variables to set while binding each symbol (for example
        ``MXNET_BACKWARD_DO_MIRROR=1``).
    clock : str
        ``'wall'`` or ``'cpu'`` (:data:`CLOCKS`).

    Returns
    -------
    list of float
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    ctx = ctx or mx.cpu()
    executors = []
    for index, symbol in enumerate(symbols):
        with environment(bind_env[index] if bind_env else {}):
            executors.append(bind_filled(symbol, ctx, shapes, grad_req, seed=0))
    times: List[List[float]] = [[] for _ in executors]
    try:
        for round_index in range(warmup + repeats):
            for index, executor in enumerate(executors):
                seconds = _step(executor, clock)
                if round_index >= warmup:
                    times[index].append(seconds)
    finally:
        del executors
        gc.collect()
    return [statistics.median(samples) for samples in times]
