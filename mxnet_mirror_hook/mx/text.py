"""MXNet's own text about a bind, parsed: the planned total and the executed graph.

Pure Python (no MXNet import), so the measuring workers can read it without importing
the ``mxnet`` package (NOTE [ binding without the mxnet package ] in :mod:`.capi`).
:func:`parse_planned_mb` reads ``debug_str()``'s total; :func:`parse_executed_graph`
joins ``debug_str()`` and the memory-plan log into an
:class:`~mxnet_mirror_hook.core.allocator.ExecutedGraph`.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .. import env
from ..core.allocator import DEFAULT_MATCH_RANGE, ExecutedGraph, ExecutedNode
from ..errors import MeasurementError

__all__ = ["parse_planned_mb", "parse_executed_graph", "capture_match_range", "executed_graph_from_text",
           "UnreadableGraphError"]


class UnreadableGraphError(MeasurementError):
    """MXNet bound the symbol but its executed graph cannot be read from its report (the planned
    MB can): NOTE [ a figure without its graph ].

    Attributes
    ----------
    planned_mb : float
        MXNet's planned MB of the bind.
    """

    def __init__(self, message: str, planned_mb: float) -> None:
        super().__init__(message)
        self.planned_mb = planned_mb

_TOTAL = re.compile(r"Total\s+(\d+(?:\.\d+)?)\s+MB\s+allocated")


def parse_planned_mb(debug_text: str) -> float:
    """Read ``Total N MB allocated`` from an executor's ``debug_str()``.

    The line's position varies between MXNet builds (the seed read it by
    position); this finds it wherever it is, and takes the last one.

    Raises
    ------
    MeasurementError
        If the text has no such line.
    """
    found = _TOTAL.findall(debug_text)
    if not found:
        raise MeasurementError(
            "MXNet's debug_str() has no 'Total N MB allocated' line; this MXNet build does not "
            "report its memory plan, so plans cannot be measured")
    return float(found[-1])


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
    current: Optional[Tuple[str, List[int], List[Tuple[int, int]]]] = None
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


def _resolve_control_deps(names: List[str], earlier: Mapping[str, List[int]],
                          choose: Optional[Callable[[Sequence[int]], int]] = None) -> Tuple[int, ...]:
    """Node indices of a node's control dependencies, given by (not unique) names.

    A dependency runs before its dependant, so it is among the nodes of that
    name listed so far; a name given k times is the last k of them (MXNet's
    gradient sums of shared weights: ``sum_grad_1`` for the weight and the
    bias), or the last one when fewer are listed (one node named twice).
    ``choose``, when given, picks among several forward operators of one name
    (repeated operator names, NOTE [ a backward node's forward operator ]).

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
        if choose is not None and wanted[name] == 1 and len(found) > 1:
            resolved.append(choose(found))
        else:
            resolved.append(found[position])
    return tuple(resolved)


# NOTE [ a backward node's forward operator ]
# ``debug_str()`` names a backward node's control dependency (its forward
# operator) by name only, and MXNet allows two operators with the same name.
# Among the forward operators of that name, the one meant is the one whose
# entries the backward node reads: its outputs (an activation's backward reads
# the activation's output) or its inputs (a convolution's backward reads the
# convolution's data).  The memory log gives every input as an entry id, so
# this overlap is exact; ties (the first layer reads only variables) go to the
# latest operator of that name no backward node has claimed yet, since the
# gradient pass runs backward nodes in reverse forward order.


def _forward_chooser(nodes: Sequence[ExecutedNode], forward: int,
                     ) -> Callable[[int, Sequence[Tuple[int, int]]], Callable[[Sequence[int]], int]]:
    """``chooser(index, inputs)``: picks a backward node's forward operator among same-named
    candidates (NOTE [ a backward node's forward operator ]); backward candidates keep the
    positional rule."""
    claimed: Set[int] = set()

    def chooser(index: int, inputs: Sequence[Tuple[int, int]]) -> Callable[[Sequence[int]], int]:
        reads = {entry for entry in inputs if entry[0] >= 0}

        def choose(found: Sequence[int]) -> int:
            if index < forward or any(c >= forward for c in found):
                return found[-1]
            best = max(found, key=lambda c: (
                sum(1 for entry in reads if entry[0] == c or entry in nodes[c].inputs),
                c not in claimed, c))
            claimed.add(best)
            return best
        return choose
    return chooser


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
    consumed: Set[Tuple[int, int]] = set()
    nodes: List[ExecutedNode] = []
    earlier: Dict[str, List[int]] = {}  # node indices by name, so far
    chooser = _forward_chooser(nodes, forward)
    for index, ((op, name, dep_names), (log_op, ins, outs)) in enumerate(zip(operators, steps)):
        if op != log_op:
            raise MeasurementError(f"MXNet's memory log and debug_str() disagree ({op} vs {log_op})")
        inputs = tuple(producer.get(entry, (-1, 0)) for entry in ins)
        consumed.update(i for i in inputs if i[0] >= 0)
        nodes.append(ExecutedNode(op, name, inputs, tuple(size for _, size in outs),
                                  _resolve_control_deps(dep_names, earlier, chooser(index, inputs))))
        earlier.setdefault(name, []).append(index)
    by_name: Dict[str, List[int]] = {}
    for index, node in enumerate(nodes):
        by_name.setdefault(node.name, []).append(index)
    return ExecutedGraph(nodes, forward, _resolve_outputs(outputs, nodes, forward, consumed),
                         num_heads, match_range)


def _resolve_outputs(outputs: Sequence[Tuple[str, int]], nodes: Sequence[ExecutedNode], forward: int,
                     consumed: Set[Tuple[int, int]]) -> Tuple[Tuple[int, int], ...]:
    """The graph outputs ``(name, output)`` as ``(node index, output)``.

    Several gradient sums may share a name.  An output no operator reads is
    reached only from its own place in the output list, and nnvm's walk
    visits the outputs in order: the k-th output of a name is the k-th
    unread node of that name.  Backward nodes of forward operators that share
    a name (MXNet allows repeated names) share it too; their gradients are
    listed in the order of the arguments, which is the forward order, so they
    are taken in the order of their forward operators (NOTE [ a backward
    node's forward operator ]).

    Raises
    ------
    MeasurementError
        If an output's node cannot be told.
    """
    by_name: Dict[str, List[int]] = {}
    for index, node in enumerate(nodes):
        by_name.setdefault(node.name, []).append(index)

    def owner(index: int) -> int:
        return min((d for d in nodes[index].control_deps if d < forward), default=-1)

    seen: Dict[Tuple[str, int], int] = {}
    resolved: List[Tuple[int, int]] = []
    for name, position in outputs:
        found = by_name.get(name, [])
        if len(found) > 1:
            unread = [i for i in found if (i, position) not in consumed]
            if all(owner(i) >= 0 for i in unread):
                unread.sort(key=owner)
            occurrence = seen.get((name, position), 0)
            seen[(name, position)] = occurrence + 1
            found = [unread[occurrence]] if occurrence < len(unread) else []
        if len(found) != 1:
            raise MeasurementError(f"cannot tell which node is the graph output {name}({position})")
        resolved.append((found[0], position))
    return tuple(resolved)


def capture_match_range() -> int:
    """nnvm's match range for a capture of the executed graph.

    Raises
    ------
    MeasurementError
        When nnvm searches the match range itself (the allocator model follows a fixed one).
    """
    match_range = env.match_range(DEFAULT_MATCH_RANGE)
    if env.auto_search_match_range():
        raise MeasurementError(f"{env.AUTO_SEARCH_MATCH_RANGE} is set: the allocator model "
                               f"follows only a fixed match range")
    return match_range


def executed_graph_from_text(debug_text: str, log_text: str, num_heads: int,
                             match_range: int) -> ExecutedGraph:
    """The executed graph of a bind from its ``debug_str()`` and memory-plan log, with the
    bind's planned MB.

    # NOTE [ a figure without its graph ]
    # debug_str names operators, not entries, so a graph output is told apart from
    # same-named nodes by what reads it; an argument whose gradient is itself an
    # intermediate gradient sum read by other backward operators (a segment that
    # starts with ``elemwise_add`` of two boundaries: the sum's gradient is the
    # boundaries' gradient) cannot be resolved that way.  The bind's planned MB is
    # still MXNet's own figure, so it is kept (``UnreadableGraphError.planned_mb``):
    # the caller does without the allocator model for that bind (a segment's pool
    # then counts its plan whole, a one-level plan binds its candidates).

    Raises
    ------
    UnreadableGraphError
        If the graph cannot be read (the planned MB rides on the error).
    """
    planned_mb = parse_planned_mb(debug_text)
    try:
        graph = parse_executed_graph(debug_text, log_text, num_heads, match_range)
    except UnreadableGraphError:
        raise
    except MeasurementError as error:
        raise UnreadableGraphError(str(error), planned_mb) from error
    graph.measured_mb = planned_mb
    return graph

