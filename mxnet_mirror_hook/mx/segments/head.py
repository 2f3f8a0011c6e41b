"""The loss head run in row chunks instead of one executor (NOTE [ chunked loss head ] in
:mod:`mxnet_mirror_hook.core.segments.head`)."""
from __future__ import annotations

from typing import Mapping, Optional, Tuple, TypeVar

import mxnet as mx
import numpy as np

from ...core.segments.head import LossHead, head_chunk_rows, head_tile
from ...core.segments.layout import HeadArrays
from ...errors import ShapeError
from .ops import invoke, operator_attrs

__all__ = ["ChunkedHead"]

_Array = TypeVar("_Array")


def _allocated(array: Optional[_Array]) -> _Array:
    """``array``, read only by the requests it was allocated for (a gradient or work array is
    None exactly when its request is ``'null'`` or :class:`HeadArrays` gives it no size)."""
    if array is None:
        raise AssertionError("the loss head read an array it did not allocate")
    return array


class ChunkedHead:
    """The loss head (FullyConnected + SoftmaxOutput) run in row chunks forward and in tiles of
    rows x classes backward (NOTE [ chunked loss head ] in :mod:`mxnet_mirror_hook.core.segments`).

    Parameters
    ----------
    head : LossHead
        What the head computes.
    chunks : int
        Row chunks of forward (rows per chunk:
        :func:`~mxnet_mirror_hook.core.segments.head_chunk_rows` of the bound row count), and
        column blocks of backward (:func:`~mxnet_mirror_hook.core.segments.head_tile`).
    data, data_grad : NDArray
        The classifier's input (N, H) and its gradient (a boundary of the chain).
    data_req : str
        ``'write'`` or ``'add'`` for ``data_grad``.
    weight, bias, label : NDArray
        Arguments of the chain (``bias`` None with ``no_bias``); the label is read as (N,).
    weight_grad, bias_grad : NDArray or None
        Gradient arrays (None: not requested).
    grad_reqs : dict
        Requests of the weight and bias (``'write'``: the first tile of a block writes; ``'add'``).
    """

    def __init__(self, head: LossHead, chunks: int, data: "mx.nd.NDArray", data_grad: "mx.nd.NDArray",
                 data_req: str, weight: "mx.nd.NDArray", bias: Optional["mx.nd.NDArray"],
                 label: "mx.nd.NDArray", weight_grad: Optional["mx.nd.NDArray"],
                 bias_grad: Optional["mx.nd.NDArray"], grad_reqs: Mapping[str, str]) -> None:
        self.head = head
        rows, hidden = data.shape
        classes = weight.shape[0]
        if label.size != rows:
            raise ShapeError(f"the loss head's label has {label.size} elements for {rows} rows")
        ctx, dtype = data.context, data.dtype
        self.rows, self.classes = rows, classes
        step = head_chunk_rows(rows, chunks)
        self.ranges = [(start, min(rows, start + step)) for start in range(0, rows, step)]
        self.data, self.data_grad, self.data_req = data, data_grad, data_req
        self.weight, self.bias = weight, bias
        self.label = label.reshape((rows,))
        self.weight_grad, self.bias_grad = weight_grad, bias_grad
        self._w_req = grad_reqs.get("weight", "null") if weight_grad is not None else "null"
        self._b_req = grad_reqs.get("bias", "null") if bias_grad is not None else "null"
        # Backward runs by tiles of rows x classes (NOTE [ chunked loss head ]).
        tile_rows, block = head_tile(rows, classes, chunks)
        self.blocks = [(start, min(classes, start + block)) for start in range(0, classes, block)]
        self.row_parts = [(start, min(rows, start + tile_rows)) for start in range(0, rows, tile_rows)]
        # Everything the head holds is allocated here, as HeadArrays lists it (the static figure
        # counts the same object: NOTE [ the chain's own arrays ]).
        self.arrays = HeadArrays(rows, hidden, classes, chunks, data_req, self._w_req, self._b_req,
                                 np.dtype(dtype).itemsize, np.dtype(dtype).name)
        sizes = self.arrays.floats()
        self.output = mx.nd.zeros((rows, classes), ctx=ctx, dtype=dtype)
        self._work = mx.nd.zeros((sizes["work"],), ctx=ctx, dtype=dtype)
        self._one_hot = mx.nd.zeros((sizes["one_hot"],), ctx=ctx, dtype=dtype)
        self._data_work = (mx.nd.zeros((tile_rows, hidden), ctx=ctx, dtype=dtype)
                           if sizes["data_work"] else None)
        self._weight_work = (mx.nd.zeros((block, hidden), ctx=ctx, dtype=dtype)
                             if sizes["weight_work"] else None)
        self._bias_work = mx.nd.zeros((block,), ctx=ctx, dtype=dtype) if sizes["bias_work"] else None
        self._fc_attrs = operator_attrs(head.fc_attrs)
        self._sm_attrs = operator_attrs(head.softmax_attrs)

    def allocated_bytes(self) -> int:
        """Bytes of the arrays the head allocated."""
        arrays = [self.output, self._work, self._one_hot, self._data_work, self._weight_work,
                  self._bias_work]
        return sum(a.size * np.dtype(a.dtype).itemsize for a in arrays if a is not None)

    def forward(self, is_train: bool) -> None:
        """Classifier and softmax, chunk by chunk, into the rows of :attr:`output`."""
        fc_inputs = [self.weight] + ([self.bias] if self.bias is not None else [])
        mode = mx.autograd.train_mode() if is_train else mx.autograd.predict_mode()
        with mode:  # SoftmaxOutput's kernel depends on is_train (MKLDNN only in inference)
            for start, stop in self.ranges:
                work = self._work[:(stop - start) * self.classes].reshape((stop - start, self.classes))
                invoke("FullyConnected", [self.data[start:stop]] + fc_inputs, [work], self._fc_attrs)
                invoke("SoftmaxOutput", [work, self.label[start:stop]], [self.output[start:stop]],
                        self._sm_attrs)

    def _scale_and_keep(self) -> Tuple[float, Optional["mx.nd.NDArray"]]:
        """SoftmaxOutput's gradient scale for the whole batch, computed as MXNet does (float32
        ``grad_scale / count``), and the (rows, 1) mask of rows whose label is not ignored
        (None without ``use_ignore``)."""
        attrs = self._sm_attrs
        normalization = attrs.get("normalization", "null")
        scale = np.float32(float(attrs.get("grad_scale", 1.0)))
        use_ignore = str(attrs.get("use_ignore", "False")).lower() in ("true", "1")
        ignore = float(np.float32(float(attrs.get("ignore_label", -1.0))))
        keep = None
        if use_ignore:
            keep = (self.label != ignore).reshape((self.rows, 1))
        if normalization == "batch":
            count = self.rows
        elif normalization == "valid":
            labels = self.label.asnumpy().astype(np.float32).astype(np.int64)
            count = max(1, self.rows - int(np.count_nonzero(labels == int(ignore))))
        else:
            count = 1
        return float(np.float32(scale / np.float32(count))), keep

    def backward(self) -> None:
        """The loss gradient and the classifier's gradients, by tiles of rows x classes.

        For rows ``r0:r1`` and classes ``c0:c1`` the tile of SoftmaxOutput's gradient is
        ``(output - one_hot(label)) * scale`` (rows of ignored labels zeroed): the same float32
        operations as MXNet's kernel (bit-identical, tested), from the kept output.
        FullyConnected's own backward kernel on that tile (MKLDNN's here: about four times
        faster than ``dot`` on this CPU build) with the block's weight rows gives the tile's
        partial gradients of the input rows and of the block's weight and bias rows: the first
        tile to reach a gradient region writes it in place, the others add through a buffer."""
        scale, keep = self._scale_and_keep()
        for block_index, (start, stop) in enumerate(self.blocks):
            size = stop - start
            attrs = dict(self._fc_attrs, num_hidden=str(size))
            weight = self.weight[start:stop]
            for part_index, (low, high) in enumerate(self.row_parts):
                count = high - low
                grad = self._work[:count * size].reshape((count, size))
                one_hot = self._one_hot[:count * size].reshape((count, size))
                invoke("slice", [self.output], [grad],
                        {"begin": f"({low}, {start})", "end": f"({high}, {stop})"})
                invoke("one_hot", [self.label[low:high] - start], [one_hot],
                       {"depth": str(size), "dtype": self.arrays.dtype})
                invoke("elemwise_sub", [grad, one_hot], [grad], {})
                invoke("_mul_scalar", [grad], [grad], {"scalar": repr(scale)})
                if keep is not None:
                    invoke("broadcast_mul", [grad, keep[low:high]], [grad], {})
                write_data = block_index == 0 and self.data_req == "write"
                write_weight = part_index == 0 and self._w_req == "write"
                write_bias = part_index == 0 and self._b_req == "write"
                data_out = self.data_grad[low:high] if write_data else _allocated(self._data_work)[:count]
                outputs = [data_out, _allocated(self.weight_grad)[start:stop] if write_weight
                           else _allocated(self._weight_work)[:size]]
                if self.bias is not None:
                    outputs.append(_allocated(self.bias_grad)[start:stop] if write_bias
                                   else _allocated(self._bias_work)[:size])
                invoke("_backward_FullyConnected", [grad, self.data[low:high], weight], outputs, attrs)
                if not write_data:
                    target = self.data_grad[low:high]
                    target += _allocated(self._data_work)[:count]
                if self._w_req != "null" and not write_weight:
                    target = _allocated(self.weight_grad)[start:stop]
                    target += _allocated(self._weight_work)[:size]
                if self.bias is not None and self._b_req != "null" and not write_bias:
                    target = _allocated(self.bias_grad)[start:stop]
                    target += _allocated(self._bias_work)[:size]

