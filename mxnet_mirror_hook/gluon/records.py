"""A bound executor (a slot) and one recorded forward through it, waiting for autograd's backward."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import mxnet as mx
from mxnet import autograd

__all__ = ["HeadGradCatcher", "Slot", "Record"]


class HeadGradCatcher(autograd.Function):
    """Returns copies of the executor's outputs; its backward captures the head gradients.

    See NOTE [ How autograd drives the mirrored executor ] in ``hooks.py``.
    """

    def __init__(self, record: "Record") -> None:
        super().__init__()
        self._record = record

    def forward(self, dummy: "mx.nd.NDArray", *inputs: "mx.nd.NDArray") -> Any:
        outputs = [out.copy() for out in self._record.slot.executor.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def backward(self, *head_grads: "mx.nd.NDArray") -> Tuple["mx.nd.NDArray", ...]:
        record = self._record
        # Engine callback thread: copies only (pushed before this op completes), never executor work.
        for grad, target in zip(head_grads, record.head_grads):
            grad.copyto(target)
        record.reached = True
        return tuple(record.zero_grads)


class Slot:
    """One bound executor and the record of its last forward.

    The first executor of a context and signature is bound with the
    Parameters' own gradient arrays (and their grad_req).  Further ones, bound
    when another forward comes before the first one's backward, write into
    private arrays that :func:`~.hooks.run_backward` then writes or adds into
    the Parameters' gradients, as autograd sums several uses of one Parameter.
    """

    def __init__(self, executor: Any, fresh: List["mx.nd.NDArray"],
                 aux: List["mx.nd.NDArray"],
                 private: List[Tuple["mx.nd.NDArray", "mx.nd.NDArray", str]],
                 written: List["mx.nd.NDArray"]) -> None:
        self.executor = executor  # an mx Executor, or a SegmentChain (the same interface)
        self.fresh = fresh  # the Parameter data arrays whose gradients the executor writes
        self.aux = aux  # the Parameter arrays bound as auxiliary states (BatchNorm statistics)
        self.private = private  # (Parameter gradient, private gradient, grad_req); empty: primary
        self.written = written  # the Parameter gradients a primary executor writes (grad_req write)
        self.record: Optional["Record"] = None
        self.checked = False  # whether one forward and backward ran through it without error


class Record:
    """A recorded forward through a slot, waiting for autograd to reach it.

    Parameters
    ----------
    slot : Slot
        The executor the forward ran on.
    leaves : list of (str, NDArray)
        (argument name, attached input) pairs that need the input gradient.
    sequence : int
        The forward's position among all mirrored forwards of the process (later is larger).
    """

    def __init__(self, slot: Slot, leaves: List[Tuple[str, "mx.nd.NDArray"]], sequence: int) -> None:
        self.slot = slot
        self.leaves = leaves
        context = slot.executor.outputs[0].context
        self.dummy = mx.nd.zeros((1,), ctx=context)
        self.dummy.attach_grad()
        self.head_grads = [mx.nd.empty(o.shape, ctx=o.context, dtype=o.dtype)
                           for o in slot.executor.outputs]
        self.zero_grads = [mx.nd.zeros((1,), ctx=context)] + \
            [mx.nd.zeros(x.shape, ctx=x.context, dtype=x.dtype) for _, x in leaves]
        self.reached = False
        self.stale = False
        self.backwards = 0
        self.sequence = sequence
