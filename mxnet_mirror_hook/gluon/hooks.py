"""The autograd wrap: one registry object holds the hooks and every forward waiting for its backward."""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Set

import mxnet as mx
from mxnet import autograd, gluon

from ..errors import GluonMirrorError
from .records import Record, Slot

__all__ = ["HookRegistry", "REGISTRY", "run_backward"]

logger = logging.getLogger(__name__)

# NOTE [ How autograd drives the mirrored executor ]
# Facts measured on MXNet 1.9.1:
#  * running an executor's backward inside an autograd.Function / CustomOp callback is exact under
#    NaiveEngine but deadlocks under the default threaded engine;
#  * gradients an executor writes outside autograd's view are ordered with later engine operations only
#    if the operations that write them are pushed before the reader (trainer.step) is pushed;
#  * gluon.Trainer.step refuses gradients autograd did not write unless `_fresh_grad` is set;
#  * autograd.Function drops every input gradient when one input has none (the req == 0 early return
#    in its backward entry), and never honours grad_req 'add' for its inputs.
# So no executor work ever runs in a callback.  The forward runs the executor on the main thread, then
# records a `HeadGradCatcher` Function whose forward returns copies of the executor's outputs and
# whose backward (an engine callback) only copies the head gradients autograd hands it into arrays of
# the pending `Record` and sets a flag.  Its first input is a one-element per-record `dummy` with
# attach_grad(), so autograd always records it and always writes dummy.grad when the callback ran.
# `mx.autograd.backward` and `NDArray.backward` are wrapped (once, by the process's HookRegistry, while
# any block is mirrored): after the original call pushed autograd's backward, the wrapper waits on each
# pending record's dummy.grad (wait_to_read blocks until the catcher's backward op, which writes it, has
# completed; it returns at once for records this backward did not reach), then, on the main thread,
# runs `exe.backward(out_grads=captured)` for each record that was reached, marks the written gradients
# fresh and adds the input gradient to an attached input's .grad.  Every one of those operations is
# pushed before the wrapper returns, hence before the user's trainer.step pushes its reads: the engine
# orders them.  The main thread waits until the block's forward and the loss's backward have run (the
# catcher's backward depends on both), which the executor's backward had to wait for anyway; the
# network's backward itself is only pushed, never waited for.
# Related: NOTE [ Auxiliary states are written by a reader ] (BatchNorm statistics), `Slot` (a second
# forward before the first one's backward), `run_backward` (a second backward of one forward).


class HookRegistry:
    """The autograd wrap and every mirrored forward waiting for its backward (one per process).

    The hooks over ``autograd.backward``, ``NDArray.backward`` and
    ``autograd.grad`` are installed when the first block is mirrored and
    removed when no block is mirrored and no forward waits.  All state lives
    here, behind one lock, so the modules of this package keep none.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._sequence = itertools.count()
        self.pending: List[Record] = []  # records whose forward ran and whose backward may still come
        self.stale: Deque[Record] = deque(maxlen=32)  # overwritten records, watched so a late backward fails
        self.mirrored: "weakref.WeakSet[gluon.Block]" = weakref.WeakSet()
        self._originals: Dict[str, Any] = {}

    @property
    def installed(self) -> bool:
        """Whether autograd's entry points are wrapped now."""
        return bool(self._originals)

    # ------------------------------------------------------------ blocks and records
    def attach(self, block: "gluon.Block") -> None:
        """Count ``block`` as mirrored (installs the hooks with the first one)."""
        with self.lock:
            self.mirrored.add(block)
            self._install()

    def detach(self, block: "gluon.Block") -> None:
        """``block`` is no longer mirrored (removes the hooks after the last one)."""
        with self.lock:
            self.mirrored.discard(block)
            if not len(self.mirrored) and not self.pending:
                self._remove()

    def record(self, slot: Slot, leaves: List[Any]) -> Record:
        """A new pending record of a forward through ``slot``."""
        record = Record(slot, leaves, next(self._sequence))
        with self.lock:
            slot.record = record
            self.pending.append(record)
        return record

    def make_stale(self, record: Record) -> None:
        """``record``'s executor is reused or released: a backward reaching it must fail."""
        with self.lock:
            record.stale = True
            record.slot = None  # type: ignore[assignment]  # the executor may be freed; flags stay
            if record in self.pending:
                self.pending.remove(record)
            self.stale.append(record)

    def retire(self, slots: List[Slot]) -> None:
        """Make the waiting record of each of ``slots`` stale and free the slots."""
        with self.lock:
            for slot in slots:
                if slot.record is not None:
                    self.make_stale(slot.record)
                    slot.record = None

    # ------------------------------------------------------------ after autograd's backward
    def finish_backward(self, retain_graph: bool) -> None:
        """Run the executor backward of every pending record the last autograd backward reached."""
        with self.lock:
            records = list(self.pending) + list(self.stale)
        if not records:
            return
        try:
            for record in records:
                record.dummy.grad.wait_to_read()  # the catcher's backward has run (or was not reached)
        except mx.base.MXNetError as error:
            raise GluonMirrorError(f"an operation before the mirrored block's backward failed (in the "
                                   f"loss, or an earlier forward): {error}") from error
        late = [record for record in records if record.stale and record.reached]
        for record in late:
            record.reached = False
        reached = [record for record in records if record.reached and not record.stale]
        # Latest forward first, as autograd runs independent branches (BatchNorm statistics are
        # updated in this order).
        reached.sort(key=lambda record: -record.sequence)
        written: Set[int] = set()  # Parameter gradients (write) already written by this backward
        for record in reached:
            record.reached = False
            run_backward(record, written)
            if not retain_graph:
                self._forget(record)
        if late:
            raise GluonMirrorError(
                "a backward reached the outputs of a mirrored forward whose executor was reused by a "
                "later forward on the same context and shapes; its gradients are lost. Call backward "
                "before running the block more than `max_pending` times, or mirror(net, "
                "max_pending=...) higher")

    def _forget(self, record: Record) -> None:
        with self.lock:
            if record in self.pending:
                self.pending.remove(record)
            if record.slot.record is record:
                record.slot.record = None

    def check_grad_not_reached(self) -> None:
        """Refuse an ``autograd.grad`` that went through a mirrored forward."""
        with self.lock:
            records = list(self.pending)
        for record in records:
            record.dummy.grad.wait_to_read()
        reached = [record for record in records if record.reached]
        for record in reached:
            record.reached = False
        if reached:
            raise GluonMirrorError("autograd.grad through a mirrored block is not supported (the "
                                   "executor writes the Parameters' gradients); use backward(), or "
                                   "unmirror(net) for this computation")

    # ------------------------------------------------------------ the wrap
    def _install(self) -> None:
        """Wrap autograd's backward entry points once (idempotent)."""
        if self._originals:
            return
        originals = {"backward": autograd.backward, "nd_backward": mx.nd.NDArray.backward,
                     "grad": autograd.grad}
        self._originals.update(originals)
        autograd.backward = self._wrap_backward(originals["backward"])
        mx.nd.NDArray.backward = self._wrap_nd_backward(originals["nd_backward"])
        autograd.grad = self._wrap_grad(originals["grad"])

    def _remove(self) -> None:
        if not self._originals:
            return
        autograd.backward = self._originals["backward"]
        mx.nd.NDArray.backward = self._originals["nd_backward"]
        autograd.grad = self._originals["grad"]
        self._originals.clear()

    def _wrap_backward(self, original: Any) -> Any:
        @functools.wraps(original)
        def backward(heads, head_grads=None, retain_graph=False, train_mode=True):
            original(heads, head_grads=head_grads, retain_graph=retain_graph, train_mode=train_mode)
            self.finish_backward(retain_graph)
        return backward

    def _wrap_nd_backward(self, original: Any) -> Any:
        @functools.wraps(original)
        def nd_backward(array, out_grad=None, retain_graph=False, train_mode=True):
            original(array, out_grad=out_grad, retain_graph=retain_graph, train_mode=train_mode)
            self.finish_backward(retain_graph)
        return nd_backward

    def _wrap_grad(self, original: Any) -> Any:
        @functools.wraps(original)
        def grad(heads, variables, head_grads=None, retain_graph=None, create_graph=False,
                 train_mode=True):
            result = original(heads, variables, head_grads=head_grads, retain_graph=retain_graph,
                              create_graph=create_graph, train_mode=train_mode)
            if self.pending:
                # autograd.grad writes only the requested variables' gradients (not the dummies):
                # once they are computed, every catcher on their paths has run.
                for array in (result if isinstance(result, (list, tuple)) else [result]):
                    array.wait_to_read()
                self.check_grad_not_reached()
            return result
        return grad


#: The process's one registry (the hooks are process-wide, as autograd is).
REGISTRY = HookRegistry()


def run_backward(record: Record, written: Set[int]) -> None:
    """The executor backward of one reached record, from the main thread (see NOTE above)."""
    slot = record.slot
    executor = slot.executor
    # A primary executor overwrites the gradients it writes: keep what this backward wrote before.
    kept = [(grad, grad.copy()) for grad in slot.written if id(grad) in written]
    try:
        if record.backwards:
            # A second backward of one forward (retain_graph): the executor's memory plan reuses
            # forward storage during backward, so the forward runs again first (same inputs, same
            # Parameters; Dropout would draw new masks).
            executor.forward(is_train=True)
        executor.backward(out_grads=record.head_grads)
        if not slot.checked:  # once per executor: a failing backward fails here, not later
            for grad in executor.grad_arrays:
                if grad is not None:
                    grad.wait_to_read()
            slot.checked = True
    except mx.base.MXNetError as error:
        raise GluonMirrorError(f"MXNet's backward failed in the mirrored executor ({error}); check "
                               f"whether the same step fails without mirroring (unmirror(net)): if it "
                               f"trains plainly, please report the network") from error
    record.backwards += 1
    if not slot.private:
        written.update(id(grad) for grad in slot.written)
    for grad, before in kept:
        grad[:] = before + grad
    _gather(record, written)


def _gather(record: Record, written: Set[int]) -> None:
    """After an executor backward: private gradients into the Parameters', flags, statistics, inputs."""
    slot = record.slot
    for target, private, request in slot.private:
        if request == "add" or id(target) in written:
            target[:] = target + private
        else:
            private.copyto(target)
            written.add(id(target))
    for array in slot.fresh:
        array._fresh_grad = True  # written by the executor, not by autograd (see NOTE above)
    for array in slot.aux:
        # NOTE [ Auxiliary states are written by a reader ]: the executor's _backward_BatchNorm
        # updates the moving statistics (CPU) but the engine knows the aux arrays only as inputs
        # it reads, so a later reader (save_parameters, asnumpy, the next backward) is not
        # ordered after it.  An in-place identity is a write: the engine runs it after every
        # read pushed before it, so everything pushed later sees the updated statistics.
        mx.nd.identity(array, out=array)
    for name, leaf in record.leaves:
        # autograd wrote (or added) the other paths' gradient and zero for this block first.
        leaf.grad[:] = leaf.grad + slot.executor.grad_dict[name]
