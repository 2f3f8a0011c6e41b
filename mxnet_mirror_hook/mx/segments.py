"""Executor segments on MXNet: split a symbol by a :class:`~..core.segments.SegmentPlan`, bind a
chain of executors sharing one memory pool, and run forward/backward with recomputation.

See NOTE [ executor segments ] in :mod:`mxnet_mirror_hook.core.segments` for the scheme and
``shared/research/segment-executors.md`` for the measured MXNet facts it relies on.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from ..core.graph import draws_random
from ..core.segments import (MATCH_RANGES, Entry, LossHead, SegmentPlan, SegmentSpec,
                             gradient_slots, head_buffer_floats, head_chunk_rows, head_tile,
                             least_pool_choice, shared_pool_bytes)
from .. import env
from ..errors import BackendError, ShapeError
from .convert import MIRROR_ATTR
from .bind import environment

__all__ = ["executor_group_for", "boundary_name", "reader_name", "source_name", "segment_documents",
           "split_symbol", "SegmentChain", "GRAD_SUM_CAP_ENV", "DEFAULT_GRAD_SUM_CAP",
           "tune_match_ranges"]

logger = logging.getLogger(__name__)

# NOTE [ the gradient-sum cap is read once per process ]
# MXNET_EXEC_INPLACE_GRAD_SUM_CAP (gradients of a tensor with at least this many
# consumers are summed in place instead of by one ElementWiseSum) lowers the plan
# of short RNN segments a lot (bench LSTM, 20 segments: 102 MB at the default 8,
# 55 MB at 2).  MXNet 1.9.1 reads it into a function-level ``static`` the first
# time any gradient graph is built in the process (AggregateGradient in
# src/nnvm/gradient.cc), so setting it around the chain's binds only takes effect
# when they are the first in-process binds (planning binds run in worker
# processes), and then it also holds for every later bind of the process.  The
# segment figures are measured in a capture worker started with the cap
# (``get_capture_worker(variables)``), i.e. as the chain plans when the cap took
# effect; with per-reader variables (NOTE [ one variable per reader ]) weights no
# longer sum inside a segment and the cap matters less (bench LSTM, 14 segments:
# 24.6 MB with and without it).  The benchmark sets it before MXNet builds any graph.
GRAD_SUM_CAP_ENV = "MXNET_EXEC_INPLACE_GRAD_SUM_CAP"
DEFAULT_GRAD_SUM_CAP = 2


def boundary_name(entry: Entry) -> str:
    """Name of the variable that stands for a boundary tensor in the segments reading it."""
    return f"{entry[0]}_output{entry[1]}_segment_boundary"


_READER = re.compile(r"_segment_reader\d+$")


def reader_name(name: str, reader: int) -> str:
    """Name of the ``reader``-th copy of argument ``name`` in a segment (NOTE [ one variable per
    reader ])."""
    return f"{name}_segment_reader{reader}"


def source_name(name: str) -> str:
    """The argument a segment variable stands for (itself unless :func:`reader_name` made it)."""
    return _READER.sub("", name)


def segment_documents(document: Mapping[str, Any], plan: SegmentPlan,
                      rerun_cudnn_off: bool = False,
                      auxiliary: frozenset = frozenset()) -> List[Dict[str, Any]]:
    """JSON documents of the segment symbols (JSON surgery, NOTE [ splitting by JSON ]).

    # NOTE [ splitting by JSON ]
    # Symbol composition only substitutes free variables, so an internal output
    # cannot be replaced by a variable through the symbol API.  Instead each
    # segment is a new node list: its operators (original order, which is
    # topological), the variables they read, and one new variable per boundary
    # tensor it reads (placed first); inputs are re-indexed, ``arg_nodes`` and
    # ``heads`` rebuilt, and ``mx.sym.load_json`` parses the result.  Operators
    # listed in the segment's ``mirrored`` set get ``force_mirroring`` (two levels).
    #
    # NOTE [ BatchNorm in re-run segments ]
    # Every segment but the last runs its forward twice per iteration.  MXNet's
    # own BatchNorm kernels update the moving statistics in backward (checked
    # bit for bit on the CPU), cuDNN's in forward, which would update them twice.
    # With ``rerun_cudnn_off`` (set by SegmentChain on GPU contexts) BatchNorm
    # nodes of the re-run segments get ``cudnn_off=True``, as one-level mirrored
    # BatchNorm nodes do (NOTE [ BatchNorm recomputed ] in apply.py).  Untested on
    # hardware here (tests/api/test_gpu.py runs where a GPU is lent).
    # With ``rerun_cudnn_off`` and ``plan.replay_random``, every Dropout (in all
    # segments: the first forward must draw as the re-run does) gets
    # ``cudnn_off=True`` too: MXNet's own GPU Dropout draws from the context's
    # parallel generator, which ``mx.random.seed(seed, ctx)`` re-seeds; cuDNN's
    # dropout keeps its own state (NOTE [ replaying random draws in re-run
    # segments ]).
    """
    nodes = document["nodes"]
    index = {node["name"]: i for i, node in enumerate(nodes)}
    documents = []
    for segment in plan.segments:
        members = set(segment.nodes) | set(segment.variables)
        boundary = {(index[name], out): boundary_name((name, out)) for name, out in segment.inputs}
        new_nodes: List[Dict[str, Any]] = []
        new_index: Dict[Any, int] = {}
        for key, name in boundary.items():
            new_index[key] = len(new_nodes)
            new_nodes.append({"op": "null", "name": name, "inputs": []})
        for i, node in enumerate(nodes):
            if node["name"] not in members:
                continue
            copy = dict(node)
            inputs = []
            for source, out, *rest in node.get("inputs", []):
                if (source, out) in boundary:
                    inputs.append([new_index[(source, out)], 0, 0])
                else:
                    if source not in new_index:
                        raise ValueError(f"segment {segment.index}: node {node['name']!r} reads "
                                         f"{nodes[source]['name']!r}, which the segment neither "
                                         "computes nor receives; the plan does not fit this symbol")
                    inputs.append([new_index[source], out] + (rest or [0]))
            copy["inputs"] = inputs
            if node["op"] != "null":
                attrs = dict(node.get("attrs") or {})
                attrs.pop(MIRROR_ATTR, None)
                if node["name"] in segment.mirrored:
                    attrs[MIRROR_ATTR] = "True"
                    if node["op"] == "BatchNorm":
                        attrs["cudnn_off"] = "True"  # NOTE [ BatchNorm recomputed ] in apply.py
                rerun = segment.index < plan.count - 1
                if rerun_cudnn_off and rerun and node["op"] == "BatchNorm":
                    attrs["cudnn_off"] = "True"  # NOTE [ BatchNorm in re-run segments ]
                if rerun_cudnn_off and plan.replay_random and node["op"] == "Dropout":
                    attrs["cudnn_off"] = "True"  # seeded generator, not cuDNN's own state
                if attrs:
                    copy["attrs"] = attrs
                else:
                    copy.pop("attrs", None)
            new_index[i] = len(new_nodes)
            new_nodes.append(copy)
        heads = [[new_index[index[name]], out, 0] for name, out in segment.outputs]
        _slice_replayed_steps(new_nodes, heads)
        _one_variable_per_reader(new_nodes, heads, auxiliary)
        result = {"nodes": new_nodes,
                  "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
                  "heads": heads}
        if "attrs" in document:
            result["attrs"] = document["attrs"]
        documents.append(result)
    return documents


def _slice_replayed_steps(nodes: List[Dict[str, Any]], heads: List[List[int]]) -> None:
    """Embed only the steps a segment reads (in place on a segment's node list).

    # NOTE [ slicing the replayed embedding ]
    # An unrolled language model splits ``Embedding(data)`` into its steps
    # (``SliceChannel`` with ``squeeze_axis``).  Both are replayed by every
    # segment (NOTE [ executor segments ]), so each segment embedded the whole
    # sequence and, in backward, built the gradient of the whole embedding
    # (zeros for the steps it does not own): about 3 x batch x steps x embed
    # floats per segment (~19 MB of a 59 MB segment of the 2x512 bench language
    # model).  Here a segment reading steps lo..hi embeds ``slice_axis(data, lo,
    # hi + 1)`` and splits that.  The values are the same (a gather); the
    # embedding weight's gradient adds the same rows in the same order, minus
    # the zero rows.
    """
    def flag(value: Any) -> bool:
        return str(value).strip().lower() in ("true", "1")

    def readers(index: int) -> List[List[int]]:
        found = [ref for node in nodes for ref in node.get("inputs", []) if ref[0] == index]
        return found + [ref for ref in heads if ref[0] == index]

    position = 0
    while position < len(nodes):
        node = nodes[position]
        attrs = node.get("attrs") or {}
        position += 1
        if node["op"] != "SliceChannel" or not flag(attrs.get("squeeze_axis", "False")):
            continue
        split_index = position - 1
        embed_index, embed_out = node["inputs"][0][:2]
        embed = nodes[embed_index]
        axis = int(attrs.get("axis", 1))
        if embed["op"] != "Embedding" or embed_out != 0 or axis < 0:
            continue
        data_index = embed["inputs"][0][0]
        if nodes[data_index]["op"] != "null" or len(readers(embed_index)) != 1:
            continue
        used = sorted({ref[1] for ref in readers(split_index)})
        count = int(attrs["num_outputs"])
        if not used or (used[0] == 0 and used[-1] == count - 1):
            continue
        low, high = used[0], used[-1]
        # Insert slice_axis(data) just before the Embedding (topological order), shifting indices.
        for other in nodes:
            for ref in other.get("inputs", []):
                if ref[0] >= embed_index:
                    ref[0] += 1
        for ref in heads:
            if ref[0] >= embed_index:
                ref[0] += 1
        name = f"{nodes[data_index]['name']}_steps_{low}_{high}_of_{node['name']}"
        nodes.insert(embed_index, {"op": "slice_axis", "inputs": [[data_index, 0, 0]], "name": name,
                                   "attrs": {"axis": str(axis), "begin": str(low), "end": str(high + 1)}})
        embed["inputs"][0] = [embed_index, 0, 0]
        split_index += 1
        node["attrs"] = dict(attrs, num_outputs=str(high - low + 1))
        for ref in readers(split_index):
            ref[1] -= low
        position += 1


def _one_variable_per_reader(nodes: List[Dict[str, Any]], heads: List[List[int]],
                             auxiliary: frozenset) -> None:
    """Give each reader of an argument read several times its own variable (in place).

    # NOTE [ one variable per reader ]
    # MXNet sums the gradients of a variable read by several operators inside
    # the executor (``sum_grad`` nodes, src/nnvm/gradient.cc) and only then
    # writes or adds the sum to the gradient array: a running sum and the next
    # term live in the pool.  In an unrolled LSTM segment that is two arrays
    # per weight (2 x 4 MB for each of four 2048 x 512 weights: 20 of the 36 MB
    # of a five-step segment of the bench language model).  A segment already
    # adds its gradients to the chain's (a weight read by several segments is
    # bound with 'add'), so here every reader of such an argument gets a
    # variable of its own (``reader_name``), all bound to the same value and
    # gradient arrays with 'add' (``SegmentChain._segment_req`` counts readers):
    # each operator's backward adds its term into the gradient array (kAddTo)
    # and the pool holds no sums.  The terms are added in backward order one by
    # one instead of summed first, so the sum is rounded differently (as across
    # segments already).  Auxiliary states are left alone (read, not
    # differentiated).  MKLDNN's FullyConnected backward adds through a
    # temporary of the weight's size (its temp space, not MXNet's pool).
    """
    counts: Dict[int, int] = {}
    for node in nodes:
        for ref in node.get("inputs", []):
            counts[ref[0]] = counts.get(ref[0], 0) + 1
    shared = {i for i, node in enumerate(nodes)
              if node["op"] == "null" and counts.get(i, 0) > 1 and node["name"] not in auxiliary
              and not node["name"].endswith("_segment_boundary")}
    if not shared:
        return
    # Rebuild the list: every reader after the first gets its variable inserted just before
    # it (the list stays topologically ordered); old indices are mapped for the heads.
    rebuilt: List[Dict[str, Any]] = []
    moved: Dict[int, int] = {}
    used = {i: 0 for i in shared}
    for old, node in enumerate(nodes):
        if old in shared:
            moved[old] = len(rebuilt)
            rebuilt.append(dict(node, name=reader_name(node["name"], 0)))
            continue
        inputs = []
        for ref in node.get("inputs", []):
            source = ref[0]
            if source in shared and used[source] > 0:
                rebuilt.append(dict(nodes[source], name=reader_name(nodes[source]["name"], used[source])))
                inputs.append([len(rebuilt) - 1] + list(ref[1:]))
            else:
                inputs.append([moved[source]] + list(ref[1:]))
            if source in shared:
                used[source] += 1
        moved[old] = len(rebuilt)
        rebuilt.append(dict(node, inputs=inputs) if "inputs" in node else node)
    nodes[:] = rebuilt
    for ref in heads:
        ref[0] = moved[ref[0]]


@dataclass(frozen=True)
class GatherLayout:
    """A segment that only places boundary tensors side by side (NOTE [ gathered steps ]).

    Attributes
    ----------
    shape : tuple of int
        Shape of the concatenation (the segment's output is that, reshaped row-major).
    axis : int
        Concatenation axis.
    pieces : tuple of (str, int, int)
        Per boundary variable: its name and its ``[begin, end)`` along ``axis``.
    """

    shape: Tuple[int, ...]
    axis: int
    pieces: Tuple[Tuple[str, int, int], ...]

    def piece_shape(self, begin: int, end: int) -> Tuple[int, ...]:
        """Shape of ``[begin, end)`` along the axis."""
        return tuple(end - begin if i == self.axis else d for i, d in enumerate(self.shape))

    def region(self, begin: int, end: int) -> Dict[str, str]:
        """``slice`` / ``_slice_assign`` parameters of ``[begin, end)`` along the axis."""
        low = tuple(begin if i == self.axis else None for i in range(len(self.shape)))
        high = tuple(end if i == self.axis else None for i in range(len(self.shape)))
        return {"begin": str(low), "end": str(high)}


_RESHAPES = frozenset({"Reshape", "reshape", "Flatten", "flatten"})
_CONCATS = frozenset({"Concat", "concat"})


def gather_layout(symbol: "mx.sym.Symbol", shapes: Mapping[str, Tuple[int, ...]]) -> Optional[GatherLayout]:
    """The :class:`GatherLayout` of a segment symbol made only of ``expand_dims``, one ``Concat``
    and a final row-major reshape over boundary variables each read once, else None."""
    document = json.loads(symbol.tojson())
    nodes = document["nodes"]
    if len(document["heads"]) != 1:
        return None
    index = document["heads"][0][0]
    while nodes[index]["op"] in _RESHAPES:
        index = nodes[index]["inputs"][0][0]
    concat = nodes[index]
    if concat["op"] not in _CONCATS:
        return None
    attrs = concat.get("attrs") or {}
    names = [n["name"] for n in nodes if n["op"] == "null"]
    if any(not n.endswith("_segment_boundary") for n in names) or len(set(names)) != len(names):
        return None
    sources = []
    for ref in concat["inputs"]:
        node, expanded = nodes[ref[0]], None
        if node["op"] == "expand_dims":
            expanded = int((node.get("attrs") or {}).get("axis", 0))
            node = nodes[node["inputs"][0][0]]
        if node["op"] != "null":
            return None
        sources.append((node["name"], expanded))
    if len({name for name, _ in sources}) != len(sources) or set(names) != {n for n, _ in sources}:
        return None
    ndim = len(shapes[sources[0][0]]) + (1 if sources[0][1] is not None else 0)
    axis = int(attrs.get("dim", 1))
    axis = axis + ndim if axis < 0 else axis
    pieces, offset, shape = [], 0, None
    for name, expanded in sources:
        piece = list(shapes[name])
        if expanded is not None:
            if (expanded + ndim if expanded < 0 else expanded) != axis:
                return None
            piece.insert(axis, 1)
        if len(piece) != ndim:
            return None
        if shape is None:
            shape = list(piece)
            shape[axis] = 0
        if [d for i, d in enumerate(piece) if i != axis] != [d for i, d in enumerate(shape) if i != axis]:
            return None
        pieces.append((name, offset, offset + piece[axis]))
        offset += piece[axis]
    shape[axis] = offset
    return GatherLayout(tuple(shape), axis, tuple(pieces))


def find_gathers(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"],
                 shapes: Mapping[str, Tuple[int, ...]]
                 ) -> Tuple[Dict[int, GatherLayout], Dict[Entry, List[Tuple[int, int, int]]], frozenset]:
    """The gathering segments of a split (NOTE [ gathered steps ]): their layouts by segment
    index, for each gathered boundary the ``(segment, begin, end)`` places it goes to, and the
    boundaries nothing but gathers read (they get no arrays of their own)."""
    gathers: Dict[int, GatherLayout] = {}
    for index in range(1, plan.count - 1):  # the first has nothing to gather, the last no reader
        layout = gather_layout(symbols[index], shapes)
        if layout is not None:
            gathers[index] = layout
    by_name = {boundary_name(e): e for s in plan.segments for e in s.inputs}
    gathered: Dict[Entry, List[Tuple[int, int, int]]] = {}
    for index, layout in gathers.items():
        for name, begin, end in layout.pieces:
            gathered.setdefault(by_name[name], []).append((index, begin, end))
    readers: Dict[Entry, set] = {}
    for segment in plan.segments:
        for entry in segment.inputs:
            readers.setdefault(tuple(entry), set()).add(segment.index)
    only = frozenset(e for e in gathered if readers.get(tuple(e), set()) <= set(gathers))
    return gathers, gathered, only


def reader_bindings(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"]) -> Dict[str, int]:
    """Bindings of each argument and boundary over a chain's segments (NOTE [ one variable
    per reader ]: a segment may bind one several times); a chunked head reads its segment's
    variables and inputs once."""
    readers: Dict[str, int] = {}
    for index, segment in enumerate(plan.segments):
        if plan.head_chunks and index == plan.count - 1:
            names = list(segment.variables) + [boundary_name(e) for e in segment.inputs]
        else:
            names = [source_name(n) for n in symbols[index].list_arguments()]
        for name in names:
            readers[name] = readers.get(name, 0) + 1
    return readers


def shareable_gradients(plan: SegmentPlan, gathers: Mapping[int, Any],
                        gathered: Mapping[Entry, Any], readers: Mapping[str, int]) -> List[Entry]:
    """Boundaries whose gradient array may be shared (NOTE [ boundary gradients share arrays ]
    in core/segments.py): bound once, so written with 'write', and not gathered."""
    merged = {tuple(e) for index in gathers for e in plan.segments[index].outputs}
    return [tuple(e) for e in plan.boundaries
            if readers.get(boundary_name(e), 0) == 1 and tuple(e) not in gathered
            and tuple(e) not in merged]


def split_symbol(symbol: "mx.sym.Symbol", plan: SegmentPlan,
                 rerun_cudnn_off: bool = False) -> List["mx.sym.Symbol"]:
    """The segment symbols of ``symbol`` under ``plan`` (see :func:`segment_documents`)."""
    document = json.loads(symbol.tojson())
    auxiliary = frozenset(symbol.list_auxiliary_states())
    return [mx.sym.load_json(json.dumps(d))
            for d in segment_documents(document, plan, rerun_cudnn_off, auxiliary)]


#: Seeds drawn for replayed segments are in [1, SEED_LIMIT) (``mx.random.seed`` takes a C int).
SEED_LIMIT = 2 ** 31 - 1


def _draws_random(symbol: "mx.sym.Symbol") -> bool:
    """Whether any operator of ``symbol`` draws random numbers in a training forward."""
    return any(node["op"] != "null" and draws_random(node["op"], node.get("attrs") or {})
               for node in json.loads(symbol.tojson())["nodes"])


def _zeros(shape: Tuple[int, ...], ctx: "mx.Context", dtype: Any) -> "mx.nd.NDArray":
    return mx.nd.zeros(shape, ctx=ctx, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _op_handle(name: str) -> Any:
    import ctypes

    from mxnet.base import _LIB, OpHandle, c_str, check_call

    handle = OpHandle()
    check_call(_LIB.NNGetOpHandle(c_str(name), ctypes.byref(handle)))
    return handle


def _invoke(op: str, inputs: Sequence["mx.nd.NDArray"], out: Sequence["mx.nd.NDArray"],
            attrs: Mapping[str, str]) -> None:
    """Run an operator (also a ``_backward_*`` one, which has no Python wrapper taking inputs)
    imperatively into the given outputs."""
    keys = list(attrs)
    mx.ndarray._internal._imperative_invoke(_op_handle(op).value, list(inputs), keys,
                                            [str(attrs[k]) for k in keys], list(out), False, True)


def _operator_attrs(attrs: Mapping[str, str]) -> Dict[str, str]:
    return {k: v for k, v in attrs.items() if not k.startswith("__")}


def summed_request(request: str, readers: int) -> str:
    """The gradient request a segment binds for a variable the user asked ``request`` of:
    'null' stays, a variable bound by several readers (segments, or readers inside one: NOTE [
    one variable per reader ]) sums its gradients ('add'), and 'inplace' is 'write'."""
    if request == "null":
        return "null"
    return "add" if readers > 1 else ("write" if request == "inplace" else request)


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
        # Everything the head holds is allocated here (so the static figure can count it exactly;
        # head_buffer_floats is the same sum from shapes alone).
        sizes = head_buffer_floats(rows, hidden, classes, chunks, data_req, self._w_req, self._b_req)
        self.output = mx.nd.zeros((rows, classes), ctx=ctx, dtype=dtype)
        self._work = mx.nd.zeros((sizes["work"],), ctx=ctx, dtype=dtype)
        self._one_hot = mx.nd.zeros((sizes["one_hot"],), ctx=ctx, dtype=dtype)
        self._data_work = (mx.nd.zeros((tile_rows, hidden), ctx=ctx, dtype=dtype)
                           if sizes["data_work"] else None)
        self._weight_work = (mx.nd.zeros((block, hidden), ctx=ctx, dtype=dtype)
                             if sizes["weight_work"] else None)
        self._bias_work = mx.nd.zeros((block,), ctx=ctx, dtype=dtype) if sizes["bias_work"] else None
        self._fc_attrs = _operator_attrs(head.fc_attrs)
        self._sm_attrs = _operator_attrs(head.softmax_attrs)

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
                _invoke("FullyConnected", [self.data[start:stop]] + fc_inputs, [work], self._fc_attrs)
                _invoke("SoftmaxOutput", [work, self.label[start:stop]], [self.output[start:stop]],
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
                _invoke("slice", [self.output], [grad],
                        {"begin": f"({low}, {start})", "end": f"({high}, {stop})"})
                _invoke("one_hot", [self.label[low:high] - start], [one_hot], {"depth": str(size)})
                _invoke("elemwise_sub", [grad, one_hot], [grad], {})
                _invoke("_mul_scalar", [grad], [grad], {"scalar": repr(scale)})
                if keep is not None:
                    _invoke("broadcast_mul", [grad, keep[low:high]], [grad], {})
                write_data = block_index == 0 and self.data_req == "write"
                write_weight = part_index == 0 and self._w_req == "write"
                write_bias = part_index == 0 and self._b_req == "write"
                data_out = self.data_grad[low:high] if write_data else self._data_work[:count]
                outputs = [data_out, self.weight_grad[start:stop] if write_weight
                           else self._weight_work[:size]]
                if self.bias is not None:
                    outputs.append(self.bias_grad[start:stop] if write_bias else self._bias_work[:size])
                _invoke("_backward_FullyConnected", [grad, self.data[low:high], weight], outputs, attrs)
                if not write_data:
                    target = self.data_grad[low:high]
                    target += self._data_work[:count]
                if self._w_req != "null" and not write_weight:
                    target = self.weight_grad[start:stop]
                    target += self._weight_work[:size]
                if self.bias is not None and self._b_req != "null" and not write_bias:
                    target = self.bias_grad[start:stop]
                    target += self._bias_work[:size]


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
    grad_sum_cap : int or None
        ``MXNET_EXEC_INPLACE_GRAD_SUM_CAP`` for the segment binds (None: MXNet's default).
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
                 grad_sum_cap: Optional[int] = DEFAULT_GRAD_SUM_CAP,
                 shared_arrays: Optional[Mapping[str, Mapping[str, "mx.nd.NDArray"]]] = None,
                 shared_exec: Optional["mx.executor.Executor"] = None) -> None:
        self.symbol, self.plan, self.ctx = symbol, plan, ctx
        self._input_shapes = dict(input_shapes)
        self._type_dict = {name: np.float32 for name in self._input_shapes}
        self._type_dict.update(type_dict or {})
        self._grad_sum_cap = grad_sum_cap
        arg_names = symbol.list_arguments()
        aux_names = symbol.list_auxiliary_states()
        requests = dict(grad_req or {})
        self._user_req = {name: requests.get(name, "null") for name in arg_names}
        arg_shapes, _, aux_shapes = symbol.infer_shape(**self._input_shapes)
        arg_types, _, aux_types = symbol.infer_type(**self._type_dict)
        if arg_shapes is None:
            raise ShapeError("the input shapes do not determine every argument's shape; give the "
                             "shapes of all data and label inputs")
        shared = shared_arrays or {}
        old_args, old_grads, old_aux = (shared.get("arg", {}), shared.get("grad", {}),
                                        shared.get("aux", {}))

        def reuse(old: Mapping[str, "mx.nd.NDArray"], name: str, shape, dtype):
            array = old.get(name)
            if array is not None and tuple(array.shape) == tuple(shape) and array.dtype == dtype:
                return array
            return _zeros(tuple(shape), ctx, dtype)

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

        # NOTE [ BatchNorm in re-run segments ]
        self.symbols = split_symbol(symbol, plan, rerun_cudnn_off=ctx.device_type == "gpu")
        # NOTE [ replaying random draws in re-run segments ]
        self._random_segments = frozenset(i for i, sym in enumerate(self.symbols) if _draws_random(sym))
        if self._random_segments and not plan.replay_random:
            raise BackendError(
                "this segment plan re-runs segments that draw random numbers (Dropout) without "
                "replaying their draws: backward would differentiate masks forward never used. "
                "Plan with recompute_dropout=True, or use backend='mirror'")
        self._seeds: Optional[List[int]] = None
        # Bindings of each argument and boundary (NOTE [ one variable per reader ]: a segment may
        # bind one several times); the chunked head reads its segment's variables once.
        self._readers = reader_bindings(plan, self.symbols)
        self._allocate_boundaries()
        # A chunked loss head is not an executor (NOTE [ chunked loss head ]).
        self.head: Optional[ChunkedHead] = self._make_head() if plan.head_chunks else None
        self.execs: List[Optional["mx.executor.Executor"]] = [None] * plan.executor_count()
        self._bind_all(shared_exec)
        self._last_state_valid = False
        # NOTE [ outputs outlive the re-runs ]
        # The last executor's outputs live in the shared pool, which the backward re-runs of the
        # earlier segments write over (measured: a language model's softmax output changed by
        # up to 2e-2 after backward when the last segment was the loss alone).  Module reads
        # outputs after backward (metrics), so with several segments they are copied into
        # arrays of the chain's own in forward, and the static figure counts them.
        if self.head is not None:
            self.outputs = [self.head.output]
        elif plan.count > 1:
            self.outputs = [mx.nd.zeros(o.shape, ctx=ctx, dtype=o.dtype) for o in self.execs[-1].outputs]
        else:
            self.outputs = self.execs[-1].outputs

    def _make_head(self) -> ChunkedHead:
        from ..core.segments import LossHead

        segment = self.plan.segments[-1]
        document = json.loads(self.symbol.tojson())
        nodes = {n["name"]: n for n in document["nodes"]}
        softmax = next(nodes[name] for name in segment.nodes if nodes[name]["op"] == "SoftmaxOutput")
        fc = next(nodes[name] for name in segment.nodes if nodes[name]["op"] == "FullyConnected")
        fc_attrs = dict(fc.get("attrs") or {})
        sm_attrs = dict(softmax.get("attrs") or {})
        inputs = document["nodes"]
        data = (inputs[fc["inputs"][0][0]]["name"], int(fc["inputs"][0][1]))
        weight = inputs[fc["inputs"][1][0]]["name"]
        bias = inputs[fc["inputs"][2][0]]["name"] if len(fc["inputs"]) > 2 else None
        label = next(n for n in segment.variables if n not in (weight, bias))
        rows, hidden = self.boundary[data].shape
        head = LossHead(fc["name"], softmax["name"], data, weight, bias, label, rows, hidden,
                        self.arg_dict[weight].shape[0], fc_attrs, sm_attrs)
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
        """Boundary value and gradient arrays, shapes inferred segment by segment; segments that
        only gather boundaries are found here (NOTE [ gathered steps ])."""
        self.boundary: Dict[Entry, "mx.nd.NDArray"] = {}
        self.boundary_grad: Dict[Entry, "mx.nd.NDArray"] = {}
        known_shapes = {n: a.shape for n, a in self.arg_dict.items()}
        known_types = {n: a.dtype for n, a in self.arg_dict.items()}
        outputs: Dict[Entry, Tuple[Tuple[int, ...], Any]] = {}
        for segment, sym in zip(self.plan.segments[:-1], self.symbols[:-1]):
            names = sym.list_arguments()
            shapes = {n: known_shapes[source_name(n)] for n in names if source_name(n) in known_shapes}
            types = {n: known_types[source_name(n)] for n in names if source_name(n) in known_types}
            _, out_shapes, _ = sym.infer_shape(**shapes)
            _, out_types, _ = sym.infer_type(**types)
            for entry, shape, dtype in zip(segment.outputs, out_shapes, out_types):
                name = boundary_name(entry)
                outputs[entry] = (tuple(shape), dtype)
                known_shapes[name], known_types[name] = tuple(shape), dtype
        self.gathers, self.gathered, gathered_only = find_gathers(self.plan, self.symbols, known_shapes)
        # NOTE [ boundary gradients share arrays ] in core/segments.py
        keys = {entry: (shape, np.dtype(dtype).name) for entry, (shape, dtype) in outputs.items()
                if entry not in gathered_only}
        slots = gradient_slots(self.plan, keys, shareable_gradients(
            self.plan, self.gathers, self.gathered, self._readers))
        shared: Dict[int, "mx.nd.NDArray"] = {}
        for entry, (shape, dtype) in outputs.items():
            if entry not in gathered_only:
                self.boundary[entry] = _zeros(shape, self.ctx, dtype)
                if slots[entry] not in shared:
                    shared[slots[entry]] = _zeros(shape, self.ctx, dtype)
                self.boundary_grad[entry] = shared[slots[entry]]
        self._entry_shapes = {entry: shape for entry, (shape, _) in outputs.items()}

    def _segment_req(self, name: str) -> str:
        """Request of one segment argument or boundary (:func:`summed_request`)."""
        request = self._user_req[name] if name in self.arg_dict else "write"
        return summed_request(request, self._readers.get(name, 0))

    def _bind_one(self, index: int, shared_exec: Optional["mx.executor.Executor"]) -> "mx.executor.Executor":
        segment: SegmentSpec = self.plan.segments[index]
        sym = self.symbols[index]
        by_name = {boundary_name(e): e for e in segment.inputs}
        args, grads, requests = {}, {}, {}
        for name in sym.list_arguments():
            source = source_name(name)  # NOTE [ one variable per reader ]
            if name in by_name:
                args[name] = self.boundary[by_name[name]]
                grads[name] = self.boundary_grad[by_name[name]]
            else:
                args[name] = self.arg_dict[source]
                grads[name] = self.grad_dict[source]
            requests[name] = self._segment_req(source)
            if grads[name] is None:
                requests[name] = "null"
                del grads[name]
        aux = {name: self.aux_dict[name] for name in sym.list_auxiliary_states()}
        # NOTE [ a match range per segment ] in core/segments.py: nnvm reads it at this bind.
        with environment(_match_range_variables(segment.match_range)):
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
        variables = _cap_variables(self._grad_sum_cap)
        # Largest first: blocks appended to the owner's pool by a large segment can then be
        # reused by the smaller ones (MXNet takes the smallest free block that fits).
        owner_index, *others = self.plan.bind_order(self.gathers)
        self._owner_index = owner_index
        with environment(variables):
            owner = self._bind_one(owner_index, shared_exec)
            self.execs[owner_index] = owner
            for index in others:
                self.execs[index] = self._bind_one(index, owner)
        # Variables read by several segments sum their gradients: cleared before each backward
        # unless the user asked for 'add'.
        self._zeroed = [self.grad_dict[n] for n, count in self._readers.items()
                        if count > 1 and n in self.grad_dict and self.grad_dict[n] is not None
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
        self._seeds = self._draw_seeds() if replay else None
        last = self.plan.count - 1
        for index, executor in enumerate(self.execs):
            if executor is None:
                continue  # a gathering segment: its inputs were placed as they were computed
            if replay and index in self._random_segments:
                self._seed(self._seeds[index])
            executor.forward(is_train=is_train)
            if index < last:
                for entry, output in zip(self.plan.segments[index].outputs, executor.outputs):
                    for segment, begin, end in self.gathered.get(entry, ()):
                        layout = self.gathers[segment]
                        target = self._gather_view(segment, self.boundary)
                        _invoke("_slice_assign", [target, output.reshape(layout.piece_shape(begin, end))],
                                [target], layout.region(begin, end))
                    if entry in self.boundary:
                        output.copyto(self.boundary[entry])
        if self.head is not None:
            self.head.forward(is_train)
        elif self.outputs is not self.execs[-1].outputs:
            for output, kept in zip(self.execs[-1].outputs, self.outputs):
                output.copyto(kept)  # NOTE [ outputs outlive the re-runs ]
        if replay:
            self._seed(self._seeds[-2])
        self._last_state_valid = bool(is_train)
        return self.outputs

    def _rerun(self, index: int) -> None:
        """Forward of segment ``index`` again, drawing what the training forward drew."""
        if index in self._random_segments:
            if self._seeds is None:
                raise BackendError("backward re-runs segments that draw random numbers and needs the "
                                   "draws of a training forward: call forward(is_train=True) first")
            self._seed(self._seeds[index])
        self.execs[index].forward(is_train=True)

    def backward(self, out_grads: Optional[Sequence["mx.nd.NDArray"]] = None,
                 is_train: bool = True) -> None:
        """Backward through the segments last to first, re-running each one's forward
        (the last one's state is still that of :meth:`forward`)."""
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
            self.execs[last].backward(out_grads=list(out_grads) if out_grads else None,
                                      is_train=is_train)
        for index in range(last - 1, -1, -1):
            if self.execs[index] is None:
                continue  # a gathering segment: its producers take their gradients' slices
            self._rerun(index)
            heads = [self._head_gradient(e) for e in self.plan.segments[index].outputs]
            self.execs[index].backward(out_grads=heads, is_train=is_train)
        if self._random_segments and self._seeds is not None:
            self._seed(self._seeds[-1])
        # The re-runs overwrote the shared pool: another backward must re-run the last segment.
        self._last_state_valid = False

    # NOTE [ gathered steps ]
    # An unrolled language model merges its steps' outputs into the classifier's
    # input (expand_dims + Concat + Reshape: the rows of an (N, T, H) tensor).  As
    # a segment of its own that is pure data movement, yet each step's output is
    # a boundary (value, gradient, the head-gradient copy of its executor) and
    # the merged tensor another (three copies again): 6 x N x T x H floats, and
    # the segment's own plan (the merged tensor and the split of its gradient).
    # A segment made only of expand_dims, one Concat and a row-major reshape of
    # boundaries (``gather_layout``) gets no executor: each producer's forward
    # writes its output straight into its place in the merged tensor's array
    # (``_slice_assign`` in place), and its backward takes its head gradient as
    # a slice of the merged tensor's gradient.  A step's output that other
    # segments read too keeps its arrays (the slice is added to its gradient).
    # The values are the same (copies); the gradients too (Concat's backward is
    # that slicing).  Counted in the static figure: the merged tensor's value and
    # gradient, the producers' head-gradient copies, and the largest slice.
    def _gather_view(self, segment: int, arrays: Mapping[Entry, "mx.nd.NDArray"]) -> "mx.nd.NDArray":
        """The merged tensor (value or gradient) of a gathering segment, in its concat shape."""
        return arrays[tuple(self.plan.segments[segment].outputs[0])].reshape(self.gathers[segment].shape)

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
            _invoke("slice", [source], [piece], self.gathers[segment].region(begin, end))
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
        largest gathered slice (NOTE [ static memory of a segment plan ])."""
        def size(a: "mx.nd.NDArray") -> int:
            return a.size * np.dtype(a.dtype).itemsize

        arrays = {id(a): a for group in (self.boundary, self.boundary_grad) for a in group.values()}
        total = sum(size(a) for a in arrays.values())  # shared gradient arrays once
        last = self.plan.count - 1
        for index, executor in enumerate(self.execs):
            if executor is not None and index < last:
                total += sum(size(o) for o in executor.outputs)
        slices = [4 * int(np.prod(self._entry_shapes[e])) for e in self.gathered]
        return total + max(slices, default=0)

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
                            self._user_req, self._grad_sum_cap,
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


class SegmentedExecutorGroup(mx.module.executor_group.DataParallelExecutorGroup):
    """``DataParallelExecutorGroup`` whose per-device executor is a :class:`SegmentChain`.

    Everything else (data slicing, parameter and gradient lists for the
    optimizer and kvstore, outputs, metrics) is the base class's: a chain
    offers the executor attributes it reads.

    Parameters
    ----------
    *args, **kwargs
        As for ``DataParallelExecutorGroup``.
    segment_plan : SegmentPlan
        The split (the same on every device: one chain per device).
    grad_sum_cap : int or None
        See :class:`SegmentChain`.
    """

    def __init__(self, *args: Any, segment_plan: SegmentPlan,
                 grad_sum_cap: Optional[int] = DEFAULT_GRAD_SUM_CAP, **kwargs: Any) -> None:
        self.segment_plan = segment_plan
        self.grad_sum_cap = grad_sum_cap
        super().__init__(*args, **kwargs)

    def _bind_ith_exec(self, i: int, data_shapes: Any, label_shapes: Any,
                       shared_group: Any) -> SegmentChain:
        input_shapes = dict(data_shapes)
        input_types = {x.name: x.dtype for x in data_shapes}
        if label_shapes is not None:
            input_shapes.update(dict(label_shapes))
            input_types.update({x.name: x.dtype for x in label_shapes})
        shared_arrays, shared_exec = None, None
        if shared_group is not None:
            # Another bucket: the same parameter, gradient and auxiliary arrays (as simple_bind's
            # shared_arg_names does) and its memory pool.
            other = shared_group.execs[i]
            params = set(self.param_names)
            shared_arrays = {
                "arg": {n: a for n, a in other.arg_dict.items() if n in params},
                "grad": {n: a for n, a in other.grad_dict.items() if n in params and a is not None},
                "aux": dict(other.aux_dict)}
            shared_exec = other.pool_owner if isinstance(other, SegmentChain) else other
        return SegmentChain(self.symbol, self.segment_plan, self.contexts[i], input_shapes,
                            input_types, self.grad_req, self.grad_sum_cap, shared_arrays, shared_exec)

    def install_monitor(self, mon: Any) -> None:
        """Install a monitor on every segment executor."""
        for chain in self.execs:
            mon.install(chain)


def segment_planned_mb(symbol: "mx.sym.Symbol", plan: SegmentPlan, ctx: "mx.Context",
                       shapes: Mapping[str, Tuple[int, ...]],
                       type_dict: Optional[Mapping[str, Any]] = None,
                       grad_req: Optional[Mapping[str, str]] = None,
                       grad_sum_cap: Optional[int] = DEFAULT_GRAD_SUM_CAP) -> Tuple[float, List[float]]:
    """Static memory of a segment plan in MB, and MXNet's planned MB of each segment.

    # NOTE [ static memory of a segment plan ]
    # Each segment symbol is bound on its own, in a capture worker started under
    # the gradient-sum cap (NOTE [ the gradient-sum cap is read once per process
    # ]), which reports MXNet's ``debug_str`` total and the executed graph; the
    # allocator model replays that into the segment's storage blocks (checked
    # against the total).  A segment's figure is measured once per structure
    # (NOTE [ segments planned once per structure ]).  The chain's executors
    # share one pool: the figure counts the pool MXNet builds from those blocks
    # in the chain's bind order (NOTE [ the shared pool's union ] in
    # core/segments.py), or the largest segment's plan when a segment's blocks
    # cannot be modelled (a lower bound, logged).  The bench reports the storage
    # profiler's peak beside this figure.  Boundaries are
    # counted ``HEAD_GRAD_COPIES`` times: value, gradient, and the head-gradient
    # copy the producing executor makes in ``backward``, the gradient once per
    # array boundaries share (NOTE [ boundary gradients share arrays ] in
    # core/segments.py); a boundary only gathering
    # segments read has the copy alone, the largest gathered slice is added and a
    # gathering segment plans nothing (NOTE [ gathered steps ]; the chain's own
    # count is ``SegmentChain.boundary_bytes``).  With several segments the
    # chain's copy of the outputs is added (NOTE [ outputs outlive the re-runs ]);
    # a chunked loss head adds the arrays it allocates instead (its output and work
    # buffers, ``ChunkedHead.allocated_bytes``; NOTE [ chunked loss head ]).
    #
    # Binds run in a worker, not in the planning process: every MXNet bind keeps
    # native memory no release frees (NOTE [ why measurements run in a worker
    # process ] in worker.py), and BERT-base's 171 segment binds in process had
    # piled up 16-19 GB of argument arrays.  Only segments with ``Custom``
    # operators (registered in this process alone) are bound here, with a wait
    # after each bind so that their arrays are released before the next.
    """
    from ..core.segments import HEAD_GRAD_COPIES

    requests = dict(grad_req or {})
    known = _known_shapes(plan, shapes)
    variables = _cap_variables(grad_sum_cap)
    per_segment = []
    symbols = split_symbol(symbol, plan)
    gathers, gathered, gathered_only = find_gathers(plan, symbols, known)
    blocks: List[Optional[List[int]]] = []
    head_mb = _chunked_head_mb(symbols[-1], plan, known, requests) if plan.head_chunks else 0.0
    for index, sym in enumerate(symbols[:plan.executor_count()]):
        if index in gathers:
            per_segment.append(0.0)  # no executor (NOTE [ gathered steps ])
            blocks.append([])
            continue
        seg_shapes, seg_types, seg_req = _segment_bind_inputs(sym, known, type_dict, requests)
        mb, found = _segment_measure(sym, ctx, seg_shapes, seg_types, seg_req, variables,
                                     plan.segments[index].match_range)
        per_segment.append(mb)
        blocks.append(found)
    # Boundaries: value, gradient and the producer's head-gradient copy (HEAD_GRAD_COPIES); a
    # boundary only gathers read has the copy alone, and the largest gathered slice is added.
    # A gathering segment's output has no producing executor, so no copy.
    # Gradient arrays are counted once per shared slot (NOTE [ boundary gradients share arrays ]).
    entry_bytes = {tuple(e): 4 * int(np.prod(known[boundary_name(e)])) for e in plan.boundaries}
    merged = {tuple(e) for index in gathers for e in plan.segments[index].outputs}
    copies = {e: 1 if e in gathered_only else HEAD_GRAD_COPIES - (e in merged) for e in entry_bytes}
    keys = {e: (tuple(known[boundary_name(e)]), "float32") for e in entry_bytes if e not in gathered_only}
    slots = gradient_slots(plan, keys, shareable_gradients(plan, gathers, gathered,
                                                           reader_bindings(plan, symbols)))
    slot_bytes = {slots[e]: entry_bytes[e] for e in keys}
    boundary_mb = (sum((copies[e] - (e in keys)) * b for e, b in entry_bytes.items())
                   + sum(slot_bytes.values())
                   + max((entry_bytes[tuple(e)] for e in gathered), default=0)) / 2 ** 20
    pool_mb = _pool_mb(plan, per_segment, blocks, gathers)
    if plan.head_chunks:
        # The head's arrays are allocated by the chain, beside the executors' pool; its entry in
        # the per-segment list is 0 so that an executor segment owns the pool.
        return pool_mb + boundary_mb + head_mb, per_segment + [0.0]
    # The chain's copies of the outputs (NOTE [ outputs outlive the re-runs ]).
    output_mb = 0.0
    if plan.count > 1:
        last = symbols[-1]
        names = last.list_arguments()
        _, out_shapes, _ = last.infer_shape(**{n: known[source_name(n)] for n in names
                                                if source_name(n) in known})
        output_mb = sum(4 * int(np.prod(shape)) for shape in out_shapes) / 2 ** 20
    return pool_mb + boundary_mb + output_mb, per_segment


def _segment_bind_inputs(symbol: "mx.sym.Symbol", known: Mapping[str, Tuple[int, ...]],
                         type_dict: Optional[Mapping[str, Any]], requests: Mapping[str, str]
                         ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Any], Dict[str, str]]:
    """Shapes, types and gradient requests a segment symbol is measured with."""
    names = symbol.list_arguments()
    shapes = {n: known[source_name(n)] for n in names if source_name(n) in known}
    types = {n: np.dtype(np.float32) for n in names if n.endswith("_segment_boundary")}
    types.update({n: (type_dict or {})[source_name(n)] for n in names
                  if source_name(n) in (type_dict or {})})
    req = {n: ("write" if n.endswith("_segment_boundary") else requests.get(source_name(n), "null"))
           for n in names}
    return shapes, types, req


def _segment_measure(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, Tuple[int, ...]],
                     types: Mapping[str, Any], requests: Mapping[str, str],
                     variables: Mapping[str, str], match_range: int = 0
                     ) -> Tuple[float, Optional[List[int]]]:
    """:func:`_measure_segment` once per structure (NOTE [ segments planned once per structure ])."""
    key = _segment_key(symbol, ctx, shapes, types, requests, variables, match_range)
    if key not in _SEGMENT_MB:
        _SEGMENT_MB[key] = _measure_segment(symbol, ctx, shapes, types, requests, variables, match_range)
        while len(_SEGMENT_MB) > _SEGMENT_MB_LIMIT:
            _SEGMENT_MB.pop(next(iter(_SEGMENT_MB)))
    return _SEGMENT_MB[key]


def tune_match_ranges(symbol: "mx.sym.Symbol", plan: SegmentPlan, ctx: "mx.Context",
                      shapes: Mapping[str, Tuple[int, ...]],
                      type_dict: Optional[Mapping[str, Any]] = None,
                      grad_req: Optional[Mapping[str, str]] = None,
                      grad_sum_cap: Optional[int] = DEFAULT_GRAD_SUM_CAP,
                      ranges: Sequence[int] = MATCH_RANGES) -> SegmentPlan:
    """``plan`` with the match range of each executor segment that makes the shared pool least
    (NOTE [ a match range per segment ] in core/segments.py).

    Each executor segment is measured under each of ``ranges``; a range whose blocks the
    allocator model cannot reproduce is not a choice, and a segment with no modelled range
    keeps its own.  Gathering segments and a chunked head run no executor (range 0).
    """
    requests = dict(grad_req or {})
    known = _known_shapes(plan, shapes)
    variables = _cap_variables(grad_sum_cap)
    symbols = split_symbol(symbol, plan)
    gathers, _, _ = find_gathers(plan, symbols, known)
    executors = [i for i in range(plan.executor_count()) if i not in gathers]
    options = []
    for index in executors:
        bind_inputs = _segment_bind_inputs(symbols[index], known, type_dict, requests)
        measured = {r: _segment_measure(symbols[index], ctx, *bind_inputs, variables, r) for r in ranges}
        choices = {r: (mb, blocks) for r, (mb, blocks) in measured.items() if blocks is not None}
        if not choices:
            logger.info("segment %d keeps its match range: its blocks could not be modelled", index)
            own = plan.segments[index].match_range
            mb, blocks = _segment_measure(symbols[index], ctx, *bind_inputs, variables, own)
            choices = {own: (mb, blocks or [int(mb * 2 ** 20)])}
        options.append(choices)
    _, chosen = least_pool_choice(options)
    ranges_by_segment = [segment.match_range for segment in plan.segments]
    for index, value in zip(executors, chosen):
        ranges_by_segment[index] = int(value)
    return plan.with_match_ranges(ranges_by_segment)


def _known_shapes(plan: SegmentPlan, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the inputs and of every boundary variable of ``plan``."""
    known = {name: tuple(shape) for name, shape in shapes.items()}
    for key, shape in plan.boundary_shapes.items():
        name, _, out = key.rpartition(":")
        known[boundary_name((name, int(out)))] = tuple(shape)
    return known


def _measure_segment(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, Tuple[int, ...]],
                     types: Mapping[str, Any], requests: Mapping[str, str],
                     variables: Mapping[str, str], match_range: int = 0
                     ) -> Tuple[float, Optional[List[int]]]:
    """MXNet's planned MB of a segment and its storage blocks (None when they cannot be
    modelled; NOTE [ the shared pool's union ] in core/segments.py).

    Bound in a capture worker started under ``variables`` (the gradient-sum cap), which
    reports the planned MB and the executed graph the allocator model replays into blocks;
    the model's total must reproduce MXNet's or exceed it slightly (``debug_str`` rounds down
    to whole MB).  A
    symbol the workers cannot bind (``Custom`` operators) is bound in this process, which
    gives the MB only.
    """
    from ..core.allocator import AllocatorModel, ExecutedGraph
    from .measure import measures_in_process, planned_mb_in_process, worker_request
    from .worker import get_capture_worker

    text = symbol.tojson()
    if measures_in_process(text):
        with environment(dict(variables, **_match_range_variables(match_range))):
            mb = planned_mb_in_process(symbol, ctx, shapes, dict(types) or None, requests)
        mx.nd.waitall()  # the bind's arrays are allocated and released now, not piled up
        return mb, None
    reply = get_capture_worker(variables).exchange(
        worker_request(text, ctx, shapes, dict(types) or None, requests, capture=True,
                       match_range=match_range))
    graph = ExecutedGraph.from_dict(reply["executed"])
    mb = float(graph.measured_mb)
    found = AllocatorModel(graph).planned_blocks()
    # debug_str's total is whole MB (rounded down).  The model may plan a little more than
    # MXNet where it does not know an in-place rule (up to ~3% on segments of unrolled steps
    # whose outputs are merged): its blocks then over-count the pool, which is kept; blocks
    # that under-count are not.
    if not 0 <= sum(found) / 2 ** 20 - mb < 1 + 0.05 * mb:
        logger.debug("allocator model %.2f MB against MXNet's %.0f MB: blocks not used",
                     sum(found) / 2 ** 20, mb)
        return mb, None
    return mb, found


def _pool_mb(plan: SegmentPlan, per_segment: Sequence[float], blocks: Sequence[Optional[List[int]]],
             gathers: Mapping[int, Any]) -> float:
    """MB of the chain's shared pool: the union of the executor segments' blocks in the order
    the chain binds them (NOTE [ the shared pool's union ]), or, when some segment's blocks are
    unknown, the largest segment's plan (a lower bound, logged)."""
    measured = list(per_segment) + [0.0] * (plan.count - len(per_segment))  # a chunked head: 0
    order = plan.with_working_bytes([int(m * 2 ** 20) for m in measured]).bind_order(gathers)
    if any(blocks[i] is None for i in order):
        logger.info("the shared pool of the segment chain is counted as its largest segment's plan "
                    "(a lower bound): some segment's storage blocks could not be modelled")
        return max(per_segment)
    return shared_pool_bytes([blocks[i] for i in order]) / 2 ** 20


# NOTE [ segments planned once per structure ]
# An unrolled network's segments are mostly the same operators on other
# steps: the 21 segments of the vocabulary-10000 language model are four
# distinct graphs, and a bucket of another length repeats them again.  MXNet's
# plan depends on the operators, their parameters, the edges and the shapes,
# types and gradient requests of the variables, not on names; so a segment's
# planned MB is kept under a key of exactly those (names replaced by positions)
# and bound once per process.  The key also holds the context and the
# environment the bind runs under (the gradient-sum cap).
_SEGMENT_MB: Dict[str, Tuple[float, Optional[List[int]]]] = {}
_SEGMENT_MB_LIMIT = 4096


def _segment_key(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, Tuple[int, ...]],
                 types: Mapping[str, Any], requests: Mapping[str, str],
                 environment_vars: Mapping[str, str], match_range: int = 0) -> str:
    """Name-free key of a segment bind (NOTE [ segments planned once per structure ])."""
    environment_vars = dict(environment_vars, **_match_range_variables(match_range))
    document = json.loads(symbol.tojson())
    nodes = []
    for node in document["nodes"]:
        if node["op"] == "null":
            name = node["name"]
            dtype = types.get(name)
            nodes.append(["var", list(shapes.get(name, ())), np.dtype(dtype).name if dtype is not None
                          else None, requests.get(name, "null"), node.get("attrs", {})])
        else:
            attrs = dict(node.get("attrs", {}))
            if (node["op"] == "slice_axis" and attrs.get("end") not in (None, "None")
                    and int(attrs.get("begin", 0)) >= 0 and int(attrs["end"]) >= 0):
                # Which steps a segment embeds (NOTE [ slicing the replayed embedding ]) does not
                # change the plan; how many does.
                attrs["end"] = str(int(attrs["end"]) - int(attrs.get("begin", 0)))
                attrs["begin"] = "0"
            nodes.append([node["op"], attrs, [ref[:2] for ref in node["inputs"]]])
    text = json.dumps([nodes, document["heads"], str(ctx), sorted(environment_vars.items())],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cap_variables(grad_sum_cap: Optional[int]) -> Dict[str, str]:
    """The environment segments are bound and measured under for the gradient-sum cap (None:
    MXNet's default; NOTE [ the gradient-sum cap is read once per process ])."""
    return {GRAD_SUM_CAP_ENV: str(grad_sum_cap)} if grad_sum_cap else {}


def _match_range_variables(match_range: int) -> Dict[str, str]:
    """The environment a segment is bound under for its match range (0: none set)."""
    return {env.MATCH_RANGE: str(int(match_range))} if match_range else {}


def _chunked_head_mb(head_symbol: "mx.sym.Symbol", plan: SegmentPlan,
                     known: Mapping[str, Tuple[int, ...]], requests: Mapping[str, str]) -> float:
    """MB a :class:`ChunkedHead` allocates (output, work buffers), from the head's shapes."""
    names = head_symbol.list_arguments()
    shapes = {n: known[source_name(n)] for n in names if source_name(n) in known}
    _, out_shapes, _ = head_symbol.infer_shape(**shapes)
    rows, classes = out_shapes[0]
    data = [n for n in names if n.endswith("_segment_boundary")]
    hidden = known[data[0]][1]
    readers = sum(1 for s in plan.segments for e in s.inputs if boundary_name(e) == data[0])
    document = json.loads(head_symbol.tojson())
    fc = next(n for n in document["nodes"] if n["op"] == "FullyConnected")
    parameters = [document["nodes"][ref[0]]["name"] for ref in fc["inputs"][1:]]
    shared = plan.readers()
    request = {name: summed_request(requests.get(name, "null"), len(shared.get(name, [])))
               for name in parameters}
    weight_req = request[parameters[0]]
    bias_req = request[parameters[1]] if len(parameters) > 1 else "null"
    sizes = head_buffer_floats(rows, hidden, classes, plan.head_chunks,
                               "add" if readers > 1 else "write", weight_req, bias_req)
    return 4 * (rows * classes + sum(sizes.values())) / 2 ** 20


_SWAP_LOCK = threading.RLock()


@contextlib.contextmanager
def executor_group_for(segment_plan: Optional[SegmentPlan]) -> Iterator[None]:
    """While ``Module.bind`` runs, make it build a :class:`SegmentedExecutorGroup` for
    ``segment_plan`` (nothing changes for None).

    # NOTE [ swapping Module's executor group ]
    # ``Module.bind`` constructs ``DataParallelExecutorGroup`` by the name it
    # imported into ``mxnet.module.module``; replacing that name for the call is
    # the one way to give it another group without copying ``bind``.  The
    # replacement is a subclass (one segment chain per device), so everything
    # Module does with the group afterwards is unchanged.  The swap is
    # process-wide, so binds that swap are serialized by a lock.
    """
    if segment_plan is None:
        yield
        return
    import mxnet.module.module as module_module

    with _SWAP_LOCK:
        original = module_module.DataParallelExecutorGroup
        module_module.DataParallelExecutorGroup = functools.partial(SegmentedExecutorGroup,
                                                                    segment_plan=segment_plan)
        try:
            yield
        finally:
            module_module.DataParallelExecutorGroup = original
