"""Capture MXNet's executed forward+backward graph of a bind, for the allocator model.

MXNet prints the graph it plans (operators with their entries and shapes) when
``MXNET_MEM_PLAN_VERBOSE_LOGGING`` is set, to the process's standard error;
``debug_str()`` gives the same operators with names and control dependencies.
Together they are :class:`~mxnet_mirror_hook.core.allocator.ExecutedGraph`
(NOTE [ replaying MXNet's memory plan ] in core/allocator.py).
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Dict, List, Mapping, Optional, Tuple

import mxnet as mx
import numpy as np

from .. import env
from ..core.allocator import DEFAULT_MATCH_RANGE, ExecutedGraph, ExecutedNode
from ..errors import MeasurementError
from .bind import GradReq, bind_symbol, environment, parse_planned_mb

__all__ = ["capture_executed_graph", "parse_executed_graph"]

_NODE = re.compile(r"exec_utils\.h:\d+: node (\d+) (\S+)")
_ENTRY = re.compile(r"(input|output) (\d+): \[([^\]]*)\] \(\d+ KB\)")
_OP = re.compile(r"Op:([^,]+), Name=(.*)$")
_REF = re.compile(r"\t(?:arg|cdep)\[\d+\]=(.*?)(?:\((\d+)\))?(?: version=\d+)?$")
_OUTPUT = re.compile(r"\toutput\[\d+\]=(.*)\((\d+)\)$")


def _parse_debug(text: str) -> Tuple[List[Tuple[str, str, List[str]]], List[Tuple[str, int]]]:
    """Operators ``(op, name, control-dependency names)`` and graph outputs ``(name, index)``."""
    operators: List[Tuple[str, str, List[str]]] = []
    outputs: List[Tuple[str, int]] = []
    section = None
    for line in text.splitlines():
        match = _OUTPUT.match(line)
        if match and not operators:
            outputs.append((match.group(1), int(match.group(2))))
            continue
        match = _OP.match(line)
        if match:
            operators.append((match.group(1), match.group(2), []))
            section = None
            continue
        if line.startswith("Control deps:"):
            section = "deps"
        elif not line.startswith("\t"):
            section = None
        elif section == "deps" and operators:
            ref = _REF.match(line)
            if ref:
                operators[-1][2].append(ref.group(1))
    return operators, outputs


def _parse_log(text: str) -> List[Tuple[str, List[int], List[Tuple[int, int]]]]:
    """Operators of the verbose memory log: ``(op, input entries, (output entry, bytes))``."""
    steps: List[Tuple[str, List[int], List[Tuple[int, int]]]] = []
    current = None
    for line in text.splitlines():
        match = _NODE.search(line)
        if match:
            op = match.group(2)
            current = None if op == "var" else (op, [], [])
            if current is not None:
                steps.append(current)
            continue
        match = _ENTRY.search(line)
        if match and current is not None:
            elements = 1
            for dim in match.group(3).split(","):
                if dim.strip():
                    elements *= int(dim)
            if match.group(1) == "input":
                current[1].append(int(match.group(2)))
            else:
                current[2].append((int(match.group(2)), elements * 4))
    return steps


def _resolve_control_deps(names: List[str], earlier: Mapping[str, List[int]]) -> Tuple[int, ...]:
    """Node indices of a node's control dependencies, given by (not unique) names.

    A dependency runs before its dependant, so it is among the nodes of that
    name listed so far; a name given k times is the last k of them (MXNet's
    gradient sums of shared weights: ``sum_grad_1`` for the weight and the
    bias), or the last one when fewer are listed (one node named twice).

    Raises
    ------
    MeasurementError
        If a name is not among the nodes so far.
    """
    wanted: Dict[str, int] = {}
    for name in names:
        wanted[name] = wanted.get(name, 0) + 1
    taken: Dict[str, int] = {}
    resolved = []
    for name in names:
        found = earlier.get(name, [])
        if not found:
            raise MeasurementError(f"control dependency {name} is not an earlier node")
        position = max(len(found) - wanted[name], 0) + taken.get(name, 0)
        position = min(position, len(found) - 1)
        taken[name] = taken.get(name, 0) + 1
        resolved.append(found[position])
    return tuple(resolved)


def parse_executed_graph(debug_text: str, log_text: str, num_heads: int,
                         match_range: int = DEFAULT_MATCH_RANGE) -> ExecutedGraph:
    """Build the executed graph from ``debug_str()`` and the verbose memory log of one bind.

    Raises
    ------
    MeasurementError
        If the two texts do not describe the same graph.
    """
    operators, outputs = _parse_debug(debug_text)
    steps = _parse_log(log_text)
    if not steps:
        raise MeasurementError(
            f"MXNet logged no memory plan: it reads {env.MEM_PLAN_VERBOSE} once per process, at the first "
            f"bind, so a capture needs a process started with it set (the measuring workers are)")
    if len(operators) != len(steps):
        raise MeasurementError(
            f"MXNet's memory log lists {len(steps)} operators and debug_str() {len(operators)}; "
            f"this MXNet build logs its plan differently")
    producer: Dict[int, Tuple[int, int]] = {}
    for index, (_, _, outs) in enumerate(steps):
        for position, (entry, _) in enumerate(outs):
            producer[entry] = (index, position)
    forward = 0
    for op, name, deps in operators:
        if deps or op.startswith("_backward") or name.endswith("_backward") or name == "sum_grad":
            break
        forward += 1
    consumed = set()
    nodes: List[ExecutedNode] = []
    earlier: Dict[str, List[int]] = {}  # node indices by name, so far
    for index, ((op, name, dep_names), (log_op, ins, outs)) in enumerate(zip(operators, steps)):
        if op != log_op:
            raise MeasurementError(f"MXNet's memory log and debug_str() disagree ({op} vs {log_op})")
        inputs = tuple(producer.get(entry, (-1, 0)) for entry in ins)
        consumed.update(i for i in inputs if i[0] >= 0)
        nodes.append(ExecutedNode(op, name, inputs, tuple(size for _, size in outs),
                                  _resolve_control_deps(dep_names, earlier)))
        earlier.setdefault(name, []).append(index)
    by_name: Dict[str, List[int]] = {}
    for index, node in enumerate(nodes):
        by_name.setdefault(node.name, []).append(index)
    # Several gradient sums may share a name.  An output no operator reads is
    # reached only from its own place in the output list, and nnvm's walk
    # visits the outputs in order: the k-th output of a name is the k-th
    # unread node of that name.
    seen_names: Dict[str, int] = {}
    resolved: List[Tuple[int, int]] = []
    for name, position in outputs:
        found = by_name.get(name, [])
        if len(found) > 1:
            unread = [i for i in found if (i, position) not in consumed]
            occurrence = seen_names.get(name, 0)
            seen_names[name] = occurrence + 1
            found = [unread[occurrence]] if occurrence < len(unread) else []
        if len(found) != 1:
            raise MeasurementError(f"cannot tell which node is the graph output {name}({position})")
        resolved.append((found[0], position))
    return ExecutedGraph(nodes, forward, tuple(resolved), num_heads, match_range)


def capture_executed_graph(symbol: "mx.sym.Symbol", ctx: "mx.Context", shapes: Mapping[str, tuple],
                           type_dict: Optional[Mapping[str, np.dtype]] = None,
                           grad_req: GradReq = "write") -> ExecutedGraph:
    """Bind ``symbol`` in this process with MXNet's memory log on and return its executed graph.

    The log goes to file descriptor 2; it is redirected to a temporary file
    for the bind.  MXNet reads ``MXNET_MEM_PLAN_VERBOSE_LOGGING`` once per
    process, at its first bind: in a process that has bound anything without
    it, nothing is logged and this raises (the measuring workers start with it
    set; :func:`~mxnet_mirror_hook.mx.measure.executed_graph` uses them).

    Raises
    ------
    MeasurementError
        If MXNet refuses the bind or its log cannot be read.
    """
    match_range = env.match_range(DEFAULT_MATCH_RANGE)
    if env.auto_search_match_range():
        raise MeasurementError(f"{env.AUTO_SEARCH_MATCH_RANGE} is set: the allocator model "
                               f"follows only a fixed match range")
    with tempfile.TemporaryFile(mode="w+b") as log_file:
        saved = os.dup(2)
        try:
            os.dup2(log_file.fileno(), 2)  # the plan is logged during the bind
            with environment({env.MEM_PLAN_VERBOSE: "1"}):
                executor = bind_symbol(symbol, ctx, shapes, type_dict, grad_req)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        try:
            debug_text = executor.debug_str()
        finally:
            del executor
        log_file.seek(0)
        log_text = log_file.read().decode("utf-8", "replace")
    graph = parse_executed_graph(debug_text, log_text, len(symbol.list_outputs()), match_range)
    graph.measured_mb = parse_planned_mb(debug_text)
    return graph
