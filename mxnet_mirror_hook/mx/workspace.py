"""Temporaries of the fused operators, kept between calls.

# NOTE [ a workspace kept between calls ]
# A fused operator (mx/attention.py) computes its recomputed tensors imperatively.  A fresh
# NDArray of tens of MB is new memory from the system on every call, and touching it first
# costs page faults: measured on this CPU, the query-key product and softmax of one BERT-base
# layer (seq 512, batch 2: 25 MB each) took 30 ms into fresh arrays and 14.5 ms into kept ones;
# MXNet's executors do not pay this (their static plan is allocated once).  So the operators
# write into buffers kept here: one flat buffer per (context, dtype, slot), grown to the
# largest request, of which each request takes the first elements, reshaped (a view: same
# memory, same engine variable).  All instances share the buffers; the engine orders every
# read and write of one buffer in the order they were pushed, so an operator never reads
# another's numbers as long as one call's pushes are not interleaved with another's.  MXNet
# runs Custom callbacks on several threads (two independent fused operators may run at once),
# so a callback that uses the buffers pushes its whole sequence inside :func:`pushing` (pushing
# does not wait for the engine, so the lock is held for microseconds, and nothing inside may
# wait for engine work: no ``asnumpy``/``wait_to_read`` on a pending array).  The buffers are
# memory outside MXNet's static plan: core.attention.core_attention_workspace counts them.
"""
from __future__ import annotations

import threading
from typing import Dict, Tuple

import mxnet as mx
import numpy as np

__all__ = ["buffer", "release", "pushing"]

_lock = threading.Lock()
_push_lock = threading.RLock()
_buffers: Dict[Tuple[str, str, str], "mx.nd.NDArray"] = {}


def pushing() -> "threading.RLock":
    """The lock a callback holds while it pushes operations on kept buffers (NOTE [ a workspace
    kept between calls ]): ``with pushing(): ...``."""
    return _push_lock


def buffer(slot: str, shape: Tuple[int, ...], ctx: "mx.Context", dtype: str = "float32") -> "mx.nd.NDArray":
    """A kept array of ``shape`` for ``slot`` (NOTE [ a workspace kept between calls ]); its
    contents are whatever the last user left."""
    size = int(np.prod(shape))
    key = (str(ctx), str(np.dtype(dtype)), slot)
    with _lock:
        flat = _buffers.get(key)
        if flat is None or flat.size < size:
            flat = mx.nd.empty((size,), ctx=ctx, dtype=dtype)
            _buffers[key] = flat
    return flat[:size].reshape(shape)


def release() -> None:
    """Drop every kept buffer (the memory returns once the engine has finished with them)."""
    with _lock:
        _buffers.clear()
