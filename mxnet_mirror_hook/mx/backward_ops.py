"""MXNet's registered backward operators, called imperatively into given arrays.

# NOTE [ calling MXNet's backward operators ]
# A fused operator that recomputes part of the forward in its backward (mx/attention.py) must
# compute the gradients MXNet's gradient pass computes, bit for bit, and nothing more.  Under
# autograd it would have to run each recomputed operator's forward again, the products included
# (the product with the values of a core attention is a third of what its recomputation costs).
# MXNet registers every backward operator (``_backward_softmax``,
# ``_backward_interleaved_matmul_selfatt_qk``, ``_backward_FullyConnected``, ...) with the
# engine, so it can be called like a forward operator, with two differences: it has no shape
# inference (its outputs must be given, shaped as the forward's inputs) and its inputs are
# those its forward's ``FGradient`` passes (the gradients of the outputs first, then the
# forward inputs or outputs it reads, in the order of MXNet 1.9.1's source).  The Python
# wrappers MXNet generates for these operators take no inputs, so :func:`invoke` goes through
# ``MXImperativeInvokeEx`` as those wrappers do.  Same kernels on the same numbers: the
# results are those of the gradient pass (tests compare with plain ``Module`` bit for bit).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, List, Sequence

import mxnet as mx
from mxnet._ctypes.ndarray import _imperative_invoke
from mxnet.base import _LIB, OpHandle, c_str, check_call

__all__ = ["invoke"]


@functools.lru_cache(maxsize=None)
def _handle(name: str) -> int:
    handle = OpHandle()
    check_call(_LIB.NNGetOpHandle(c_str(name), ctypes.byref(handle)))
    if not handle.value:
        raise ValueError(f"MXNet has no operator {name!r}")
    return int(handle.value)


def invoke(name: str, inputs: Sequence["mx.nd.NDArray"], outputs: Sequence["mx.nd.NDArray"],
           **attrs: Any) -> List["mx.nd.NDArray"]:
    """Run MXNet operator ``name`` (a backward operator too) on ``inputs`` into ``outputs``.

    See NOTE [ calling MXNet's backward operators ].

    Parameters
    ----------
    name : str
        The registered operator's name, e.g. ``'_backward_softmax'``.
    inputs : sequence of NDArray
        Its inputs, in the order its forward's gradient function gives them.
    outputs : sequence of NDArray
        Arrays of the right shapes and types the results are written into (a backward operator
        has no shape inference).
    **attrs
        The operator's parameters (its forward's), given as strings the way MXNet parses them.

    Returns
    -------
    list of NDArray
        ``outputs``.
    """
    keys = list(attrs)
    values = [str(attrs[key]) for key in keys]
    _imperative_invoke(_handle(name), list(inputs), keys, values, list(outputs), 0, 1)
    return list(outputs)
