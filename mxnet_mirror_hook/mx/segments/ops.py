"""Operators run imperatively into given outputs (also ``_backward_*`` ones)."""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Sequence

import mxnet as mx

__all__ = ["invoke", "operator_attrs"]


@functools.lru_cache(maxsize=None)
def _op_handle(name: str) -> Any:
    import ctypes

    from mxnet.base import _LIB, OpHandle, c_str, check_call

    handle = OpHandle()
    check_call(_LIB.NNGetOpHandle(c_str(name), ctypes.byref(handle)))
    return handle


def invoke(op: str, inputs: Sequence["mx.nd.NDArray"], out: Sequence["mx.nd.NDArray"],
            attrs: Mapping[str, str]) -> None:
    """Run an operator (also a ``_backward_*`` one, which has no Python wrapper taking inputs)
    imperatively into the given outputs."""
    keys = list(attrs)
    mx.ndarray._internal._imperative_invoke(_op_handle(op).value, list(inputs), keys,
                                            [str(attrs[k]) for k in keys], list(out), False, True)


def operator_attrs(attrs: Mapping[str, str]) -> Dict[str, str]:
    return {k: v for k, v in attrs.items() if not k.startswith("__")}

