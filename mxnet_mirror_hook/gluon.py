"""Gluon support: ``net = mirror(net)`` mirrors a HybridBlock inside the user's own autograd loop.

Hybridized Gluon (CachedOp) and autograd never mirror: MXNet passes no mirror
function to their gradient pass.  :func:`mirror` therefore makes a block run,
while autograd records for training, a *mirrored executor*: the block is
traced to a symbol, planned like any symbol (through the plan cache, per input
shapes, dtypes and context), and bound with the block's own Parameter arrays as
its arguments, gradients and auxiliary states.  Autograd computes the head
gradient of the block's outputs (whatever the loss), and the executor's
backward turns it into the Parameters' gradients, so the user's loop,
``gluon.Trainer`` (or Horovod's ``DistributedTrainer``) and metrics stay as
they are::

    net = mirror(net)
    with autograd.record():
        outputs = [net(X) for X in gluon.utils.split_and_load(data, ctx)]
        losses = [loss_fn(yhat, y) for yhat, y in zip(outputs, labels)]
    autograd.backward(losses)
    trainer.step(batch_size)

Outside ``autograd.record()`` or under ``autograd.predict_mode()`` the block
runs as before (CachedOp when hybridized), with no planning and no overhead.
With ``backend='segments'`` (or ``'auto'`` choosing them) the executor is a
chain of executor segments instead (NOTE [ executor segments behind a mirrored
block ]).  ``MirroredTrainer`` is a small training loop built on the same path.
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon.block import _regroup

from .core.budget import BudgetLike
from .errors import GluonMirrorError, MirrorHookError, ShapeError
from .options import MirrorOptions
from .plan import MirrorPlan, plan_mirror

__all__ = ["mirror", "unmirror", "is_mirrored", "mirror_state", "plan_block", "MirrorState",
           "MirroredTrainer"]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_mirror_hook_state"

# NOTE [ How autograd drives the mirrored executor ]
# Facts measured on MXNet 1.9.1 (../shared/research/segment-executors.md):
#  * running an executor's backward inside an autograd.Function / CustomOp callback is exact under
#    NaiveEngine but deadlocks under the default threaded engine;
#  * gradients an executor writes outside autograd's view are ordered with later engine operations only
#    if the operations that write them are pushed before the reader (trainer.step) is pushed;
#  * gluon.Trainer.step refuses gradients autograd did not write unless `_fresh_grad` is set;
#  * autograd.Function drops every input gradient when one input has none (the req == 0 early return
#    in its backward entry), and never honours grad_req 'add' for its inputs.
# So no executor work ever runs in a callback.  The forward runs the executor on the main thread, then
# records a `_HeadGradCatcher` Function whose forward returns copies of the executor's outputs and
# whose backward (an engine callback) only copies the head gradients autograd hands it into arrays of
# the pending `_Record` and sets a flag.  Its first input is a one-element per-record `dummy` with
# attach_grad(), so autograd always records it and always writes dummy.grad when the callback ran.
# `mx.autograd.backward` and `NDArray.backward` are wrapped (once, globally, while any block is
# mirrored): after the original call pushed autograd's backward, the wrapper waits on each pending
# record's dummy.grad (wait_to_read blocks until the catcher's backward op, which writes it, has
# completed; it returns at once for records this backward did not reach), then, on the main thread,
# runs `exe.backward(out_grads=captured)` for each record that was reached, marks the written gradients
# fresh and adds the input gradient to an attached input's .grad.  Every one of those operations is
# pushed before the wrapper returns, hence before the user's trainer.step pushes its reads: the engine
# orders them.  The main thread waits until the block's forward and the loss's backward have run (the
# catcher's backward depends on both), which the executor's backward had to wait for anyway; the
# network's backward itself is only pushed, never waited for.
# Related: NOTE [ Auxiliary states are written by a reader ] (BatchNorm statistics), `_Slot` (a second
# forward before the first one's backward), `_run_backward` (a second backward of one forward).


class _HeadGradCatcher(autograd.Function):
    """Returns copies of the executor's outputs; its backward captures the head gradients."""

    def __init__(self, record: "_Record") -> None:
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


class _Slot:
    """One bound executor and the record of its last forward.

    The first executor of a context and signature is bound with the
    Parameters' own gradient arrays (and their grad_req).  Further ones, bound
    when another forward comes before the first one's backward, write into
    private arrays that :func:`_finish_backward` then writes or adds into the
    Parameters' gradients, as autograd sums several uses of one Parameter.
    """

    def __init__(self, executor: "mx.executor.Executor", fresh: List["mx.nd.NDArray"],
                 aux: List["mx.nd.NDArray"],
                 private: List[Tuple["mx.nd.NDArray", "mx.nd.NDArray", str]],
                 written: List["mx.nd.NDArray"]) -> None:
        self.executor = executor
        self.fresh = fresh  # the Parameter data arrays whose gradients the executor writes
        self.aux = aux  # the Parameter arrays bound as auxiliary states (BatchNorm statistics)
        self.private = private  # (Parameter gradient, private gradient, grad_req); empty: primary
        self.written = written  # the Parameter gradients a primary executor writes (grad_req write)
        self.record: Optional["_Record"] = None
        self.checked = False  # whether one forward and backward ran through it without error


class _Record:
    """A recorded forward through a slot, waiting for autograd to reach it."""

    def __init__(self, slot: _Slot, leaves: List[Tuple[str, "mx.nd.NDArray"]]) -> None:
        self.slot = slot
        self.leaves = leaves  # (argument name, attached input) pairs that need the input gradient
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
        self.sequence = next(_SEQUENCE)


_LOCK = threading.RLock()
_SEQUENCE = itertools.count()
_PENDING: List[_Record] = []  # records whose forward ran and whose backward may still come
_STALE: Deque[_Record] = deque(maxlen=32)  # overwritten records, watched so a late backward fails
_MIRRORED: "weakref.WeakSet[gluon.Block]" = weakref.WeakSet()
_ORIGINALS: Dict[str, Any] = {}


def _finish_backward(retain_graph: bool) -> None:
    """Run the executor backward of every pending record the last autograd backward reached."""
    with _LOCK:
        records = list(_PENDING) + list(_STALE)
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
    written: set = set()  # Parameter gradients (write) already written by this backward
    for record in reached:
        record.reached = False
        _run_backward(record, written)
        if not retain_graph:
            with _LOCK:
                if record in _PENDING:
                    _PENDING.remove(record)
                if record.slot.record is record:
                    record.slot.record = None
    if late:
        raise GluonMirrorError(
            "a backward reached the outputs of a mirrored forward whose executor was reused by a later "
            "forward on the same context and shapes; its gradients are lost. Call backward before "
            "running the block more than `max_pending` times, or mirror(net, max_pending=...) higher")


def _run_backward(record: _Record, written: set) -> None:
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
        raise GluonMirrorError(f"the mirrored executor's backward failed ({error}); run the block "
                               f"without mirror() (unmirror(net)) or report the network") from error
    record.backwards += 1
    if not slot.private:
        written.update(id(grad) for grad in slot.written)
    for grad, before in kept:
        grad[:] = before + grad
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
        leaf.grad[:] = leaf.grad + executor.grad_dict[name]


def _check_grad_not_reached() -> None:
    with _LOCK:
        records = list(_PENDING)
    for record in records:
        record.dummy.grad.wait_to_read()
    reached = [record for record in records if record.reached]
    for record in reached:
        record.reached = False
    if reached:
        raise GluonMirrorError("autograd.grad through a mirrored block is not supported (the "
                               "executor writes the Parameters' gradients); use backward(), or "
                               "unmirror(net) for this computation")


def _install_hooks() -> None:
    """Wrap autograd's backward entry points once (idempotent)."""
    if _ORIGINALS:
        return
    original_backward = autograd.backward
    original_nd_backward = mx.nd.NDArray.backward
    original_grad = autograd.grad

    @functools.wraps(original_backward)
    def backward(heads, head_grads=None, retain_graph=False, train_mode=True):
        original_backward(heads, head_grads=head_grads, retain_graph=retain_graph,
                          train_mode=train_mode)
        _finish_backward(retain_graph)

    @functools.wraps(original_nd_backward)
    def nd_backward(self, out_grad=None, retain_graph=False, train_mode=True):
        original_nd_backward(self, out_grad=out_grad, retain_graph=retain_graph, train_mode=train_mode)
        _finish_backward(retain_graph)

    @functools.wraps(original_grad)
    def grad(heads, variables, head_grads=None, retain_graph=None, create_graph=False,
             train_mode=True):
        result = original_grad(heads, variables, head_grads=head_grads, retain_graph=retain_graph,
                               create_graph=create_graph, train_mode=train_mode)
        if _PENDING:
            # autograd.grad writes only the requested variables' gradients (not the dummies):
            # once they are computed, every catcher on their paths has run.
            for array in (result if isinstance(result, (list, tuple)) else [result]):
                array.wait_to_read()
            _check_grad_not_reached()
        return result

    _ORIGINALS.update(backward=original_backward, nd_backward=original_nd_backward,
                      grad=original_grad)
    autograd.backward = backward
    mx.nd.NDArray.backward = nd_backward
    autograd.grad = grad


def _remove_hooks() -> None:
    if not _ORIGINALS:
        return
    autograd.backward = _ORIGINALS["backward"]
    mx.nd.NDArray.backward = _ORIGINALS["nd_backward"]
    autograd.grad = _ORIGINALS["grad"]
    _ORIGINALS.clear()


def _in_autograd_graph(array: "mx.nd.NDArray") -> bool:
    """Whether ``array`` was produced by recorded operations (a leaf with a gradient excluded)."""
    try:
        autograd.get_symbol(array)
    except mx.base.MXNetError:
        return False
    return True


# NOTE [ executor segments behind a mirrored block ]
# With backend 'segments' (or 'auto' choosing them) a slot's "executor" is a
# SegmentChain (mx/segments.py): the traced symbol split at the plan's cuts, one
# executor per segment sharing one memory pool.  The chain offers what this module
# uses of an executor (arg_dict, grad_dict, grad_arrays, outputs, forward,
# backward), so everything above is unchanged: the forward in record runs every
# segment on the main thread keeping only the boundary tensors, the catcher copies
# the last segment's outputs, and `_run_backward` calls chain.backward(head
# gradients) from the main thread, which runs the last segment's backward and then
# re-runs each earlier segment's forward and backward, last to first.  The chain is
# given the Parameters' own arrays (SegmentChain reuses shared arrays whose shape and
# dtype match), so its segments read the weights and write the gradients and
# BatchNorm statistics of the Parameters, as the one-level executor does:
#  * grad_req 'write': a Parameter read by one segment is written by it; one read by
#    several segments (weights an unrolled RNN shares over its steps) is bound 'add'
#    in each and zeroed by the chain before its backward; 'add' adds in every segment.
#    A second executor's private gradients go through the same path, then into the
#    Parameters' (`_run_backward`).
#  * BatchNorm statistics are updated in the CPU backward only, once per iteration
#    (the re-run forward does not touch them; on the GPU the chain binds re-run
#    segments' BatchNorm with cudnn_off).  The aux arrays are the Parameters'.
#  * retain_graph: the second backward re-runs the whole chain's forward first.
#  * Inputs: the chain allocates its own input (and input-gradient) arrays.
# Networks drawing random numbers are refused by plan_with_segments ('segments') or
# kept one-level ('auto'): a re-run segment would draw new masks.
def _segment_chain(plan: MirrorPlan, context: "mx.Context", names: List[str],
                   args: Sequence["mx.nd.NDArray"], arrays: Dict[str, "mx.nd.NDArray"],
                   grads: Dict[str, "mx.nd.NDArray"], requests: Dict[str, str],
                   aux: Dict[str, "mx.nd.NDArray"]) -> Any:
    """A :class:`~.mx.segments.SegmentChain` of ``plan`` bound to the Parameters' arrays."""
    from .mx.segments import SegmentChain

    params = {name: array for name, array in arrays.items() if name not in names}
    shared = {"arg": params, "grad": {name: grads[name] for name in params if name in grads},
              "aux": aux}
    chain = SegmentChain(plan.symbol, plan.segment_plan, context,
                         {name: tuple(x.shape) for name, x in zip(names, args)},
                         {name: np.dtype(x.dtype) for name, x in zip(names, args)},
                         requests, shared_arrays=shared)
    # The chain reuses a given array only when its shape and dtype match what it infers; a fresh
    # array would train a copy of the Parameter.
    given = [(chain.arg_dict, shared["arg"]), (chain.grad_dict, shared["grad"]), (chain.aux_dict, aux)]
    detached = [name for bound, wanted in given for name, array in wanted.items()
                if bound.get(name) is not array]
    if detached:
        raise GluonMirrorError(f"the executor segments could not be bound to the Parameters' own "
                               f"arrays ({detached[:3]}: shape or dtype differ from what the traced "
                               f"symbol infers); use backend='mirror' for this block")
    return chain


class _Entry:
    """A plan and the executors bound from it for one context and input signature."""

    def __init__(self, plan: MirrorPlan) -> None:
        self.plan = plan
        self.slots: List[_Slot] = []


class MirrorState:
    """What :func:`mirror` attaches to a block (``mirror_state(net)``).

    Attributes
    ----------
    options : MirrorOptions
        How plans are made.
    last_plan : MirrorPlan or None
        The plan of the last mirrored forward.
    max_shapes : int
        Input signatures whose executors stay bound, per context (least recently used evicted).
    max_pending : int
        Executors per context and signature: forwards that may wait for their backward at once.
    """

    def __init__(self, block: "gluon.HybridBlock", options: MirrorOptions, max_shapes: int,
                 max_pending: int) -> None:
        self._block = weakref.ref(block)
        self.options = options
        self.max_shapes = max(1, int(max_shapes))
        self.max_pending = max(1, int(max_pending))
        self.last_plan: Optional[MirrorPlan] = None
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._symbol: Optional[Tuple[List[str], "mx.sym.Symbol"]] = None

    def __reduce__(self) -> Tuple[Any, tuple]:
        # Pickled with its block: the options travel, executors and plans are made again.
        return _restore_state, (self._block(), self.options, self.max_shapes, self.max_pending)

    @property
    def plans(self) -> List[MirrorPlan]:
        """Plans of the executors currently bound."""
        return [entry.plan for entry in self._entries.values()]

    def executors(self) -> List["mx.executor.Executor"]:
        """The executors currently bound (every context and signature; a
        :class:`~.mx.segments.SegmentChain` per executor for segment plans)."""
        return [slot.executor for entry in self._entries.values() for slot in entry.slots]

    def release(self) -> None:
        """Drop every bound executor (pending forwards become unusable)."""
        for entry in self._entries.values():
            self._retire(entry)
        self._entries.clear()

    # ------------------------------------------------------------ tracing
    def _traced(self, block: "gluon.HybridBlock", args: Sequence["mx.nd.NDArray"],
                ) -> Tuple[List[str], "mx.sym.Symbol"]:
        if self._symbol is None:
            try:
                inputs, out = block._get_graph(*args)
            except MirrorHookError:
                raise
            except Exception as error:  # anything hybrid_forward raises on Symbols
                raise GluonMirrorError(
                    f"{type(block).__name__} cannot be traced to a symbol ({type(error).__name__}: "
                    f"{error}); mirroring needs hybrid_forward to use only F (symbol-compatible) "
                    f"operations and return (nested lists of) outputs. Call unmirror(net) to train "
                    f"it plainly") from error
            names = [symbol.name for symbol in inputs]
            params = {p.name for p in block.collect_params().values()}
            unknown = (set(out.list_arguments()) | set(out.list_auxiliary_states())) - params - set(names)
            if unknown:
                raise GluonMirrorError(f"the traced symbol of {type(block).__name__} reads inputs that "
                                       f"are neither its arguments nor its Parameters: "
                                       f"{sorted(unknown)[:5]}; mirror the block that owns them")
            self._symbol = names, out
        return self._symbol

    # ------------------------------------------------------------ binding
    def _check_arrays(self, block: "gluon.HybridBlock") -> None:
        """Release the executors when the Parameters got new arrays (``initialize(force_reinit=True)``,
        ``reset_ctx``, ``cast``): executors bound to the old ones would train those."""
        current = [(p._data, p._grad) for p in block.collect_params().values()]
        known = getattr(self, "_arrays", None)
        if known is not None and (len(known) != len(current) or any(
                a is not b or c is not d for (a, c), (b, d) in zip(known, current))):
            logger.info("mirror: the Parameters of %s have new arrays; binding again",
                        type(block).__name__)
            self.release()
        self._arrays = current

    def _retire(self, entry: _Entry) -> None:
        with _LOCK:
            for slot in entry.slots:
                if slot.record is not None:
                    self._make_stale(slot.record)
                    slot.record = None

    @staticmethod
    def _make_stale(record: _Record) -> None:
        record.stale = True
        record.slot = None  # type: ignore[assignment]  # the executor may be freed; flags stay
        if record in _PENDING:
            _PENDING.remove(record)
        _STALE.append(record)

    def _entry(self, block: "gluon.HybridBlock", names: List[str], symbol: "mx.sym.Symbol",
               args: Sequence["mx.nd.NDArray"], requests: Dict[str, str]) -> _Entry:
        context = args[0].context
        signature = tuple((name, tuple(x.shape), np.dtype(x.dtype).name) for name, x in zip(names, args))
        key = (str(context), signature, tuple(sorted(requests.items())))
        entry = self._entries.get(key)
        if entry is None:
            plan = self._plan(block, symbol, signature, requests)
            entry = self._entries[key] = _Entry(plan)
            same_context = [k for k in self._entries if k[0] == key[0]]
            for old in same_context[:-self.max_shapes]:  # executors hold device memory
                self._retire(self._entries.pop(old))
        self._entries.move_to_end(key)
        return entry

    def _plan(self, block: "gluon.HybridBlock", symbol: "mx.sym.Symbol", signature: tuple,
              requests: Dict[str, str]) -> MirrorPlan:
        try:
            return plan_mirror(symbol, [(name, shape, dtype) for name, shape, dtype in signature],
                               grad_req=requests, options=self.options)
        except MirrorHookError:
            raise
        except mx.base.MXNetError as error:
            raise GluonMirrorError(f"MXNet cannot plan {type(block).__name__} for inputs "
                                   f"{signature} ({error}); call unmirror(net) to train it "
                                   f"plainly") from error

    def _requests(self, block: "gluon.HybridBlock", args: Sequence["mx.nd.NDArray"],
                  ) -> Tuple[List[str], "mx.sym.Symbol", Dict[str, str], List[Tuple[str, Any]]]:
        """Traced symbol, gradient requests and the inputs that need a gradient."""
        self._finish_deferred_init(block, args)
        names, symbol = self._traced(block, args)
        requests: Dict[str, str] = {}
        leaves: List[Tuple[str, "mx.nd.NDArray"]] = []
        for name, x in zip(names, args):
            if x.grad is not None:
                requests[name] = "write"
                leaves.append((name, x))
            elif _in_autograd_graph(x):
                raise GluonMirrorError(
                    f"input {name!r} of the mirrored {type(block).__name__} is the output of recorded "
                    f"operations: its gradient could not flow back through them. Mirror the outermost "
                    f"block (the whole network) instead, or run the earlier operations outside "
                    f"autograd.record()")
            else:
                requests[name] = "null"
        params = {p.name: p for p in block.collect_params().values()}
        for name in symbol.list_arguments():
            if name not in requests:
                requests[name] = params[name].grad_req
        return names, symbol, requests, leaves

    def plan(self, block: "gluon.HybridBlock", args: Sequence["mx.nd.NDArray"]) -> MirrorPlan:
        """The plan a training forward on ``args`` uses (planned or from the cache; nothing bound)."""
        names, symbol, requests, _ = self._requests(block, args)
        signature = tuple((name, tuple(x.shape), np.dtype(x.dtype).name)
                          for name, x in zip(names, args))
        return self._plan(block, symbol, signature, requests)

    def _bind(self, block: "gluon.HybridBlock", entry: _Entry, names: List[str],
              args: Sequence["mx.nd.NDArray"], requests: Dict[str, str], primary: bool) -> _Slot:
        context = args[0].context
        symbol = entry.plan.symbol
        params = {p.name: p for p in block.collect_params().values()}
        arrays, grads, fresh, private, written = {}, {}, [], [], []
        bind_requests = dict(requests)
        for name in symbol.list_arguments():
            if name in names:
                x = args[names.index(name)]
                arrays[name] = mx.nd.zeros(x.shape, ctx=context, dtype=x.dtype)
                if requests[name] != "null":
                    grads[name] = mx.nd.zeros(x.shape, ctx=context, dtype=x.dtype)
            else:
                param = params[name]
                arrays[name] = param.data(context)
                if param.grad_req != "null":
                    fresh.append(arrays[name])
                    if primary:
                        grads[name] = param.grad(context)
                        if param.grad_req == "write":
                            written.append(grads[name])
                    else:
                        target = param.grad(context)
                        grads[name] = mx.nd.zeros(target.shape, ctx=context, dtype=target.dtype)
                        private.append((target, grads[name], param.grad_req))
                        bind_requests[name] = "write"
        aux = {name: params[name].data(context) for name in symbol.list_auxiliary_states()}
        try:
            if entry.plan.backend == "segments":
                executor = _segment_chain(entry.plan, context, names, args, arrays, grads,
                                          bind_requests, aux)
            else:
                executor = symbol.bind(context, arrays, args_grad=grads, grad_req=bind_requests,
                                       aux_states=aux)
        except mx.base.MXNetError as error:
            raise GluonMirrorError(f"MXNet cannot bind the mirrored {type(block).__name__} ({error}); "
                                   f"call unmirror(net) to train it plainly") from error
        return _Slot(executor, fresh, list(aux.values()), private, written)

    def _slot(self, block: "gluon.HybridBlock", entry: _Entry, names: List[str],
              args: Sequence["mx.nd.NDArray"], requests: Dict[str, str]) -> _Slot:
        with _LOCK:
            for slot in entry.slots:
                if slot.record is None:
                    return slot
            if len(entry.slots) < self.max_pending:
                if entry.slots:
                    logger.info("mirror: a second forward of %s before the backward of the first on "
                                "%s: binding one more executor (more memory)", type(block).__name__,
                                args[0].context)
                slot = self._bind(block, entry, names, args, requests, primary=not entry.slots)
                entry.slots.append(slot)
                return slot
            slot = entry.slots.pop(0)  # the oldest waiting forward is overwritten
            entry.slots.append(slot)
            logger.warning("mirror: %d forwards of %s wait for backward on %s; the oldest one's "
                           "executor is reused (a backward through it will fail)",
                           len(entry.slots), type(block).__name__, args[0].context)
            self._make_stale(slot.record)
            slot.record = None
            return slot

    # ------------------------------------------------------------ forward
    def forward(self, block: "gluon.HybridBlock", args: Sequence[Any]) -> Any:
        """The mirrored forward of ``block`` on NDArray inputs (autograd recording for training)."""
        if not all(isinstance(x, mx.nd.NDArray) for x in args) or not args:
            raise GluonMirrorError(f"a mirrored block takes NDArray positional inputs (got "
                                   f"{[type(x).__name__ for x in args]}); nested lists and None "
                                   f"are not supported: call unmirror(net) for this block")
        contexts = {x.context for x in args}
        if len(contexts) > 1:
            raise ValueError(f"inputs of one call live on several contexts {sorted(map(str, contexts))}")
        names, symbol, requests, leaves = self._requests(block, args)
        self._check_arrays(block)
        entry = self._entry(block, names, symbol, args, requests)
        self.last_plan = entry.plan
        slot = self._slot(block, entry, names, args, requests)
        executor = slot.executor
        for name, x in zip(names, args):
            x.copyto(executor.arg_dict[name])
        try:
            executor.forward(is_train=True)
            if not slot.checked:  # once per executor: an operator that cannot run fails here
                for output in executor.outputs:
                    output.wait_to_read()
        except mx.base.MXNetError as error:
            raise GluonMirrorError(f"the mirrored executor's forward failed ({error}); if the plain "
                                   f"block runs, call unmirror(net) to train it plainly (and report "
                                   f"the network)") from error
        record = _Record(slot, leaves)
        with _LOCK:
            slot.record = record
            _PENDING.append(record)
        outputs = _HeadGradCatcher(record)(record.dummy, *[x for _, x in leaves])
        if isinstance(outputs, mx.nd.NDArray):
            outputs = [outputs]
        return _regroup(list(outputs), block._out_format)

    @staticmethod
    def _finish_deferred_init(block: "gluon.HybridBlock", args: Sequence["mx.nd.NDArray"]) -> None:
        params = list(block.collect_params().values())
        if any(getattr(p, "_deferred_init", ()) for p in params):
            block._deferred_infer_shape(*args)
            for param in params:
                param._finish_deferred_init()


def _restore_state(block: "gluon.HybridBlock", options: MirrorOptions, max_shapes: int,
                   max_pending: int) -> MirrorState:
    state = MirrorState(block, options, max_shapes, max_pending)
    weakref.finalize(block, state.release)
    with _LOCK:
        _MIRRORED.add(block)
        _install_hooks()
    return state


def _mirrored_forward(block: "gluon.HybridBlock", original: Any, *args: Any) -> Any:
    state: Optional[MirrorState] = getattr(block, _STATE_ATTR, None)
    if state is None or not (autograd.is_recording() and autograd.is_training()) \
            or any(isinstance(x, mx.sym.Symbol) for x in args):
        return original(*args)
    return state.forward(block, args)


def mirror(block: "gluon.HybridBlock", *, options: Optional[MirrorOptions] = None,
           memory_budget: BudgetLike = None, planner: Optional[str] = None,
           cache_dir: Union[None, str, bool] = None, cost_ctx: Optional["mx.Context"] = None,
           keep_ops: Optional[Sequence[str]] = None, backend: Optional[str] = None,
           segments: Optional[int] = None, max_shapes: int = 2,
           max_pending: int = 2) -> "gluon.HybridBlock":
    """Mirror ``block`` in place whenever autograd records for training; returns ``block``.

    ``net = mirror(net)`` (or just ``mirror(net)``) may come before
    ``initialize()``, before or after ``hybridize()``, before the Trainer
    exists.  Afterwards, inside ``autograd.record()`` (training mode) the
    block's forward runs a mirrored executor planned for the input shapes,
    dtypes and context; ``autograd.backward(losses)`` / ``loss.backward()``
    run its backward with the head gradient autograd computed, writing the
    Parameters' gradients before they return, so ``trainer.step`` follows as
    usual.  Outside recording, or under ``autograd.predict_mode()``, the
    block runs exactly as before.

    Parameters
    ----------
    block : gluon.HybridBlock
        The network (its outermost block: its inputs must not be outputs of
        recorded operations).
    options : MirrorOptions, optional
        Planning options; the keyword arguments below override its fields.
    memory_budget, planner, cache_dir, cost_ctx, keep_ops, backend, segments
        As for :class:`~mxnet_mirror_hook.options.MirrorOptions`.  With
        ``backend='segments'`` (or ``'auto'`` choosing them, as
        :func:`~mxnet_mirror_hook.plan.plan_mirror` does) the block runs as a
        chain of executor segments (NOTE [ executor segments behind a mirrored
        block ]).
    max_shapes : int
        Input signatures (shapes/dtypes) whose executors stay bound per
        context; the least recently used is released beyond it.
    max_pending : int
        Forwards per context and signature that may await their backward at
        once (each holds its own executor).

    Returns
    -------
    gluon.HybridBlock
        ``block`` itself.

    Raises
    ------
    GluonMirrorError
        For a plain (non-hybrid) ``Block``.
    BackendError
        At the first training forward, with ``backend='segments'``, for a
        network that draws random numbers in forward (Dropout): a re-run
        segment would draw other masks.  ``'auto'`` keeps the one-level
        mirror for such networks.
    """
    if not isinstance(block, gluon.HybridBlock):
        raise GluonMirrorError(f"mirror() needs a gluon.HybridBlock (it is traced to a symbol), got "
                               f"{type(block).__name__}; rewrite it as a HybridBlock with "
                               f"hybrid_forward, or mirror a HybridBlock inside it")
    opts = MirrorOptions.coerce(options, planner=planner, memory_budget=memory_budget,
                                cache_dir=cache_dir, cost_ctx=cost_ctx, keep_ops=keep_ops,
                                backend=backend, segments=segments)
    state: Optional[MirrorState] = getattr(block, _STATE_ATTR, None)
    if state is not None:
        if state.options != opts:
            state.release()
            state.options = opts
        state.max_shapes, state.max_pending = max(1, int(max_shapes)), max(1, int(max_pending))
        return block
    _attach(block, MirrorState(block, opts, max_shapes, max_pending))
    return block


def _attach(block: "gluon.HybridBlock", state: MirrorState) -> None:
    # Instance attributes: the class, isinstance, parameter names and files stay the block's own.
    object.__setattr__(block, _STATE_ATTR, state)
    object.__setattr__(block, "forward", _MirroredForward(block))
    weakref.finalize(block, state.release)  # forwards still waiting must not keep executors alive
    with _LOCK:
        _MIRRORED.add(block)
        _install_hooks()


class _MirroredForward:
    """The instance ``forward`` of a mirrored block (picklable: it is rebuilt on unpickling)."""

    def __init__(self, block: "gluon.HybridBlock") -> None:
        self._block = weakref.ref(block)
        self.__doc__ = type(block).forward.__doc__

    def __call__(self, *args: Any) -> Any:
        block = self._block()
        return _mirrored_forward(block, type(block).forward.__get__(block), *args)

    def __reduce__(self) -> Tuple[Any, tuple]:
        return _MirroredForward, (self._block(),)


def unmirror(block: "gluon.HybridBlock") -> "gluon.HybridBlock":
    """Switch mirroring off for ``block`` (releases its executors); returns ``block``."""
    state: Optional[MirrorState] = getattr(block, _STATE_ATTR, None)
    if state is None:
        return block
    state.release()
    object.__delattr__(block, _STATE_ATTR)
    if "forward" in vars(block):
        object.__delattr__(block, "forward")
    with _LOCK:
        _MIRRORED.discard(block)
        if not len(_MIRRORED) and not _PENDING:
            _remove_hooks()
    return block


def is_mirrored(block: "gluon.Block") -> bool:
    """Whether :func:`mirror` is on for ``block``."""
    return getattr(block, _STATE_ATTR, None) is not None


def mirror_state(block: "gluon.Block") -> Optional[MirrorState]:
    """The :class:`MirrorState` of a mirrored block (None when not mirrored)."""
    return getattr(block, _STATE_ATTR, None)


def _first(output: Any) -> Any:
    """The main output of a block returning several (auxiliary heads)."""
    while isinstance(output, (list, tuple)):
        output = output[0]
    return output


def plan_block(block: "gluon.HybridBlock", *inputs: Any, dtype: Any = "float32",
               options: Optional[MirrorOptions] = None, **option_kwargs: Any) -> MirrorPlan:
    """The plan :func:`mirror` would use for these inputs, without training (nothing is bound).

    Parameters
    ----------
    block : gluon.HybridBlock
        Mirrored or not; initialized (deferred shapes are completed from the
        inputs).
    *inputs : NDArray or tuple of int
        Sample inputs, or their shapes (then zeros of ``dtype`` on the CPU).
    dtype : str or numpy dtype
        The dtype of inputs given as shapes.
    options, **option_kwargs
        As for :func:`mirror` (default: the block's mirror options, if mirrored).

    Returns
    -------
    MirrorPlan
        With ``baseline_mb`` (the unmirrored executor) and ``planned_mb``.
    """
    arrays = [x if isinstance(x, mx.nd.NDArray) else mx.nd.zeros(tuple(x), dtype=dtype) for x in inputs]
    state = mirror_state(block)
    if state is None or options is not None or option_kwargs:
        base = options if options is not None else (state.options if state is not None else None)
        state = MirrorState(block, MirrorOptions.coerce(base, **option_kwargs), 1, 1)
    return state.plan(block, arrays)


def _horovod_optimizer(optimizer: Any) -> bool:
    kind = type(optimizer)
    return kind.__name__ == "DistributedOptimizer" and kind.__module__.startswith("horovod")


class MirroredTrainer:
    """Train a Gluon ``HybridBlock`` with mirrored (recomputed) activations.

    A small training loop on top of :func:`mirror`: ``step(data, label)`` does
    exactly this, in less memory::

        with autograd.record():
            losses = [loss(net(x), y) for x, y in zip(split_and_load(data), split_and_load(label))]
        autograd.backward(losses)
        trainer.step(data.shape[0])

    Parameters
    ----------
    net : gluon.HybridBlock
        The network (initialized or not; hybridized or not).  It is mirrored
        in place (:func:`unmirror` switches that off).
    loss : gluon.loss.Loss
        A per-sample loss, such as ``gluon.loss.SoftmaxCrossEntropyLoss()``.
    optimizer : str, mx.optimizer.Optimizer or gluon.Trainer
        As for ``gluon.Trainer``; or a ready Trainer (Horovod's
        ``DistributedTrainer`` included), used as it is.
    optimizer_params : dict, optional
        As for ``gluon.Trainer`` (not with a ready Trainer).
    memory_budget, planner, cache_dir, cost_ctx, keep_ops, options, backend, segments
        As for :func:`mirror`.
    context : Context or list of Context, optional
        Devices to train on (default: the contexts the Parameters live on).
        A batch is split along its first axis across them.
    kvstore : str
        As for ``gluon.Trainer``.
    max_bound_shapes : int
        Batch shapes whose executors stay bound.

    Attributes
    ----------
    trainer : gluon.Trainer
        The Trainer doing the updates.
    """

    def __init__(self, net: gluon.HybridBlock, loss: gluon.Block, optimizer: Any,
                 optimizer_params: Optional[Dict[str, Any]] = None, *,
                 memory_budget: BudgetLike = None, context: Any = None, kvstore: str = "device",
                 planner: Optional[str] = None, cache_dir: Union[None, str, bool] = None,
                 cost_ctx: Optional["mx.Context"] = None,
                 keep_ops: Optional[Sequence[str]] = None, max_bound_shapes: int = 2,
                 options: Optional[MirrorOptions] = None, backend: Optional[str] = None,
                 segments: Optional[int] = None) -> None:
        if not isinstance(net, gluon.HybridBlock):
            raise GluonMirrorError(f"net must be a gluon.HybridBlock (it is traced to a symbol), got "
                                   f"{type(net).__name__}; hybrid_forward-based blocks all qualify")
        if not isinstance(loss, gluon.Block):
            raise GluonMirrorError(f"loss must be a gluon loss (a Block), got {type(loss).__name__}")
        if _horovod_optimizer(optimizer):
            raise GluonMirrorError("hvd.DistributedOptimizer does not work with gluon.Trainer (the "
                                   "Trainer never forwards rescale_grad to the wrapped optimizer): "
                                   "pass hvd.DistributedTrainer(net.collect_params(), optimizer, "
                                   "optimizer_params) as the optimizer instead")
        self.net, self.loss = net, loss
        self._params = net.collect_params()
        if isinstance(optimizer, gluon.Trainer):
            if optimizer_params:
                raise GluonMirrorError("optimizer_params cannot be given with a ready Trainer; set "
                                       "them when making the Trainer")
            self.trainer = optimizer
        elif hasattr(optimizer, "step") and hasattr(optimizer, "allreduce_grads"):
            self.trainer = optimizer  # a Trainer-like object (e.g. a Horovod trainer of another build)
        else:
            self.trainer = gluon.Trainer(self._params, optimizer, optimizer_params, kvstore=kvstore)
        self._context = context
        mirror(net, options=options, memory_budget=memory_budget, planner=planner,
               cache_dir=cache_dir, cost_ctx=cost_ctx, keep_ops=keep_ops, backend=backend,
               segments=segments, max_shapes=max_bound_shapes)

    @property
    def mirror_plan(self) -> Optional[MirrorPlan]:
        """The plan of the last batch shape (None before the first step)."""
        state = mirror_state(self.net)
        return state.last_plan if state is not None else None

    def _contexts(self) -> List["mx.Context"]:
        if self._context is not None:
            return list(self._context) if isinstance(self._context, (list, tuple)) else [self._context]
        for param in self._params.values():
            try:
                return list(param.list_ctx())
            except RuntimeError:
                continue
        return [mx.cpu()]

    def step(self, data: "mx.nd.NDArray", label: "mx.nd.NDArray") -> float:
        """Forward, backward and update on one batch; returns the mean loss.

        Parameters
        ----------
        data : NDArray
            A batch, batch axis first.
        label : NDArray
            Its labels, batch axis first.

        Raises
        ------
        ShapeError
            If data and label disagree on the batch size, or the batch is
            smaller than the number of devices.
        """
        contexts = self._contexts()
        if data.shape[0] != label.shape[0]:
            raise ShapeError(f"data has batch size {data.shape[0]} but label has {label.shape[0]}")
        if data.shape[0] < len(contexts):
            raise ShapeError(f"a batch of {data.shape[0]} cannot be split over "
                             f"{len(contexts)} devices")
        parts = gluon.utils.split_and_load(data, contexts, even_split=False)
        targets = gluon.utils.split_and_load(label, contexts, even_split=False)
        with autograd.record():
            losses = [self.loss(_first(self.net(x)), y) for x, y in zip(parts, targets)]
        autograd.backward(losses)
        self.trainer.step(data.shape[0])
        total = sum(float(loss.sum().asscalar()) for loss in losses)
        return total / data.shape[0]

    @property
    def learning_rate(self) -> float:
        """The Trainer's learning rate."""
        return self.trainer.learning_rate

    def set_learning_rate(self, lr: float) -> None:
        """Set the Trainer's learning rate."""
        self.trainer.set_learning_rate(lr)
