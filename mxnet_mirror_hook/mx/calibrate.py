"""Measured operator times for the cost model: each operator timed alone at the graph's shapes.

# NOTE [ calibrating the cost model ]
# What a plan costs is the forward time of what it recomputes over the time of
# one plain iteration, and only the device can say how long a kernel takes.
# Each operator node is bound alone (its inputs as variables at the graph's
# shapes and dtypes, the gradients the real graph asks for) and its forward and
# backward are timed: the least of a few rounds after one untimed round, the
# least being the figure other work on a shared machine disturbs least.  Nodes
# with the same operator, attributes, input shapes and dtypes are measured once.
#
# Plans must not flap with machine load, so the times are data, not a live
# measurement: each entry is rounded to two significant digits and cached per
# (operator, attributes, shapes, device, MXNet version) in ``calibration.json``
# in the plan cache directory; a later plan reads the table and never measures
# again, so the same table gives the same plan on every run.
#
# Calibration is opt-in and explicit: :func:`calibrate` (a network at its
# shapes, on the device the plans are for) measures and writes the table;
# planning never times anything, it only reads the table of its cache
# directory, and uses it when the table has every operator of the graph on the
# planning device (a partly covered graph keeps the analytic model whole,
# rather than mixing units).  Measuring costs tens of seconds per new network
# on this CPU, which a plan made cold with ``cache_dir=False`` must not pay, and
# the default plans stay what they were on machines that never calibrated.  On
# a GPU ``cost_ctx`` the operators are timed there; with no GPU visible the
# analytic model is kept with a warning (this machine has none: untested here).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import mxnet as mx
import numpy as np

from ..core.cost import MeasuredCosts, node_costs
from ..core.graph import Graph, Node, NodeKind
from ..errors import MeasurementError
from .bind import bind_symbol
from .timing import CLOCKS, bind_filled

__all__ = ["TABLE_FILE", "calibrate", "calibrated_costs", "profiled_costs", "table_costs", "measure_node",
           "call_overhead", "node_signature", "round_seconds"]

logger = logging.getLogger(__name__)

#: The cached table's file name in the plan cache directory.
TABLE_FILE = "calibration.json"
_DTYPES = {1: "uint8", 2: "float16", 4: "float32", 8: "float64"}
#: User attributes in a node's attrs that are not operator parameters.
_USER_ATTRS = ("mirror_stage", "force_mirroring", "ctx_group", "lr_mult", "wd_mult")


def round_seconds(seconds: float, digits: int = 2) -> float:
    """``seconds`` to ``digits`` significant digits (no finer than a tenth of a microsecond)."""
    if seconds <= 1e-7:
        return 0.0
    return float(f"{seconds:.{digits}g}")


def _operator_attrs(node: Node) -> Dict[str, str]:
    return {k: v for k, v in node.attrs.items()
            if not (k.startswith("__") and k.endswith("__")) and k not in _USER_ATTRS}


def _input_specs(graph: Graph, node: Node) -> List[Tuple[Tuple[int, ...], str, bool]]:
    """Shape, dtype and whether a gradient is asked, of each input of ``node``."""
    specs = []
    for source, output in node.inputs:
        producer = graph.nodes[source]
        shape = tuple(producer.output_shapes[output]) if output < len(producer.output_shapes) else ()
        specs.append((shape, _DTYPES.get(producer.itemsize, "float32"),
                      producer.kind not in (NodeKind.INPUT, NodeKind.AUX)))
    return specs


def node_signature(graph: Graph, node: Node, device: str) -> str:
    """The cache key of ``node``'s timing: operator, attributes, inputs, device, MXNet version."""
    text = json.dumps([node.op, sorted(_operator_attrs(node).items()), _input_specs(graph, node),
                       device, mx.__version__])
    return hashlib.sha1(text.encode()).hexdigest()


def _bind_alone(graph: Graph, node: Node, ctx: "mx.Context") -> Tuple[Any, bool]:
    """An executor of ``node`` alone, its inputs filled; and whether it has gradients to compute."""
    specs = _input_specs(graph, node)
    document = {"nodes": [{"op": "null", "name": f"in{i}", "inputs": []} for i in range(len(specs))]
                + [{"op": node.op, "name": "op", "attrs": _operator_attrs(node),
                    "inputs": [[i, 0, 0] for i in range(len(specs))]}],
                "arg_nodes": list(range(len(specs))), "heads": [[len(specs), 0, 0]],
                "attrs": {"mxnet_version": ["int", 10901]}}
    symbol = mx.sym.load_json(json.dumps(document))
    arguments = set(symbol.list_arguments())
    shapes = {f"in{i}": s[0] for i, s in enumerate(specs) if f"in{i}" in arguments}
    types = {f"in{i}": np.dtype(s[1]) for i, s in enumerate(specs) if f"in{i}" in arguments}
    requests = {f"in{i}": ("write" if s[2] else "null") for i, s in enumerate(specs) if f"in{i}" in arguments}
    executor = bind_symbol(symbol, ctx, shapes, types, requests)
    generator = np.random.RandomState(0)
    for name, array in list(executor.arg_dict.items()) + list(executor.aux_dict.items()):
        spec = specs[int(name[2:])] if name[2:].isdigit() else None
        # Data and labels in [0, 1) (class indices round down to 0); weights small; variances 1.
        array[:] = (generator.uniform(0, 1, array.shape) if spec is None or not spec[2]
                    else generator.normal(0, 0.01, array.shape))
    return executor, any(r == "write" for r in requests.values())


def measure_node(graph: Graph, node: Node, ctx: "mx.Context", repeats: int = 3,
                 clock: str = "wall") -> Tuple[float, float]:
    """Seconds of one forward and one backward of ``node`` alone (least of ``repeats`` rounds)
    on ``clock`` (:data:`~.timing.CLOCKS`), the cost of a call itself included."""
    executor, has_gradients = _bind_alone(graph, node, ctx)
    try:
        return _time_executor(executor, has_gradients, ctx, repeats, clock)
    finally:
        del executor


def call_overhead(ctx: "mx.Context", repeats: int = 3, clock: str = "wall") -> Tuple[float, float]:
    """Seconds of a forward and a backward call that compute nothing (a ReLU of one element).

    # NOTE [ the cost of a call alone ]
    # An operator timed alone pays a Python call into the executor and a wait
    # for the engine around its kernel, which in a bound graph it does not:
    # there the engine runs the next operator as soon as this one is done.  On
    # the unrolled 2x512 LSTM (hundreds of small operators) the raw times put
    # the recomputation of its 'min' plan at 37% where the CPU measured 31%
    # (the analytic count: 33%).  This call's cost is measured once per table
    # and taken off each operator's times (never below zero).
    """
    symbol = mx.sym.Activation(mx.sym.Variable("in0"), act_type="relu")
    executor = bind_symbol(symbol, ctx, {"in0": (1,)}, None, {"in0": "write"})
    try:
        return _time_executor(executor, True, ctx, repeats, clock)
    finally:
        del executor


def _time_executor(executor: Any, has_gradients: bool, ctx: "mx.Context", repeats: int,
                   clock: str) -> Tuple[float, float]:
    now = CLOCKS[clock]
    head_grads = [mx.nd.ones(out.shape, ctx=ctx, dtype=out.dtype) for out in executor.outputs]
    forward, backward = [], []
    for round_index in range(repeats + 1):
        started = now()
        executor.forward(is_train=True)
        mx.nd.waitall()
        middle = now()
        if has_gradients:
            executor.backward(head_grads)
            mx.nd.waitall()
        if round_index:
            forward.append(middle - started)
            backward.append(now() - middle)
    return min(forward), min(backward)


#: Parsed tables by path, with the modification time they were read at.
_TABLES: Dict[str, Tuple[float, Dict[str, List[float]]]] = {}


def _read_table(path: Optional[str]) -> Dict[str, List[float]]:
    if path is None or not os.path.exists(path):
        return {}
    try:
        stamp = os.path.getmtime(path)
        if path in _TABLES and _TABLES[path][0] == stamp:
            return dict(_TABLES[path][1])
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
        entries = {k: [float(x) for x in v] for k, v in table.get("entries", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        logger.warning("calibration table %s unreadable (%s); not used", path, error)
        return {}
    _TABLES[path] = (stamp, entries)
    return dict(entries)


def _write_table(path: Optional[str], entries: Mapping[str, List[float]]) -> None:
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump({"version": 1, "entries": dict(sorted(entries.items()))}, out)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("calibration table not saved to %s: %s", path, error)


def calibrated_costs(graph: Graph, ctx: Optional["mx.Context"] = None, directory: Optional[str] = None,
                     repeats: int = 3, clock: str = "wall") -> Optional[MeasuredCosts]:
    """Measured forward and backward seconds of every operator of ``graph`` on ``ctx``.

    Parameters
    ----------
    graph : Graph
        The forward graph (its shapes are the ones timed).
    ctx : mx.Context, optional
        The device the plan is for (CPU by default).
    directory : str, optional
        The plan cache directory holding ``calibration.json``; ``None`` keeps
        nothing (every call measures).
    repeats : int
        Timed rounds per operator (the least is kept).
    clock : str
        ``'wall'`` or ``'cpu'`` (:data:`~.timing.CLOCKS`).

    Returns
    -------
    MeasuredCosts or None
        ``None`` when ``ctx`` is a GPU and none is visible.
    """
    ctx = ctx or mx.cpu()
    if ctx.device_type == "gpu" and mx.context.num_gpus() <= ctx.device_id:
        logger.warning("calibration asked on %s, which is not visible; the analytic cost model is used", ctx)
        return None
    path = os.path.join(directory, TABLE_FILE) if directory else None
    entries = _read_table(path)
    forward: Dict[str, float] = {}
    backward: Dict[str, float] = {}
    measured = failed = 0
    started = time.perf_counter()
    # NOTE [ the cost of a call alone ]: measured once per table and device.
    overhead_key = f"call-overhead:{ctx.device_type}:{mx.__version__}"
    if overhead_key not in entries:
        entries[overhead_key] = list(call_overhead(ctx, repeats, clock))
    base = entries[overhead_key]
    for node in graph.op_nodes:
        key = node_signature(graph, node, ctx.device_type)
        if key not in entries:
            try:
                raw = measure_node(graph, node, ctx, repeats, clock)
                entries[key] = [round_seconds(max(0.0, t - b)) for t, b in zip(raw, base)]
                measured += 1
            except (MeasurementError, mx.base.MXNetError) as error:
                logger.debug("calibration: %s (%s) not timed alone: %s", node.name, node.op, error)
                failed += 1
                continue
        forward[node.name], backward[node.name] = entries[key]
    if measured:
        _write_table(path, entries)
    logger.info("calibration on %s: %d operators timed, %d from the table, %d not timed alone (%.1f s)",
                ctx, measured, len(forward) - measured, failed, time.perf_counter() - started)
    return MeasuredCosts(forward, backward, ctx.device_type)


def table_costs(graph: Graph, device: str, directory: Optional[str]) -> Optional[MeasuredCosts]:
    """The cached times of every operator of ``graph`` on ``device``, or None unless the table in
    ``directory`` has them all (planning reads, never measures: NOTE [ calibrating the cost model ])."""
    entries = _read_table(os.path.join(directory, TABLE_FILE) if directory else None)
    if not entries:
        return None
    forward: Dict[str, float] = {}
    backward: Dict[str, float] = {}
    for node in graph.op_nodes:
        times = entries.get(node_signature(graph, node, device))
        if times is None:
            logger.debug("calibration table lacks %s (%s): analytic cost model", node.name, node.op)
            return None
        forward[node.name], backward[node.name] = times
    return MeasuredCosts(forward, backward, device)


def calibrate(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None,
              ctx: Optional["mx.Context"] = None, cache_dir: Any = None, repeats: int = 3,
              clock: str = "wall", method: str = "profile") -> Optional[MeasuredCosts]:
    """Time every operator of ``symbol`` at these shapes on ``ctx`` and save the table where
    plans with ``cache_dir`` read it (NOTE [ calibrating the cost model ]).

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol.
    data_shapes, label_shapes : list of (str, tuple)
        As for :func:`plan_mirror`.
    ctx : mx.Context, optional
        The device the plans are for (``cost_ctx``); CPU by default.
    cache_dir : str, None or False
        The plan cache directory (as ``plan_mirror`` takes it); ``False`` keeps nothing.
    repeats : int
        Timed rounds per operator (the least is kept; ``method='alone'``).
    clock : str
        ``'wall'`` (elapsed) or ``'cpu'`` (this process's CPU time: on a machine shared with
        other work, with one OpenMP thread, what other processes disturb least; ``'alone'``).
    method : str
        ``'profile'``: each operator's time inside the plain training graph (NOTE [ operator
        times inside the graph ]); ``'alone'``: each operator bound and timed on its own.
    """
    from ..cache import get_cache
    from .convert import normalize_inputs, symbol_to_graph

    inputs = normalize_inputs(data_shapes, "data") + normalize_inputs(label_shapes, "label")
    graph = symbol_to_graph(symbol, inputs)
    directory = get_cache(cache_dir).directory
    if method == "alone":
        return calibrated_costs(graph, ctx, directory, repeats, clock)
    if method != "profile":
        raise ValueError(f"method must be 'profile' or 'alone', got {method!r}")
    ctx = ctx or mx.cpu()
    if ctx.device_type == "gpu" and mx.context.num_gpus() <= ctx.device_id:
        logger.warning("calibration asked on %s, which is not visible; the analytic cost model is used", ctx)
        return None
    profiled = profiled_costs(symbol, graph, {spec.name: spec.shape for spec in inputs}, ctx)
    # Every operator gets an entry (one the profile missed at the profile's own rate); nodes of one
    # signature share the mean of their times, as the table keeps them.
    forward = node_costs(graph, profiled)
    ratio = sum(profiled.backward.values()) / (sum(profiled.forward.values()) or 1.0)
    groups: Dict[str, List[float]] = {}
    keys = {node.name: node_signature(graph, node, ctx.device_type) for node in graph.op_nodes}
    for name, key in keys.items():
        groups.setdefault(key, []).append(forward[name])
    fresh = {key: [round_seconds(sum(times) / len(times)), round_seconds(ratio * sum(times) / len(times))]
             for key, times in groups.items()}
    if directory is not None:
        path = os.path.join(directory, TABLE_FILE)
        _write_table(path, dict(_read_table(path), **fresh))
    return MeasuredCosts({name: fresh[key][0] for name, key in keys.items()},
                         {name: fresh[key][1] for name, key in keys.items()}, ctx.device_type)


def profiled_costs(symbol: "mx.sym.Symbol", graph: Graph, shapes: Mapping[str, Tuple[int, ...]],
                   ctx: Optional["mx.Context"] = None, warmup: int = 2) -> MeasuredCosts:
    """Each operator's forward time inside the plain training graph, from MXNet's profiler.

    # NOTE [ operator times inside the graph ]
    # Timed alone, an operator pays what it does not pay in the graph (layout
    # conversions of MKLDNN around each call, the call itself): on
    # mobilenetv2_1.0 (batch 4, one thread) the isolated times put the 0.6 plan's
    # recomputation at 34% of an iteration where the CPU measured 24%.  One
    # plain training iteration profiled with bulk execution off gives one
    # operator event per node in execution order; the forward events are matched
    # to the graph's operators in order and by type (a node without its event is
    # left to the table's rate, NOTE [ measured operator times ]), and the
    # backward events' total is shared out in proportion to the forward times
    # (only the iteration's total is read).  Same network: 25% (22% in another
    # run) estimated, 24% measured; but not better than the analytic count on
    # every bench network (bench/RESULTS.md), and where the engine runs branches
    # out of the graph's order (inceptionv3, the unrolled LSTM) fewer events
    # match.  The profile runs in a fresh Python process (MXNet's profiler
    # writes one trace per process), and only when calibration is asked for.
    """
    ctx = ctx or mx.cpu()
    spans = _profiled_spans(symbol, shapes, ctx, warmup)
    forward_spans = [(name, seconds) for name, seconds in spans if not name.startswith("_backward")]
    backward_total = sum(seconds for name, seconds in spans if name.startswith("_backward"))
    forward: Dict[str, float] = {}
    position = 0
    for node in graph.op_nodes:
        while position < len(forward_spans) and forward_spans[position][0] != node.op:
            position += 1
        if position == len(forward_spans):
            break
        forward[node.name] = forward_spans[position][1]
        position += 1
    forward_total = sum(seconds for _, seconds in forward_spans) or 1.0
    backward = {name: seconds * backward_total / forward_total for name, seconds in forward.items()}
    logger.info("profiled iteration: %d of %d operators matched, forward %.3f s, backward %.3f s",
                len(forward), len(graph.op_nodes), forward_total, backward_total)
    return MeasuredCosts(forward, backward, ctx.device_type)


def _profiled_spans(symbol: "mx.sym.Symbol", shapes: Mapping[str, Tuple[int, ...]], ctx: "mx.Context",
                    warmup: int) -> List[Tuple[str, float]]:
    """``(operator, seconds)`` of every operator event of one plain training iteration, in start
    order, profiled in a fresh Python process: MXNet's profiler writes one trace per process (a
    second ``dump`` in the same process writes nothing), and its state is process-wide."""
    with tempfile.TemporaryDirectory() as directory:
        request = os.path.join(directory, "request.json")
        with open(request, "w", encoding="utf-8") as handle:
            json.dump({"symbol": symbol.tojson(), "shapes": {k: list(v) for k, v in shapes.items()},
                       "ctx": [ctx.device_type, ctx.device_id], "warmup": warmup,
                       "trace": os.path.join(directory, "profile.json")}, handle)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, MXNET_EXEC_BULK_EXEC_TRAIN="0", MXNET_EXEC_BULK_EXEC_INFERENCE="0")
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        done = subprocess.run([sys.executable, "-m", __name__, request], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise MeasurementError(f"profiling the plain iteration failed: {done.stderr.strip()[-300:]}")
        events = _read_events(os.path.join(directory, "profile.json"))
    opened: Dict[Any, List[Tuple[str, float]]] = {}
    spans = []
    for event in events:
        if event.get("cat") != "operator" or event.get("ph") not in ("B", "E"):
            continue
        stack = opened.setdefault(event.get("tid"), [])
        if event["ph"] == "B":
            stack.append((event["name"], float(event["ts"])))
        elif stack:
            name, begun = stack.pop()
            spans.append((begun, name, (float(event["ts"]) - begun) * 1e-6))
    return [(name, seconds) for _, name, seconds in sorted(spans)]


def _profile_request(path: str) -> None:
    """In the child: bind, warm up, profile one training iteration into the request's trace."""
    with open(path, encoding="utf-8") as handle:
        request = json.load(handle)
    symbol = mx.sym.load_json(request["symbol"])
    kind, index = request["ctx"]
    shapes = {k: tuple(v) for k, v in request["shapes"].items()}
    executor = bind_filled(symbol, mx.Context(kind, index), shapes)
    for _ in range(request["warmup"]):
        executor.forward(is_train=True)
        executor.backward()
        mx.nd.waitall()
    mx.profiler.set_config(profile_symbolic=True, profile_imperative=False, profile_memory=False,
                           profile_api=False, aggregate_stats=False, filename=request["trace"])
    mx.profiler.set_state("run")
    executor.forward(is_train=True)
    executor.backward()
    mx.nd.waitall()
    mx.profiler.set_state("stop")
    mx.profiler.dump(finished=True)


def _read_events(path: str, wait: float = 10.0) -> List[Dict[str, Any]]:
    """The trace events of the profiler's file; after the first dump of a process MXNet writes it
    from its own thread, so the file is read again until it parses (at most ``wait`` seconds)."""
    deadline = time.perf_counter() + wait
    while True:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().rstrip().rstrip(",")
        for candidate in (text, text + "\n]\n}"):
            try:
                return list(json.loads(candidate)["traceEvents"])
            except (ValueError, KeyError, TypeError):
                continue
        if time.perf_counter() > deadline:
            raise MeasurementError(f"MXNet's profiler did not write a readable trace to {path}")
        time.sleep(0.05)


if __name__ == "__main__":
    _profile_request(sys.argv[1])
