"""A chain of segment executors sharing one memory pool that behaves like one executor:
forward keeps the boundaries, backward re-runs each segment (NOTE [ executor segments ] in
:mod:`mxnet_mirror_hook.core.segments`)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from ...core.graph import draws_random
from ...core.segments.head import LossHead
from ...core.segments.plan import Entry, SegmentPlan, SegmentSpec, as_entry
from ...errors import BackendError
from ..bind import environment
from .environment import cap_variables, match_range_variables
from .head import ChunkedHead
from .layout import (argument_types, chain_layout, head_parts, infer_arguments, reader_bindings,
                     summed_request, tensor_spec, ungraded_boundaries)
from .ops import invoke
from .split import boundary_name, source_name, split_symbol

__all__ = ["SegmentChain", "SEED_LIMIT"]


#: Seeds drawn for replayed segments are in [1, SEED_LIMIT) (``mx.random.seed`` takes a C int).
SEED_LIMIT = 2 ** 31 - 1


def _draws_random(symbol: "mx.sym.Symbol") -> bool:
    """Whether any operator of ``symbol`` draws random numbers in a training forward."""
    return any(node["op"] != "null" and draws_random(node["op"], node.get("attrs") or {})
               for node in json.loads(symbol.tojson())["nodes"])


def _nbytes(array: "mx.nd.NDArray") -> int:
    return array.size * np.dtype(array.dtype).itemsize


def _zeros(shape: Tuple[int, ...], ctx: "mx.Context", dtype: Any) -> "mx.nd.NDArray":
    return mx.nd.zeros(shape, ctx=ctx, dtype=dtype)


class SegmentChain:
    """A chain of segment executors that behaves like one ``mx.executor.Executor``.

    It offers what ``DataParallelExecutorGroup`` and ``Module`` use of an
    executor: ``arg_dict``, ``grad_dict``, ``aux_dict``, ``arg_arrays``,
    ``grad_arrays``, ``aux_arrays`` (in the order of the full symbol),
    ``outputs``, ``forward``, ``backward``, ``copy_params_from`` and
    ``reshape``.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The full (user's) symbol.
    plan : SegmentPlan
        How to split it.
    ctx : mx.Context
        Device.
    input_shapes : dict of str to tuple
        Shapes of the data and label inputs.
    type_dict : dict of str to dtype, optional
        Types of inputs.
    grad_req : dict of str to str
        The user's request per argument of ``symbol``.
    shared_arrays : dict, optional
        ``arg``/``grad``/``aux`` dicts of arrays to reuse when shapes and types match
        (``reshape``; the parameters of another bucket).
    shared_exec : mx.executor.Executor, optional
        An executor whose memory pool the segments share (another bucket's); by default
        the largest segment owns the pool.
    """

    def __init__(self, symbol: "mx.sym.Symbol", plan: SegmentPlan, ctx: "mx.Context",
                 input_shapes: Mapping[str, Tuple[int, ...]],
                 type_dict: Optional[Mapping[str, Any]] = None,
                 grad_req: Optional[Mapping[str, str]] = None,
                 shared_arrays: Optional[Mapping[str, Mapping[str, "mx.nd.NDArray"]]] = None,
                 shared_exec: Optional["mx.executor.Executor"] = None) -> None:
        self.symbol, self.plan, self.ctx = symbol, plan, ctx
        self._input_shapes = dict(input_shapes)
        self._type_dict = argument_types(self._input_shapes, type_dict)
        requests = dict(grad_req or {})
        self._user_req = {name: requests.get(name, "null") for name in symbol.list_arguments()}
        self._allocate_arguments(shared_arrays or {})
        # NOTE [ BatchNorm in re-run segments ]
        self.symbols = split_symbol(symbol, plan, rerun_cudnn_off=ctx.device_type == "gpu")
        self._check_random()
        # Bindings of each argument and boundary (NOTE [ one variable per reader ]: a segment may
        # bind one several times); the chunked head reads its segment's variables once.
        self._readers = reader_bindings(plan, self.symbols)
        arguments = {n: tensor_spec(a.shape, a.dtype) for n, a in self.arg_dict.items()}
        # NOTE [ the chain's own arrays ] in core/segments/layout.py
        self.layout, self.gathers, self.gathered = chain_layout(symbol, plan, self.symbols, arguments,
                                                                self._user_req)
        self._allocate_boundaries()
        # A chunked loss head is not an executor (NOTE [ chunked loss head ]).
        self.head: Optional[ChunkedHead] = self._make_head() if plan.head_chunks else None
        self.execs: List[Optional["mx.executor.Executor"]] = [None] * plan.executor_count()
        self._bind_all(shared_exec)
        self._last_state_valid = False
        self.outputs = self._output_arrays()

    def _allocate_arguments(self, shared: Mapping[str, Mapping[str, "mx.nd.NDArray"]]) -> None:
        """Argument, gradient and auxiliary arrays of the full symbol, reusing ``shared``'s
        ``arg``/``grad``/``aux`` arrays whose shape and type match."""
        arg_names = self.symbol.list_arguments()
        aux_names = self.symbol.list_auxiliary_states()
        arg_shapes, arg_types, aux_shapes, aux_types = infer_arguments(self.symbol, self._input_shapes,
                                                                       self._type_dict)
        old_args, old_grads, old_aux = (shared.get("arg", {}), shared.get("grad", {}),
                                        shared.get("aux", {}))

        def reuse(old: Mapping[str, "mx.nd.NDArray"], name: str, shape, dtype):
            array = old.get(name)
            if array is not None and tuple(array.shape) == tuple(shape) and array.dtype == dtype:
                return array
            return _zeros(tuple(shape), self.ctx, dtype)

        self.arg_dict: Dict[str, "mx.nd.NDArray"] = {}
        self.grad_dict: Dict[str, Optional["mx.nd.NDArray"]] = {}
        for name, shape, dtype in zip(arg_names, arg_shapes, arg_types):
            self.arg_dict[name] = reuse(old_args, name, shape, dtype)
            self.grad_dict[name] = (reuse(old_grads, name, shape, dtype)
                                    if self._user_req[name] != "null" else None)
        self.aux_dict = {name: reuse(old_aux, name, shape, dtype)
                         for name, shape, dtype in zip(aux_names, aux_shapes, aux_types)}
        self.arg_arrays = [self.arg_dict[n] for n in arg_names]
        self.grad_arrays = [self.grad_dict[n] for n in arg_names]
        self.aux_arrays = [self.aux_dict[n] for n in aux_names]

    def _check_random(self) -> None:
        """Find the segments that draw random numbers; refuse them unless the plan replays
        their draws (NOTE [ replaying random draws in re-run segments ])."""
        self._random_segments = frozenset(i for i, sym in enumerate(self.symbols) if _draws_random(sym))
        # A kept segment runs its forward once (NOTE [ selective segments ]): nothing to replay.
        if self._random_segments - set(self.plan.kept) and not self.plan.replay_random:
            raise BackendError(
                "this segment plan re-runs segments that draw random numbers (Dropout) without "
                "replaying their draws: backward would differentiate masks forward never used. "
                "Plan with recompute_dropout=True, or use backend='mirror'")
        self._seeds: Optional[List[int]] = None

    # NOTE [ outputs outlive the re-runs ]
    # The last executor's outputs live in the shared pool, which the backward re-runs of the
    # earlier segments write over (measured: a language model's softmax output changed by
    # up to 2e-2 after backward when the last segment was the loss alone).  Module reads
    # outputs after backward (metrics), so with several segments they are copied into
    # arrays of the chain's own in forward (:attr:`ChainLayout.outputs`), and the static
    # figure counts them.
    def _output_arrays(self) -> List["mx.nd.NDArray"]:
        """The arrays :attr:`outputs` are: the head's, the chain's copies, or the executor's."""
        if self.head is not None:
            return [self.head.output]
        if self.layout.outputs:
            return [_zeros(spec.shape, self.ctx, spec.dtype) for spec in self.layout.outputs]
        return self._executor(self.plan.count - 1).outputs

    def _executor(self, index: int) -> "mx.executor.Executor":
        """The bound executor of segment ``index`` (gathering segments have none)."""
        executor = self.execs[index]
        if executor is None:
            raise ValueError(f"segment {index} gathers its inputs and runs no executor")
        return executor

    def _make_head(self) -> ChunkedHead:
        fc, softmax, data, weight, bias, label = head_parts(json.loads(self.symbol.tojson()), self.plan)
        rows, hidden = self.boundary[data].shape
        head = LossHead(fc["name"], softmax["name"], data, weight, bias, label, rows, hidden,
                        self.arg_dict[weight].shape[0], dict(fc.get("attrs") or {}),
                        dict(softmax.get("attrs") or {}))
        requests = {"weight": self._segment_req(weight)}
        if bias is not None:
            requests["bias"] = self._segment_req(bias)
        data_req = "add" if self._readers.get(boundary_name(data), 0) > 1 else "write"
        return ChunkedHead(head, self.plan.head_chunks, self.boundary[data], self.boundary_grad[data],
                           data_req, self.arg_dict[weight], self.arg_dict[bias] if bias else None,
                           self.arg_dict[label], self.grad_dict[weight],
                           self.grad_dict[bias] if bias else None, requests)

    # ---------------------------------------------------------------- binding
    def _allocate_boundaries(self) -> None:
        """Boundary value and gradient arrays as :attr:`layout` lists them (a gradient array per
        slot: NOTE [ boundary gradients share arrays ]; none for a boundary only gathering
        segments read: NOTE [ gathered steps ])."""
        self.boundary: Dict[Entry, "mx.nd.NDArray"] = {}
        self.boundary_grad: Dict[Entry, "mx.nd.NDArray"] = {}
        shared = {slot: _zeros(spec.shape, self.ctx, spec.dtype) for slot, spec in self.layout.slots.items()}
        for entry, spec in self.layout.values.items():
            self.boundary[entry] = _zeros(spec.shape, self.ctx, spec.dtype)
            self.boundary_grad[entry] = shared[self.layout.gradient_slot[entry]]
        self._entry_shapes = {entry: spec.shape for entry, spec in self.layout.boundaries.items()}

    def _segment_req(self, name: str) -> str:
        """Request of one segment argument or boundary (:func:`summed_request`)."""
        request = self._user_req[name] if name in self.arg_dict else "write"
        return summed_request(request, self._readers.get(name, 0))

    def _bind_one(self, index: int, shared_exec: Optional["mx.executor.Executor"]) -> "mx.executor.Executor":
        segment: SegmentSpec = self.plan.segments[index]
        sym = self.symbols[index]
        by_name = {boundary_name(e): e for e in segment.inputs}
        boundary_types = {name: self.boundary[by_name[source_name(name)]].dtype
                          for name in sym.list_arguments() if source_name(name) in by_name}
        ungraded = ungraded_boundaries(sym, boundary_types)  # NOTE [ boundaries that get no gradient ]
        args, grads, requests = {}, {}, {}
        for name in sym.list_arguments():
            source = source_name(name)  # NOTE [ one variable per reader ]
            if source in by_name:
                args[name] = self.boundary[by_name[source]]
                grads[name] = self.boundary_grad[by_name[source]]
            else:
                args[name] = self.arg_dict[source]
                grads[name] = self.grad_dict[source]
            requests[name] = "null" if name in ungraded else self._segment_req(source)
            if grads[name] is None or requests[name] == "null":
                requests[name] = "null"
                del grads[name]
        aux = {name: self.aux_dict[name] for name in sym.list_auxiliary_states()}
        # NOTE [ a match range per segment ] in core/segments/pool.py: nnvm reads it at this bind.
        with environment(match_range_variables(segment.match_range)):
            return sym.bind(self.ctx, args, args_grad=grads, grad_req=requests, aux_states=aux,
                            shared_exec=shared_exec)

    @property
    def pool_owner(self) -> "mx.executor.Executor":
        """The executor whose memory pool the segments share."""
        return self.execs[self._owner_index]

    @property
    def executors(self) -> List["mx.executor.Executor"]:
        """The bound executors, in segment order (gathering segments have none)."""
        return [e for e in self.execs if e is not None]

    def _bind_all(self, shared_exec: Optional["mx.executor.Executor"] = None) -> None:
        """Bind the segment with the largest working set first: it owns the pool (MXNet's
        shared_exec takes blocks from the owner's pool, largest first), or shares
        ``shared_exec``'s pool (another bucket) and passes it on."""
        variables = cap_variables(self.plan.grad_sum_cap)
        # Largest first: blocks appended to the owner's pool by a large segment can then be
        # reused by the smaller ones (MXNet takes the smallest free block that fits).
        shared = self.plan.bind_order(self.gathers)
        kept = [i for i in self.plan.kept if i not in self.gathers]
        self._owner_index = shared[0] if shared else kept[0]
        with environment(variables):
            if shared:
                owner = self._bind_one(shared[0], shared_exec)
                self.execs[shared[0]] = owner
                for index in shared[1:]:
                    self.execs[index] = self._bind_one(index, owner)
            # NOTE [ selective segments ] in core/segments/selective.py: a kept segment's pool
            # holds its activations from its forward to its backward, so it shares no pool.
            for index in kept:
                self.execs[index] = self._bind_one(index, None)
        # Variables read by several segments sum their gradients: cleared before each backward
        # unless the user asked for 'add'.
        self._zeroed: List["mx.nd.NDArray"] = [
            grad for n, count in self._readers.items()
            if count > 1 and (grad := self.grad_dict.get(n)) is not None
            and self._user_req[n] in ("write", "inplace")]
        self._zeroed += [self.boundary_grad[e] for e in self.boundary
                         if self._readers.get(boundary_name(e), 0) > 1]

    # --------------------------------------------------------------- running
    # NOTE [ replaying random draws in re-run segments ]
    # A segment that draws random numbers (Dropout with p > 0, a sampler) would
    # draw new ones when backward re-runs its forward, and backward would then
    # differentiate masks forward never used.  MXNet 1.9.1 cannot save or
    # restore a generator's state, but ``mx.random.seed(seed, ctx)`` resets the
    # context's generators (the CPU's are shared by all CPU contexts) through
    # an engine operation ordered with the operators that read them, and an
    # executor's operators then draw the same numbers again: checked bit for
    # bit for CPU Dropout (MXNet's kernel, MKLDNN build) over repeated forwards
    # and across executors.  So, with ``plan.replay_random`` (the
    # ``recompute_dropout`` option), a training forward first draws k + 2
    # integers from the user's stream (``mx.nd.random.randint`` on the chain's
    # context, read back: one small synchronisation per iteration), seeds the
    # context with the i-th before each segment that draws, and with the
    # (k+1)-th after the last segment; backward seeds the i-th again before
    # re-running segment i, and the (k+2)-th when it is done.  The masks are a
    # deterministic function of the user's stream at forward (``mx.random.seed``
    # reproduces a run), and the user's stream advances deterministically,
    # but the draws are not those a plain Module would make at the same seed:
    # hence an option, off by default.  A chain whose segments draw nothing
    # never touches the stream.  GPU: cuDNN's dropout keeps a state of its own,
    # so such plans bind Dropout with ``cudnn_off=True`` there (NOTE [ BatchNorm
    # in re-run segments ]); untested on hardware.
    def _draw_seeds(self) -> List[int]:
        count = self.plan.count + 2
        values = mx.nd.random.randint(1, SEED_LIMIT, shape=(count,), ctx=self.ctx, dtype="int64")
        return [int(v) for v in values.asnumpy()]

    def _seed(self, seed: int) -> None:
        mx.random.seed(seed, ctx=self.ctx)

    def forward(self, is_train: bool = False, **kwargs: Any) -> List["mx.nd.NDArray"]:
        """Run every segment, keeping only the boundary tensors (NOTE [ replaying random draws
        in re-run segments ] for networks that draw random numbers)."""
        for name, value in kwargs.items():
            self.arg_dict[name][:] = value
        replay = bool(is_train and self._random_segments)
        seeds = self._draw_seeds() if replay else []
        self._seeds = seeds if replay else None
        last = self.plan.count - 1
        for index, executor in enumerate(self.execs):
            if executor is None:
                continue  # a gathering segment: its inputs were placed as they were computed
            if replay and index in self._random_segments:
                self._seed(seeds[index])
            executor.forward(is_train=is_train)
            if index < last:
                for entry, output in zip(self.plan.segments[index].outputs, executor.outputs):
                    for segment, begin, end in self.gathered.get(entry, ()):
                        layout = self.gathers[segment]
                        target = self._gather_view(segment, self.boundary)
                        invoke("_slice_assign", [target, output.reshape(layout.piece_shape(begin, end))],
                                [target], layout.region(begin, end))
                    if entry in self.boundary:
                        output.copyto(self.boundary[entry])
        if self.head is not None:
            self.head.forward(is_train)
        elif self.outputs is not self._executor(last).outputs:
            for output, kept in zip(self._executor(last).outputs, self.outputs):
                output.copyto(kept)  # NOTE [ outputs outlive the re-runs ]
        if replay:
            self._seed(seeds[-2])
        self._last_state_valid = bool(is_train)
        return self.outputs

    def _rerun(self, index: int) -> None:
        """Forward of segment ``index`` again, drawing what the training forward drew."""
        if index in self._random_segments:
            if self._seeds is None:
                raise BackendError("backward re-runs segments that draw random numbers and needs the "
                                   "draws of a training forward: call forward(is_train=True) first")
            self._seed(self._seeds[index])
        self._executor(index).forward(is_train=True)

    def backward(self, out_grads: Optional[Sequence["mx.nd.NDArray"]] = None,
                 is_train: bool = True) -> None:
        """Backward through the segments last to first, re-running each one's forward
        (the last one's and the kept ones' state is still that of :meth:`forward`)."""
        for array in self._zeroed:
            array[:] = 0
        last = self.plan.count - 1
        if isinstance(out_grads, mx.nd.NDArray):
            out_grads = [out_grads]
        if self.head is not None:
            # The head's output and input rows stay from forward (no re-run); SoftmaxOutput
            # ignores head gradients (out_grad=False, checked by loss_head).
            self.head.backward()
        else:
            if not self._last_state_valid:
                self._rerun(last)
            self._executor(last).backward(out_grads=list(out_grads) if out_grads else None,
                                          is_train=is_train)
        kept = set(self.plan.kept)
        for index in range(last - 1, -1, -1):
            if self.execs[index] is None:
                continue  # a gathering segment: its producers take their gradients' slices
            if index not in kept or not self._last_state_valid:
                self._rerun(index)  # a kept segment's pool still holds its training forward
            heads = [self._head_gradient(e) for e in self.plan.segments[index].outputs]
            self._executor(index).backward(out_grads=heads, is_train=is_train)
        if self._random_segments and self._seeds is not None:
            self._seed(self._seeds[-1])
        # The re-runs overwrote the shared pool: another backward must re-run the last segment.
        self._last_state_valid = False

    def _gather_view(self, segment: int, arrays: Mapping[Entry, "mx.nd.NDArray"]) -> "mx.nd.NDArray":
        """The merged tensor (value or gradient) of a gathering segment, in its concat shape."""
        return arrays[as_entry(self.plan.segments[segment].outputs[0])].reshape(self.gathers[segment].shape)

    def _head_gradient(self, entry: Entry) -> "mx.nd.NDArray":
        """The gradient of a segment output for its executor's backward (NOTE [ gathered steps ])."""
        places = self.gathered.get(entry, ())
        if not places:
            return self.boundary_grad[entry]
        shape = self._entry_shapes[entry]
        pieces = []
        for segment, begin, end in places:
            source = self._gather_view(segment, self.boundary_grad)
            piece = mx.nd.empty(self.gathers[segment].piece_shape(begin, end), ctx=self.ctx,
                                dtype=source.dtype)
            invoke("slice", [source], [piece], self.gathers[segment].region(begin, end))
            pieces.append(piece.reshape(shape))
        if entry in self.boundary_grad:
            for piece in pieces:
                self.boundary_grad[entry] += piece
            return self.boundary_grad[entry]
        total = pieces[0]
        for piece in pieces[1:]:
            total += piece
        return total

    def boundary_bytes(self) -> int:
        """Bytes of the chain's boundary arrays, its executors' head-gradient copies and the
        largest gathered slice (NOTE [ static memory of a segment plan ]), from the arrays
        themselves (the slice is a temporary: :meth:`ChainLayout.largest_slice_bytes`)."""
        arrays = {id(a): a for group in (self.boundary, self.boundary_grad) for a in group.values()}
        total = sum(_nbytes(a) for a in arrays.values())  # shared gradient arrays once
        last = self.plan.count - 1
        for index, executor in enumerate(self.execs):
            if executor is not None and index < last:
                total += sum(_nbytes(o) for o in executor.outputs)
        return total + self.layout.largest_slice_bytes()

    def allocated_bytes(self) -> int:
        """Bytes of every array the chain holds beside its executors' pool: :meth:`boundary_bytes`,
        the copies of the outputs and a chunked head's arrays (NOTE [ the chain's own arrays ])."""
        total = self.boundary_bytes()
        if self.head is not None:
            total += self.head.allocated_bytes()
        elif self.execs[-1] is None or self.outputs is not self.execs[-1].outputs:
            total += sum(_nbytes(o) for o in self.outputs)
        return total

    def copy_params_from(self, arg_params: Mapping[str, "mx.nd.NDArray"],
                         aux_params: Optional[Mapping[str, "mx.nd.NDArray"]] = None,
                         allow_extra_params: bool = False) -> None:
        """As ``Executor.copy_params_from``."""
        for name, array in arg_params.items():
            if name in self.arg_dict:
                array.astype(self.arg_dict[name].dtype).copyto(self.arg_dict[name])
            elif not allow_extra_params:
                raise ValueError(f"found name {name!r} that is not in the arguments")
        for name, array in (aux_params or {}).items():
            if name in self.aux_dict:
                array.astype(self.aux_dict[name].dtype).copyto(self.aux_dict[name])
            elif not allow_extra_params:
                raise ValueError(f"found name {name!r} that is not in the auxiliary states")

    def reshape(self, partial_shaping: bool = False, allow_up_sizing: bool = False,
                **kwargs: Any) -> "SegmentChain":
        """A chain for new input shapes that shares this one's parameters, gradients and aux.

        Only the shapes of data and label inputs may change (as ``Module.reshape``).
        """
        shapes = dict(self._input_shapes)
        shapes.update({k: tuple(v) for k, v in kwargs.items()})
        return SegmentChain(self.symbol, self.plan, self.ctx, shapes, self._type_dict,
                            self._user_req,
                            {"arg": self.arg_dict, "grad": self.grad_dict, "aux": self.aux_dict})

    def debug_str(self) -> str:
        """Each segment's ``debug_str`` (its own full plan; the pool union is not reported)."""
        text = "\n".join(e.debug_str() for e in self.executors)
        if self.head is not None:
            text += (f"\nChunked loss head ({len(self.head.ranges)} row chunks): "
                     f"{self.head.allocated_bytes() / 2 ** 20:.1f} MB allocated")
        return text

    def set_monitor_callback(self, callback: Any, monitor_all: bool = False) -> None:
        """Install a monitor callback on every segment executor."""
        for executor in self.executors:
            executor.set_monitor_callback(callback, monitor_all)

