"""``simple_bind`` through MXNet's C API, for worker processes that do not import ``mxnet``.

# NOTE [ binding without the mxnet package ]
# A measuring worker binds symbols and reads ``debug_str()``; nothing else.  Importing
# the ``mxnet`` Python package costs ~1.3 s here (its ``contrib``, ``numpy`` and
# operator modules), loading ``libmxnet.so`` 0.1 s, and a first plan waits for a
# worker to start.  So a worker loads the library the user's process loaded (its
# path comes in the request) with ctypes and makes the calls Python's
# ``Symbol.simple_bind`` makes (python/mxnet/symbol/symbol.py in MXNet 1.9.1:
# ``MXSymbolCreateFromJSON``, ``MXExecutorSimpleBindEx`` with no group2ctx, storage
# types, shared arguments or buffers, then ``MXExecutorPrint``), with the same
# argument order and encodings, so MXNet plans the same graph.  Anything this
# path does not handle (a bind MXNet refuses, a dtype without an id, a build with
# 64-bit tensor sizes) raises :class:`CApiUnsupported` and the worker redoes the
# request through :mod:`.bind` with the package imported, so errors read as before
# (tests/mx/test_worker_pool.py checks both paths give the same figures).
"""
from __future__ import annotations

import ctypes
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["CApiBinder", "CApiUnsupported"]

_handle = ctypes.c_void_p
_uint = ctypes.c_uint


class CApiUnsupported(Exception):
    """This request needs the ``mxnet`` package (the worker falls back to it)."""


def _strings(values: List[str]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * len(values))(*[v.encode("utf-8") for v in values])


class _LibFeature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("enabled", ctypes.c_bool)]


class CApiBinder:
    """Binds symbols with ``libmxnet`` loaded by ctypes (NOTE [ binding without the mxnet package ]).

    Parameters
    ----------
    library : str
        Path of the ``libmxnet.so`` the user's process loaded.
    """

    def __init__(self, library: str) -> None:
        if not os.path.isfile(library):
            raise CApiUnsupported(f"no MXNet library at {library}")
        self.lib = ctypes.CDLL(library, ctypes.RTLD_LOCAL)
        self.lib.MXGetLastError.restype = ctypes.c_char_p
        for name in ("MXNDArrayFree", "MXExecutorFree", "MXSymbolFree"):
            getattr(self.lib, name).argtypes = [_handle]
        if self._feature_enabled("INT64_TENSOR_SIZE"):
            raise CApiUnsupported("this MXNet build uses 64-bit tensor sizes")
        # Registers the legacy OperatorProperty operators (SliceChannel, SoftmaxOutput...) as
        # nnvm operators, as the package's import does through it: without it a symbol using
        # them crashes the bind (free(): invalid pointer, bad_alloc).
        count = _uint()
        names = ctypes.POINTER(ctypes.c_char_p)()
        self._check(self.lib.MXListAllOpNames(ctypes.byref(count), ctypes.byref(names)))

    def _feature_enabled(self, name: str) -> bool:
        features = ctypes.POINTER(_LibFeature)()
        size = ctypes.c_size_t()
        self._check(self.lib.MXLibInfoFeatures(ctypes.byref(features), ctypes.byref(size)))
        return any(features[i].name.decode() == name and features[i].enabled for i in range(size.value))

    def _check(self, status: int) -> None:
        if status != 0:
            raise CApiUnsupported(self.lib.MXGetLastError().decode("utf-8", "replace"))

    def debug_str(self, symbol_json: str, device: Tuple[int, int], shapes: Mapping[str, tuple],
                  type_ids: Optional[Mapping[str, int]], grad_req: Union[str, Dict[str, str]],
                  ) -> Tuple[str, int]:
        """Bind and return ``(debug_str() text, number of symbol outputs)``; the executor and
        its arrays are freed before returning.

        Parameters
        ----------
        symbol_json : str
            The symbol.
        device : (int, int)
            MXNet's device type id (1 CPU, 2 GPU) and device id.
        shapes : mapping
            Input shapes, in the order ``simple_bind``'s keyword arguments would have.
        type_ids : mapping of str to int, optional
            MXNet dtype ids of inputs (None or empty: MXNet's float32 default).
        grad_req : str or dict
            As for ``simple_bind``.

        Raises
        ------
        CApiUnsupported
            Whatever MXNet refused; the caller redoes the request with the package.
        """
        lib = self.lib
        symbol = _handle()
        self._check(lib.MXSymbolCreateFromJSON(symbol_json.encode("utf-8"), ctypes.byref(symbol)))
        try:
            count = _uint()
            names = ctypes.POINTER(ctypes.c_char_p)()
            self._check(lib.MXSymbolListOutputs(symbol, ctypes.byref(count), ctypes.byref(names)))
            num_outputs = count.value
            executor, arrays = self._bind(symbol, device, shapes, type_ids, grad_req)
        finally:
            lib.MXSymbolFree(symbol)
        try:
            text = ctypes.c_char_p()
            self._check(lib.MXExecutorPrint(executor, ctypes.byref(text)))
            if text.value is None:
                raise CApiUnsupported("MXExecutorPrint returned no text")
            debug = text.value.decode("utf-8", "replace")
        finally:
            for array in arrays:
                lib.MXNDArrayFree(_handle(array))
            lib.MXExecutorFree(executor)
        return debug, num_outputs

    def _bind(self, symbol: ctypes.c_void_p, device: Tuple[int, int], shapes: Mapping[str, tuple],
              type_ids: Optional[Mapping[str, int]], grad_req: Union[str, Dict[str, str]],
              ) -> Tuple[ctypes.c_void_p, List[int]]:
        # A C array where there are values, a null pointer of the same element type where there are none.
        request_names: ctypes._Pointer[ctypes.c_char_p] | ctypes.Array[ctypes.c_char_p]
        type_names: ctypes._Pointer[ctypes.c_char_p] | ctypes.Array[ctypes.c_char_p]
        type_data: ctypes._Pointer[ctypes.c_uint] | ctypes.Array[ctypes.c_int]
        if isinstance(grad_req, str):
            request_count, request_names, request_types = 0, ctypes.POINTER(ctypes.c_char_p)(), \
                _strings([grad_req])
        elif isinstance(grad_req, dict) and grad_req:
            request_count = len(grad_req)
            request_names, request_types = _strings(list(grad_req)), _strings(list(grad_req.values()))
        else:
            raise CApiUnsupported("grad_req must be a string or a non-empty dict")
        shape_names = [name for name, shape in shapes.items()]
        shape_data: List[int] = []
        shape_index = [0]
        for name in shape_names:
            shape_data.extend(int(d) for d in shapes[name])
            shape_index.append(len(shape_data))
        if type_ids:
            type_count = len(type_ids)
            type_names = _strings(list(type_ids))
            type_data = (ctypes.c_int * type_count)(*[int(v) for v in type_ids.values()])
        else:
            type_count, type_names, type_data = 0, ctypes.POINTER(ctypes.c_char_p)(), \
                ctypes.POINTER(_uint)()
        shared_buffer_len = ctypes.c_int(-1)
        updated_names = ctypes.POINTER(ctypes.c_char_p)()
        updated_handles = ctypes.POINTER(_handle)()
        num_in_args, num_aux = _uint(), _uint()
        in_args = ctypes.POINTER(_handle)()
        arg_grads = ctypes.POINTER(_handle)()
        aux_states = ctypes.POINTER(_handle)()
        executor = _handle()
        status = self.lib.MXExecutorSimpleBindEx(
            symbol, ctypes.c_int(device[0]), ctypes.c_int(device[1]),
            _uint(0), ctypes.POINTER(ctypes.c_char_p)(), ctypes.POINTER(ctypes.c_int)(),
            ctypes.POINTER(ctypes.c_int)(),
            _uint(request_count), request_names, request_types,
            _uint(len(shape_names)), _strings(shape_names),
            (ctypes.c_int * len(shape_data))(*shape_data),
            (_uint * len(shape_index))(*shape_index),
            _uint(type_count), type_names, type_data,
            _uint(0), ctypes.POINTER(ctypes.c_char_p)(), ctypes.POINTER(_uint)(),
            _uint(0), _strings([]),
            ctypes.byref(shared_buffer_len), ctypes.POINTER(ctypes.c_char_p)(),
            ctypes.POINTER(_handle)(), ctypes.byref(updated_names), ctypes.byref(updated_handles),
            ctypes.byref(num_in_args), ctypes.byref(in_args), ctypes.byref(arg_grads),
            ctypes.byref(num_aux), ctypes.byref(aux_states), _handle(), ctypes.byref(executor))
        self._check(status)
        arrays = [in_args[i] for i in range(num_in_args.value)]
        arrays += [arg_grads[i] for i in range(num_in_args.value) if arg_grads[i]]
        arrays += [aux_states[i] for i in range(num_aux.value)]
        return executor, arrays
