"""The static memory of a segment plan (NOTE [ static memory of a segment plan ]): each segment
measured once per structure, the shared pool, the chain's own arrays, and the match ranges
that make the pool least."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from ... import env
from ...core.allocator import DEFAULT_MATCH_RANGE
from ...core.segments.layout import ChainLayout
from ...core.segments.plan import SegmentPlan
from ...core.segments.pool import MATCH_RANGES, least_pool_choice, mixed_pool_bytes
from ..bind import environment
from ..worker import CAPTURE_SLOTS
from .environment import cap_variables, match_range_variables
from .layout import argument_types, chain_layout, infer_arguments, tensor_spec
from .split import boundary_name, source_name, split_symbol

__all__ = ["segment_planned_mb", "start_segment_planned_mb", "PendingSegmentFigure", "tune_match_ranges"]

logger = logging.getLogger(__name__)


def segment_planned_mb(symbol: "mx.sym.Symbol", plan: SegmentPlan, ctx: "mx.Context",
                       shapes: Mapping[str, Tuple[int, ...]],
                       type_dict: Optional[Mapping[str, Any]] = None,
                       grad_req: Optional[Mapping[str, str]] = None) -> Tuple[float, List[float]]:
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
    # core/segments/pool.py), or the largest segment's plan when a segment's blocks
    # cannot be modelled (a lower bound, logged).  The bench reports the storage
    # profiler's peak beside this figure.  The arrays the chain allocates beside
    # the pool (boundary values, their gradients once per shared array, the
    # producing executors' head-gradient copies, the largest gathered slice, and
    # the copy of the outputs or a chunked head's arrays) are counted from the
    # same :class:`ChainLayout` the chain allocates from, at each tensor's own
    # element size (NOTE [ the chain's own arrays ] in core/segments/layout.py;
    # the chain's count of its real arrays is ``SegmentChain.allocated_bytes``);
    # a gathering segment plans nothing (NOTE [ gathered steps ]).
    #
    # Binds run in a worker, not in the planning process: every MXNet bind keeps
    # native memory no release frees (NOTE [ why measurements run in a worker
    # process ] in worker.py), and BERT-base's 171 segment binds in process had
    # piled up 16-19 GB of argument arrays.  Only segments with ``Custom``
    # operators (registered in this process alone) are bound here, with a wait
    # after each bind so that their arrays are released before the next.
    """
    return start_segment_planned_mb(symbol, plan, ctx, shapes, type_dict, grad_req).result()


def start_segment_planned_mb(symbol: "mx.sym.Symbol", plan: SegmentPlan, ctx: "mx.Context",
                             shapes: Mapping[str, Tuple[int, ...]],
                             type_dict: Optional[Mapping[str, Any]] = None,
                             grad_req: Optional[Mapping[str, str]] = None) -> "PendingSegmentFigure":
    """:func:`segment_planned_mb` started: the segments' captures run in the background
    (NOTE [ segments captured two at a time ]); ``result()`` gives the figure."""
    requests = dict(grad_req or {})
    symbols = split_symbol(symbol, plan)
    layout, gathers = _figure_layout(symbol, plan, symbols, shapes, type_dict, requests)
    measures = _start_executors(plan, symbols, ctx, _BindInputs.of(plan, layout, shapes, type_dict, requests),
                                gathers, cap_variables(plan.grad_sum_cap))
    return PendingSegmentFigure(plan, layout, gathers, measures)


class PendingSegmentFigure:
    """A segment plan's static figure being measured (:func:`start_segment_planned_mb`)."""

    def __init__(self, plan: SegmentPlan, layout: ChainLayout, gathers: Mapping[int, Any],
                 measures: List["Future[_Measured]"]) -> None:
        self._plan, self._layout, self._gathers, self._measures = plan, layout, gathers, measures

    def result(self) -> Tuple[float, List[float]]:
        """Static memory in MB and MXNet's planned MB of each segment (as
        :func:`segment_planned_mb`).

        Raises
        ------
        MeasurementError
            The first segment's (in chain order) whose bind failed.
        """
        plan, layout = self._plan, self._layout
        found = [measure.result() for measure in self._measures]
        per_segment = [mb for mb, _ in found]
        pool_mb = _pool_mb(plan, per_segment, [blocks for _, blocks in found], self._gathers)
        boundary_mb = layout.boundary_bytes() / 2 ** 20
        if plan.head_chunks:
            # The head's arrays are allocated by the chain, beside the executors' pool; its entry in
            # the per-segment list is 0 so that an executor segment owns the pool.
            return pool_mb + boundary_mb + layout.head_bytes() / 2 ** 20, per_segment + [0.0]
        # The chain's copies of the outputs (NOTE [ outputs outlive the re-runs ]).
        return pool_mb + boundary_mb + layout.output_bytes() / 2 ** 20, per_segment


def _figure_layout(symbol: "mx.sym.Symbol", plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"],
                   shapes: Mapping[str, Tuple[int, ...]], type_dict: Optional[Mapping[str, Any]],
                   requests: Mapping[str, str]) -> Tuple[ChainLayout, Dict[int, Any]]:
    """The :class:`ChainLayout` a :class:`SegmentChain` bound with these inputs allocates, and
    its gathering segments (the same inference and the same function as the chain's)."""
    types = argument_types(shapes, type_dict)
    arg_shapes, arg_types, _, _ = infer_arguments(symbol, dict(shapes), types)
    arguments = {name: tensor_spec(shape, dtype)
                 for name, shape, dtype in zip(symbol.list_arguments(), arg_shapes, arg_types)}
    layout, gathers, _ = chain_layout(symbol, plan, symbols, arguments, requests)
    return layout, gathers


@dataclass(frozen=True)
class _BindInputs:
    """What segments are measured with: the shapes and element types of the inputs and of the
    boundary variables, and the user's gradient requests."""

    known: Mapping[str, Tuple[int, ...]]
    types: Mapping[str, Any]
    requests: Mapping[str, str]

    @classmethod
    def of(cls, plan: SegmentPlan, layout: ChainLayout, shapes: Mapping[str, Tuple[int, ...]],
           type_dict: Optional[Mapping[str, Any]], requests: Mapping[str, str]) -> "_BindInputs":
        """Inputs as given, boundaries as ``layout`` has them (their own element type)."""
        types = {boundary_name(e): spec.dtype for e, spec in layout.boundaries.items()}
        types.update(type_dict or {})
        return cls(_known_shapes(plan, shapes), types, requests)

    def of_segment(self, symbol: "mx.sym.Symbol"
                   ) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Any], Dict[str, str]]:
        """Shapes, types and gradient requests segment ``symbol`` is measured with."""
        names = symbol.list_arguments()
        shapes = {n: self.known[source_name(n)] for n in names if source_name(n) in self.known}
        types = {n: self.types[source_name(n)] for n in names if source_name(n) in self.types}
        req = {n: ("write" if n.endswith("_segment_boundary") else self.requests.get(source_name(n), "null"))
               for n in names}
        return shapes, types, req


_Measured = Tuple[float, Optional[List[int]]]


def _start_executors(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"], ctx: "mx.Context",
                     inputs: _BindInputs, gathers: Mapping[int, Any], variables: Mapping[str, str]
                     ) -> List["Future[_Measured]"]:
    """MXNet's planned MB and the storage blocks of each executor segment, started (a gathering
    segment plans nothing: NOTE [ gathered steps ])."""
    measures: List["Future[_Measured]"] = []
    for index, sym in enumerate(symbols[:plan.executor_count()]):
        if index in gathers:
            measures.append(_done((0.0, [])))
            continue
        measures.append(_start_segment_measure(sym, ctx, *inputs.of_segment(sym), variables,
                                               plan.segments[index].match_range))
    return measures


def _segment_measure(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, Tuple[int, ...]],
                     types: Mapping[str, Any], requests: Dict[str, str],
                     variables: Mapping[str, str], match_range: int = 0) -> _Measured:
    """:func:`_measure_segment` once per structure (NOTE [ segments planned once per structure ])."""
    return _start_segment_measure(symbol, ctx, shapes, types, requests, variables, match_range).result()


# NOTE [ segments captured two at a time ]
# A candidate's segments, and a segment under each match range, are independent
# binds; each used to wait for the one before it in the one capture worker of its
# environment, while the planning process sat idle (a 'min' + 'auto' plan of
# mobilenetv2_1.0: parent and workers never ran at once, wall = the sum of both).
# Now they are captured on ``CAPTURE_SLOTS`` workers of the same environment at
# once, from as many threads (each thread keeps its own worker), and the planning
# process goes on (splitting the next candidate, planning its pieces) until it
# needs the figures.  Which worker binds a symbol does not change its figure, and a
# figure is still bound once per structure: a structure being captured is waited
# for, not bound again.  Only the exchange with the worker and the allocator
# model's replay of its reply run in the threads; the symbol's JSON is written
# in the planning thread, and a symbol bound in this process (``Custom``
# operators) is bound there too, at once.
_THREADS: Optional[ThreadPoolExecutor] = None
_SLOT = threading.local()
_LOCK = threading.Lock()
_IN_FLIGHT: Dict[str, "Future[_Measured]"] = {}


def _capture_threads() -> ThreadPoolExecutor:
    """The process-wide threads that run captures, each on its own worker slot."""
    global _THREADS
    with _LOCK:
        if _THREADS is None:
            slots = itertools.count()

            def take_slot() -> None:
                _SLOT.index = next(slots)

            _THREADS = ThreadPoolExecutor(max_workers=CAPTURE_SLOTS, thread_name_prefix="mirror-capture",
                                          initializer=take_slot)
        return _THREADS


def _done(value: _Measured) -> "Future[_Measured]":
    future: "Future[_Measured]" = Future()
    future.set_result(value)
    return future


def _start_segment_measure(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, Tuple[int, ...]],
                           types: Mapping[str, Any], requests: Dict[str, str],
                           variables: Mapping[str, str], match_range: int = 0) -> "Future[_Measured]":
    """:func:`_measure_segment` once per structure, in a capture thread (NOTE [ segments captured
    two at a time ])."""
    from ..measure import measures_in_process

    text = symbol.tojson()
    key = _segment_key(text, ctx, shapes, types, requests, variables, match_range)
    with _LOCK:
        if key in _SEGMENT_MB:
            return _done(_SEGMENT_MB[key])
        if key in _IN_FLIGHT:
            return _IN_FLIGHT[key]
    if measures_in_process(text):
        _remember(key, _measure_segment(symbol, ctx, shapes, types, requests, variables, match_range))
        return _done(_SEGMENT_MB[key])
    args = (text, ctx, dict(shapes), dict(types), dict(requests), dict(variables), match_range)
    future = _capture_threads().submit(lambda: _measure_segment(*args, slot=getattr(_SLOT, "index", 0)))
    with _LOCK:
        _IN_FLIGHT[key] = future
    future.add_done_callback(lambda done: _settle(key, done))
    return future


def _settle(key: str, done: "Future[_Measured]") -> None:
    """A capture finished: its figure is kept (not a failure's), and it is no longer in flight."""
    if done.exception() is None:
        _remember(key, done.result())
    with _LOCK:
        _IN_FLIGHT.pop(key, None)


def _remember(key: str, value: _Measured) -> None:
    with _LOCK:
        _SEGMENT_MB[key] = value
        while len(_SEGMENT_MB) > _SEGMENT_MB_LIMIT:
            _SEGMENT_MB.pop(next(iter(_SEGMENT_MB)))


def tune_match_ranges(symbol: "mx.sym.Symbol", plan: SegmentPlan, ctx: "mx.Context",
                      shapes: Mapping[str, Tuple[int, ...]],
                      type_dict: Optional[Mapping[str, Any]] = None,
                      grad_req: Optional[Mapping[str, str]] = None,
                      ranges: Sequence[int] = MATCH_RANGES) -> SegmentPlan:
    """``plan`` with the match range of each executor segment that makes the shared pool least
    (NOTE [ a match range per segment ] in core/segments/pool.py).

    Each executor segment is measured under each of ``ranges``; a range whose blocks the
    allocator model cannot reproduce is not a choice, and a segment with no modelled range
    keeps its own.  Gathering segments and a chunked head run no executor (range 0).
    """
    requests = dict(grad_req or {})
    variables = cap_variables(plan.grad_sum_cap)
    symbols = split_symbol(symbol, plan)
    layout, gathers = _figure_layout(symbol, plan, symbols, shapes, type_dict, requests)
    inputs = _BindInputs.of(plan, layout, shapes, type_dict, requests)
    executors = [i for i in range(plan.executor_count()) if i not in gathers]
    started = {index: {r: _start_segment_measure(symbols[index], ctx, *inputs.of_segment(symbols[index]),
                                                 variables, r) for r in ranges} for index in executors}
    options = []
    for index in executors:
        bind_inputs = inputs.of_segment(symbols[index])
        measured = {r: measure.result() for r, measure in started[index].items()}
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


def _measure_segment(symbol: Union[str, "mx.sym.Symbol"], ctx: "mx.Context",
                     shapes: Mapping[str, Tuple[int, ...]], types: Mapping[str, Any],
                     requests: Dict[str, str], variables: Mapping[str, str], match_range: int = 0,
                     slot: int = 0) -> Tuple[float, Optional[List[int]]]:
    """MXNet's planned MB of a segment (a Symbol or its JSON text) and its storage blocks (None
    when they cannot be modelled; NOTE [ the shared pool's union ] in core/segments/pool.py).

    Bound in a capture worker started under ``variables`` (the gradient-sum cap), which
    reports the planned MB and the executed graph the allocator model replays into blocks;
    the model's total must reproduce MXNet's or exceed it slightly (``debug_str`` rounds down
    to whole MB).  A
    symbol the workers cannot bind (``Custom`` operators) is bound in this process, which
    gives the MB only.  ``slot``: which capture worker of the environment binds
    (NOTE [ segments captured two at a time ]).
    """
    from ...core.allocator import AllocatorModel, ExecutedGraph
    from .. import worker
    from ..measure import measures_in_process, planned_mb_in_process, worker_request

    text = symbol if isinstance(symbol, str) else symbol.tojson()
    if measures_in_process(text):
        loaded = mx.sym.load_json(text) if isinstance(symbol, str) else symbol
        with environment(dict(variables, **match_range_variables(match_range))):
            mb = planned_mb_in_process(loaded, ctx, shapes, dict(types) or None, requests)
        mx.nd.waitall()  # the bind's arrays are allocated and released now, not piled up
        return mb, None
    reply = worker.get_capture_worker(variables, slot).exchange(
        worker_request(text, ctx, shapes, dict(types) or None, requests, capture=True,
                       match_range=match_range))
    if reply.get("executed") is None:  # NOTE [ a figure without its graph ] in mx/text.py
        logger.debug("segment's executed graph cannot be read (%s): its plan counts whole",
                     reply.get("unreadable"))
        return float(reply["mb"]), None
    graph = ExecutedGraph.from_dict(reply["executed"])
    assert graph.measured_mb is not None  # a capture reply's graph carries MXNet's figure
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
    # Kept segments own their pools (NOTE [ selective segments ] in core/segments/selective.py).
    kept_mb = sum(per_segment[i] for i in plan.kept)
    ordered = [found for found in (blocks[i] for i in order) if found is not None]
    if len(ordered) < len(order):
        logger.info("the shared pool of the segment chain is counted as its largest segment's plan "
                    "(a lower bound): some segment's storage blocks could not be modelled")
        return max((per_segment[i] for i in order), default=0.0) + kept_mb
    kept: List[List[int]] = []
    for i in plan.kept:
        found = blocks[i]
        kept.append(found if found is not None else [int(per_segment[i] * 2 ** 20)])
    return mixed_pool_bytes(ordered, kept) / 2 ** 20


# NOTE [ segments planned once per structure ]
# An unrolled network's segments are mostly the same operators on other
# steps: the 21 segments of the vocabulary-10000 language model are four
# distinct graphs, and a bucket of another length repeats them again.  MXNet's
# plan depends on the operators, their parameters, the edges and the shapes,
# types and gradient requests of the variables, not on names; so a segment's
# planned MB is kept under a key of exactly those (names replaced by positions)
# and bound once per process.  The key also holds the context and the
# environment the bind runs under (the gradient-sum cap).  nnvm's default match
# range bound under its own value (16) is the bind under none set, when the
# environment sets none: one key.
_SEGMENT_MB: Dict[str, Tuple[float, Optional[List[int]]]] = {}
_SEGMENT_MB_LIMIT = 4096


def _segment_key(symbol: Union[str, "mx.sym.Symbol"], ctx: "mx.Context",
                 shapes: Mapping[str, Tuple[int, ...]], types: Mapping[str, Any], requests: Mapping[str, str],
                 environment_vars: Mapping[str, str], match_range: int = 0) -> str:
    """Name-free key of a segment bind (NOTE [ segments planned once per structure ])."""
    if (match_range == DEFAULT_MATCH_RANGE and env.MATCH_RANGE not in os.environ
            and env.MATCH_RANGE not in environment_vars):
        match_range = 0  # the same bind as under no match range set
    environment_vars = dict(environment_vars, **match_range_variables(match_range))
    document = json.loads(symbol if isinstance(symbol, str) else symbol.tojson())
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
