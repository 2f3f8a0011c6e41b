"""``MirrorState``: what ``mirror()`` attaches to a block (its plans and bound executors)."""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon.block import _regroup

from ..errors import GluonMirrorError, MirrorHookError
from ..options import MirrorOptions
from ..plan import MirrorPlan, plan_mirror
from .binding import bind_slot
from .deferred import finish_deferred_init
from .hooks import REGISTRY
from .records import HeadGradCatcher, Slot
from .signature import Call, Trace, flatten_call, trace

__all__ = ["MirrorState", "restore_state"]

logger = logging.getLogger(__name__)


def _in_autograd_graph(array: "mx.nd.NDArray") -> bool:
    """Whether ``array`` was produced by recorded operations (a leaf with a gradient excluded)."""
    try:
        autograd.get_symbol(array)
    except mx.base.MXNetError:
        return False
    return True


class UntraceableBlockError(GluonMirrorError):
    """A mirrored block's ``hybrid_forward`` cannot run on Symbols (it then trains plainly)."""


def _untraceable(block: "gluon.HybridBlock", error: Exception) -> UntraceableBlockError:
    """The error for a block whose ``hybrid_forward`` failed on Symbols (it then trains plainly)."""
    return UntraceableBlockError(
        f"{type(block).__name__} cannot be traced to a symbol ({type(error).__name__}: "
        f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); mirroring needs "
        f"hybrid_forward to use only F (symbol-compatible) operations and return (nested lists "
        f"of) outputs")


# NOTE [ a Parameter computed at each call trains plainly ]
# A mirrored block binds its Parameters' stored arrays and writes their gradients into them.  A
# Parameter subclass whose ``data()`` computes a new array at each call under autograd
# (gluonnlp's ``WeightDropParameter``: a Dropout of the stored weight, AWD-LSTM's embedding) would
# then train on the stored weight, not the dropped one, and its gradient would miss the Dropout's
# backward (found by running gluonnlp's model zoo: ``Trainer.step`` raised that the gradient was
# stale).  Plain Gluon trains such a block, so it trains plainly, with one warning.
def _computed_parameters(block: "gluon.HybridBlock") -> List[str]:
    """Names of ``block``'s Parameters whose ``data()`` is not the stored array's."""
    return [name for name, param in block.collect_params().items()
            if type(param).data is not gluon.Parameter.data]


def _refuse_computed_parameters(block: "gluon.HybridBlock") -> None:
    computed = _computed_parameters(block)
    if computed:
        raise UntraceableBlockError(
            f"{len(computed)} Parameter(s) of {type(block).__name__} compute their value at each call "
            f"({computed[0]}: {type(block.collect_params()[computed[0]]).__name__}, e.g. a weight drop); "
            f"the mirrored executor would bind the stored value")


class _Entry:
    """A plan and the executors bound from it for one context and input signature."""

    def __init__(self, plan: MirrorPlan) -> None:
        self.plan = plan
        self.slots: List[Slot] = []


class MirrorState:
    """What :func:`~mxnet_mirror_hook.gluon.mirror` attaches to a block (``mirror_state(net)``).

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
    plain_reason : str or None
        Why the block trains without mirroring (it cannot be traced to a symbol), or None.
    optimizer : (optimizer, optimizer_params)
        What the plans' footprints count (set by ``MirroredTrainer``; ``(None, None)``: SGD with
        momentum assumed, NOTE [ the optimizer a footprint assumes ]).
    """

    def __init__(self, block: "gluon.HybridBlock", options: MirrorOptions, max_shapes: int,
                 max_pending: int) -> None:
        self._block = weakref.ref(block)
        self.options = options
        self.max_shapes = max(1, int(max_shapes))
        self.max_pending = max(1, int(max_pending))
        self.last_plan: Optional[MirrorPlan] = None
        self.plain_reason: Optional[str] = None
        self.optimizer: Tuple[Any, Any] = (None, None)
        self._entries: "OrderedDict[tuple, _Entry]" = OrderedDict()
        self._traces: Dict[str, Trace] = {}  # per input structure (nested lists, None)
        self._arrays: Optional[List[tuple]] = None

    def __reduce__(self) -> Tuple[Any, tuple]:
        # Pickled with its block: the options travel, executors and plans are made again.
        return restore_state, (self._block(), self.options, self.max_shapes, self.max_pending)

    @property
    def plans(self) -> List[MirrorPlan]:
        """Plans of the executors currently bound."""
        return [entry.plan for entry in self._entries.values()]

    def executors(self) -> List[Any]:
        """The executors currently bound (every context and signature; a
        :class:`~mxnet_mirror_hook.mx.segments.SegmentChain` per executor for segment plans)."""
        return [slot.executor for entry in self._entries.values() for slot in entry.slots]

    def traced_symbols(self) -> List["mx.sym.Symbol"]:
        """The block's symbol as traced for each input structure seen (all outputs, flattened)."""
        return [found.symbol for found in self._traces.values()]

    def release(self) -> None:
        """Drop every bound executor (pending forwards become unusable)."""
        for entry in self._entries.values():
            REGISTRY.retire(entry.slots)
        self._entries.clear()

    def reconfigure(self, options: MirrorOptions, max_shapes: int, max_pending: int) -> None:
        """New options (executors bound with other options are released) and limits."""
        if self.options != options:
            self.release()
            self.options = options
        self.max_shapes, self.max_pending = max(1, int(max_shapes)), max(1, int(max_pending))

    # ------------------------------------------------------------ tracing and planning
    def _traced(self, block: "gluon.HybridBlock", args: Sequence[Any], structure: Any) -> Trace:
        key = repr(structure)
        if key not in self._traces:
            _refuse_computed_parameters(block)  # NOTE [ a Parameter computed at each call trains plainly ]
            try:
                found = trace(block, args, structure)
            except MirrorHookError:
                raise
            except Exception as error:  # anything hybrid_forward raises on Symbols
                raise _untraceable(block, error) from error
            params = {p.name for p in block.collect_params().values()}
            symbol = found.symbol
            unknown = (set(symbol.list_arguments()) | set(symbol.list_auxiliary_states())) - params \
                - set(found.names)
            if unknown:
                raise GluonMirrorError(f"the traced symbol of {type(block).__name__} reads inputs that "
                                       f"are neither its arguments nor its Parameters: "
                                       f"{sorted(unknown)[:5]}; mirror the block that owns them")
            self._traces[key] = found
        return self._traces[key]

    def _plan(self, block: "gluon.HybridBlock", symbol: "mx.sym.Symbol", signature: tuple,
              requests: Dict[str, str]) -> MirrorPlan:
        try:
            return plan_mirror(symbol, [(name, shape, dtype) for name, shape, dtype in signature],
                               grad_req=requests, options=self.options, optimizer=self.optimizer[0],
                               optimizer_params=self.optimizer[1], surface="gluon")
        except MirrorHookError:
            raise
        except mx.base.MXNetError as error:
            raise GluonMirrorError(f"MXNet cannot plan {type(block).__name__} for inputs "
                                   f"{signature} ({error}); call unmirror(net) to train it "
                                   f"plainly") from error

    def _call(self, block: "gluon.HybridBlock", args: Sequence[Any]) -> Call:
        """The call's traced symbol, input arrays, gradient requests and inputs needing a gradient."""
        arrays, structure = flatten_call(block, args)
        try:
            finish_deferred_init(block, args)  # traces the block symbolically to infer shapes
        except MirrorHookError:
            raise
        except Exception as error:  # e.g. gluoncv's GroupNorm on MXNet 1.9.1: nothing initialized yet
            raise _untraceable(block, error) from error
        found = self._traced(block, args, structure)
        requests: Dict[str, str] = {}
        leaves: List[Tuple[str, "mx.nd.NDArray"]] = []
        for name, x in zip(found.names, arrays):
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
        for name in found.symbol.list_arguments():
            if name not in requests:
                requests[name] = params[name].grad_req
        return Call(found, arrays, requests, leaves)

    @staticmethod
    def _signature(names: List[str], args: Sequence["mx.nd.NDArray"]) -> tuple:
        return tuple((name, tuple(x.shape), np.dtype(x.dtype).name) for name, x in zip(names, args))

    def plan(self, block: "gluon.HybridBlock", args: Sequence[Any]) -> MirrorPlan:
        """The plan a training forward on ``args`` uses (planned or from the cache; nothing bound)."""
        call = self._call(block, args)
        return self._plan(block, call.trace.symbol, self._signature(call.trace.names, call.arrays),
                          call.requests)

    # ------------------------------------------------------------ binding
    def _check_arrays(self, block: "gluon.HybridBlock") -> None:
        """Release the executors when the Parameters got new arrays (``initialize(force_reinit=True)``,
        ``reset_ctx``, ``cast``): executors bound to the old ones would train those."""
        current = [(p._data, p._grad) for p in block.collect_params().values()]
        known = self._arrays
        if known is not None and (len(known) != len(current) or any(
                a is not b or c is not d for (a, c), (b, d) in zip(known, current))):
            logger.info("mirror: the Parameters of %s have new arrays; binding again",
                        type(block).__name__)
            self.release()
        self._arrays = current

    def _entry(self, block: "gluon.HybridBlock", call: Call) -> _Entry:
        signature = self._signature(call.trace.names, call.arrays)
        key = (str(call.arrays[0].context), call.trace.key, signature,
               tuple(sorted(call.requests.items())))
        entry = self._entries.get(key)
        if entry is None:
            plan = self._plan(block, call.trace.symbol, signature, call.requests)
            entry = self._entries[key] = _Entry(plan)
            same_context = [k for k in self._entries if k[0] == key[0]]
            for old in same_context[:-self.max_shapes]:  # executors hold device memory
                REGISTRY.retire(self._entries.pop(old).slots)
        self._entries.move_to_end(key)
        return entry

    def _slot(self, block: "gluon.HybridBlock", entry: _Entry, names: List[str],
              args: Sequence["mx.nd.NDArray"], requests: Dict[str, str]) -> Slot:
        with REGISTRY.lock:
            for slot in entry.slots:
                if slot.record is None:
                    return slot
            if len(entry.slots) < self.max_pending:
                if entry.slots:
                    logger.info("mirror: a second forward of %s before the backward of the first on "
                                "%s: binding one more executor (more memory)", type(block).__name__,
                                args[0].context)
                slot = bind_slot(block, entry.plan, names, args, requests, primary=not entry.slots)
                entry.slots.append(slot)
                return slot
            slot = entry.slots.pop(0)  # the oldest waiting forward is overwritten
            entry.slots.append(slot)
            logger.warning("mirror: %d forwards of %s wait for backward on %s; the oldest one's "
                           "executor is reused (a backward through it will fail)",
                           len(entry.slots), type(block).__name__, args[0].context)
            REGISTRY.retire([slot])
            return slot

    # ------------------------------------------------------------ forward
    def forward(self, block: "gluon.HybridBlock", args: Sequence[Any]) -> Any:
        """The mirrored forward of ``block`` (autograd recording for training).

        ``args`` are the call's positional inputs: NDArrays, ``None`` for an
        optional input, and (nested) lists or tuples of them; the outputs come
        back in the structure the block returns.
        """
        call = self._call(block, args)
        contexts = {x.context for x in call.arrays}
        if len(contexts) > 1:
            raise ValueError(f"inputs of one call live on several contexts {sorted(map(str, contexts))}")
        self._check_arrays(block)
        entry = self._entry(block, call)
        self.last_plan = entry.plan
        slot = self._slot(block, entry, call.trace.names, call.arrays, call.requests)
        self._run_forward(slot, call.trace.names, call.arrays)
        record = REGISTRY.record(slot, call.leaves)
        outputs = HeadGradCatcher(record)(record.dummy, *[x for _, x in call.leaves])
        if isinstance(outputs, mx.nd.NDArray):
            outputs = [outputs]
        return _regroup(list(outputs), call.trace.out_format)

    @staticmethod
    def _run_forward(slot: Slot, names: List[str], args: Sequence["mx.nd.NDArray"]) -> None:
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


def restore_state(block: "gluon.HybridBlock", options: MirrorOptions, max_shapes: int,
                  max_pending: int) -> MirrorState:
    """A block's state after unpickling (its executors are bound again at the next forward)."""
    state = MirrorState(block, options, max_shapes, max_pending)
    weakref.finalize(block, state.release)
    REGISTRY.attach(block)
    return state
