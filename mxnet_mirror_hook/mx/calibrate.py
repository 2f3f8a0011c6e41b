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
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import mxnet as mx
import numpy as np

from ..core.cost import MeasuredCosts
from ..core.graph import Graph, Node, NodeKind
from ..errors import MeasurementError
from .bind import bind_symbol
from .timing import CLOCKS

__all__ = ["TABLE_FILE", "calibrate", "calibrated_costs", "table_costs", "measure_node", "call_overhead",
           "node_signature", "round_seconds"]

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
              clock: str = "wall") -> Optional[MeasuredCosts]:
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
        Timed rounds per operator (the least is kept).
    clock : str
        ``'wall'`` (elapsed) or ``'cpu'`` (this process's CPU time: on a machine shared with
        other work, with one OpenMP thread, what other processes disturb least).
    """
    from ..cache import get_cache
    from .convert import normalize_inputs, symbol_to_graph

    inputs = normalize_inputs(data_shapes, "data") + normalize_inputs(label_shapes, "label")
    graph = symbol_to_graph(symbol, inputs)
    return calibrated_costs(graph, ctx, get_cache(cache_dir).directory, repeats, clock)
