"""The static memory of a segment plan (NOTE [ static memory of a segment plan ]): each segment
measured once per structure, the shared pool, the chain's own arrays, and the match ranges
that make the pool least."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from ...core.segments.pool import MATCH_RANGES, least_pool_choice, shared_pool_bytes
from ...core.segments.plan import HEAD_GRAD_COPIES, SegmentPlan
from ...core.segments.head import head_buffer_floats
from ...core.segments.layout import gradient_slots
from ..bind import environment
from .environment import DEFAULT_GRAD_SUM_CAP, cap_variables, match_range_variables
from .gather import find_gathers
from .layout import reader_bindings, shareable_gradients, summed_request
from .split import boundary_name, source_name, split_symbol

__all__ = ["segment_planned_mb", "tune_match_ranges"]

logger = logging.getLogger(__name__)


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
    requests = dict(grad_req or {})
    known = _known_shapes(plan, shapes)
    variables = cap_variables(grad_sum_cap)
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
    variables = cap_variables(grad_sum_cap)
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
    from ...core.allocator import AllocatorModel, ExecutedGraph
    from ..measure import measures_in_process, planned_mb_in_process, worker_request
    from ..worker import get_capture_worker

    text = symbol.tojson()
    if measures_in_process(text):
        with environment(dict(variables, **match_range_variables(match_range))):
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
    environment_vars = dict(environment_vars, **match_range_variables(match_range))
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

