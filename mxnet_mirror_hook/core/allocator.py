"""A model of MXNet 1.9's static memory planner, for any set of mirrored nodes.

# NOTE [ replaying MXNet's memory plan ]
# MXNet decides a plan's memory: ``Total N MB allocated`` is the sum of the
# blocks nnvm's ``PlanMemory`` pass (src/nnvm/plan_memory.cc) hands out while
# it walks the executed forward+backward graph in topological order.  The walk
# is greedy: an output takes the smallest free block of at least its size
# within a match range of 16x, else the largest smaller one, which then grows;
# only when neither exists is a new block made.  Outputs may share an input's
# block in place (``FInplaceOption``) when that input has no other reader.
# A block's size is its largest tenant, forever.  On mirrored graphs this
# greedy walk costs 30-100% over the liveness peak (resnet50 b32: 686 MB live,
# 888 MB allocated; inceptionv3: 760 vs 1582), so plans that look equal to a
# liveness model differ by hundreds of MB in MXNet.  Binding every candidate
# is exact but slow (0.1-0.5 s per bind); this module replays the walk instead.
#
# The executed graph is taken once, from MXNet's own bind of the UNMIRRORED
# symbol (see mxnet_mirror_hook.mx.executed).  The graph for any mirror set
# follows from it by the rules of MXNet 1.9's gradient pass (nnvm
# gradient.cc with a mirror function): every mirrored forward node gets a copy
# whose inputs are the copies of its mirrored inputs; the backward nodes of a
# mirrored node read the copies' entries instead of the originals (those of a
# kept node read the originals, NOTE [ what backward keeps ] in liveness.py),
# and their control dependency moves to the copy.  The topological order is
# nnvm's: a post-order depth-first walk from the graph outputs (heads, then
# gradients), inputs before control dependencies.  Checked against MXNet's
# verbose memory log: the same operator sequence and the same total (to the
# MB) on resnet50/152, inceptionv3 and densenet121 plans.
#
# Operators whose in-place options are not in ``INPLACE_OPTIONS`` are modelled
# without sharing (an over-estimate); callers compare the model with a
# measured bind before trusting it (``AllocatorModel.agrees_with``).
"""
from __future__ import annotations

import bisect
import logging
import random
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from .graph import repeat_keys
from .units import MB_SHIFT

try:  # NOTE [ the compiled replay ]
    from . import _replay
except ImportError:  # built by setup.py when a C compiler is there; the Python replay is the same walk
    _replay = None  # type: ignore[assignment]  # no extension here; callers check for None

__all__ = ["ExecutedNode", "ExecutedGraph", "AllocatorModel", "INPLACE_OPTIONS",
           "DEFAULT_MATCH_RANGE", "AllocatorSearchResult", "search_allocator_plan"]

logger = logging.getLogger(__name__)

#: nnvm's default ``NNVM_EXEC_MATCH_RANGE``.
DEFAULT_MATCH_RANGE = 16

#: (input, output) pairs an operator may share in place, as MXNet 1.9 registers
#: them (``FInplaceOption``), for the operators common in training graphs.
INPLACE_OPTIONS: Dict[str, Tuple[Tuple[int, int], ...]] = {
    **{op: ((0, 0),) for op in (
        "Activation", "_backward_Activation", "relu", "sigmoid", "tanh", "softrelu", "softsign",
        "exp", "log", "sqrt", "square", "negative", "abs", "_copy", "Flatten", "Reshape",
        "reshape", "flatten", "expand_dims", "_backward_copy", "add_n", "ElementWiseSum",
        "_plus_scalar", "_minus_scalar", "_rminus_scalar", "_mul_scalar", "_div_scalar",
        "_rdiv_scalar", "SoftmaxOutput")},
    **{op: ((0, 0), (1, 0)) for op in (
        "elemwise_add", "elemwise_sub", "elemwise_mul", "_plus", "_minus", "_mul", "_grad_add",
        "_backward_relu", "_backward_sigmoid", "_backward_tanh")},
}
#: Operators whose in-place output is the input unchanged (``FInplaceIdentity``):
#: they share even when the input has other readers.
INPLACE_IDENTITY = frozenset({"Flatten", "Reshape", "reshape", "flatten", "expand_dims",
                              "_copy", "_backward_copy"})
#: A search allowed fewer evaluations than this is not started (it could not move anything).
MIN_SEARCH_EVALUATIONS = 50
#: The search stops after this many evaluations (or twice the movable nodes) without a gain.
STALL_EVALUATIONS = 300
#: Restarts (from the best plan, shaken) after stalls before the search gives up early.
MAX_RESTARTS = 3
#: Operators MXNet never mirrors, whatever their attributes say.
NEVER_MIRRORED = frozenset({"Dropout"})


@dataclass(frozen=True)
class ExecutedNode:
    """One operator of MXNet's executed (forward+backward) graph.

    Parameters
    ----------
    op : str
        Operator name (``Convolution``, ``_backward_Convolution``, ``add_n``...).
    name : str
        Node name (not unique: MXNet names every gradient sum ``sum_grad``).
    inputs : tuple of (int, int)
        ``(node index, output index)`` per input; node ``-1`` is a variable.
    output_bytes : tuple of int
        Planned bytes per output (4 bytes per element, as nnvm counts).
    control_deps : tuple of int
        Indices of nodes that must run first (a backward node's forward node).
    """

    op: str
    name: str
    inputs: Tuple[Tuple[int, int], ...]
    output_bytes: Tuple[int, ...]
    control_deps: Tuple[int, ...] = ()


@dataclass
class ExecutedGraph:
    """MXNet's executed graph of an unmirrored bind, in its topological order.

    Attributes
    ----------
    nodes : list of ExecutedNode
        Operators in execution order; the first ``num_forward`` are the forward pass.
    num_forward : int
        How many leading nodes are forward operators (named as in the symbol).
    outputs : tuple of (int, int)
        The graph's outputs: ``num_heads`` symbol outputs, then the gradients.
    num_heads : int
        Outputs of the symbol itself (planned memory); the rest are gradients
        (bound arrays, not planned).
    match_range : int
        nnvm's ``NNVM_EXEC_MATCH_RANGE`` at capture time.
    measured_mb : float or None
        MXNet's ``Total N MB allocated`` for this (unmirrored) bind.
    """

    nodes: List[ExecutedNode]
    num_forward: int
    outputs: Tuple[Tuple[int, int], ...]
    num_heads: int
    match_range: int = DEFAULT_MATCH_RANGE
    measured_mb: Optional[float] = None

    def to_dict(self) -> dict:
        """JSON-safe form (for the measuring process's reply)."""
        return {"nodes": [[n.op, n.name, [list(i) for i in n.inputs], list(n.output_bytes),
                           list(n.control_deps)] for n in self.nodes],
                "num_forward": self.num_forward, "outputs": [list(o) for o in self.outputs],
                "num_heads": self.num_heads, "match_range": self.match_range,
                "measured_mb": self.measured_mb}

    @classmethod
    def from_dict(cls, data: dict) -> "ExecutedGraph":
        """Inverse of :meth:`to_dict`."""
        nodes = [ExecutedNode(op, name, tuple(tuple(i) for i in inputs), tuple(sizes), tuple(deps))
                 for op, name, inputs, sizes, deps in data["nodes"]]
        measured = data.get("measured_mb")
        return cls(nodes, int(data["num_forward"]), tuple(tuple(o) for o in data["outputs"]),
                   int(data["num_heads"]), int(data.get("match_range", DEFAULT_MATCH_RANGE)),
                   None if measured is None else float(measured))


class AllocatorModel:
    """MXNet's planned memory for any mirror set, from one unmirrored executed graph.

    See NOTE [ replaying MXNet's memory plan ].

    Parameters
    ----------
    graph : ExecutedGraph
        The unmirrored bind's executed graph.
    """

    def __init__(self, graph: ExecutedGraph) -> None:
        self.graph = graph
        nodes = graph.nodes
        forward = graph.num_forward
        # Forward operators by key: the name, or name#k for the k-th repeat of a name, as the
        # Graph keys them (NOTE [ nodes are identified by key, not by name ] in graph.py).
        self.forward_keys: List[str] = repeat_keys([nodes[index].name for index in range(forward)])
        self.forward_index: Dict[str, int] = {key: index for index, key in enumerate(self.forward_keys)}
        self._inputs = [n.inputs for n in nodes]
        self._sizes = [n.output_bytes for n in nodes]
        self._ops = [n.op for n in nodes]
        # The forward node each backward node belongs to (its control dependency).
        self._owner = [-1] * len(nodes)
        for index in range(forward, len(nodes)):
            owners = [d for d in nodes[index].control_deps if d < forward]
            if owners:
                self._owner[index] = owners[0]
        self._deps = [n.control_deps for n in nodes]
        self._base_deps = [[s for s, _ in n.inputs if s >= 0] + list(n.control_deps) for n in nodes]
        # The backward walk starts after the whole forward pass: forward nodes are seen.
        self._backward_deps = [[d for d in deps if d >= forward] for deps in self._base_deps]
        # Dense entry ids: node v's output k is offsets[v] + k.
        self._offsets: List[int] = []
        total = 0
        for sizes in self._sizes:
            self._offsets.append(total)
            total += len(sizes)
        self._entry_count = total
        # Entries each node reads, and how often every entry is read, in the unmirrored
        # graph: a replay adjusts these for the few nodes mirroring changes.
        self._entries = [[self._offsets[s] + k if s >= 0 else -1 for s, k in inputs]
                         for inputs in self._inputs]
        self._references = [0] * total
        for entries in self._entries:
            for entry in entries:
                if entry >= 0:
                    self._references[entry] += 1
        self._owned: List[List[int]] = [[] for _ in range(forward)]
        for index, owner in enumerate(self._owner):
            if owner >= 0:
                self._owned[owner].append(index)
        heads = graph.outputs[:graph.num_heads]
        self._head_entries = [self._offsets[v] + k for v, k in heads]
        for entry in self._head_entries:
            self._references[entry] += 1
        self._gradient_flags = bytearray(self._entry_count)
        for v, k in graph.outputs[graph.num_heads:]:
            self._gradient_flags[self._offsets[v] + k] = 1
        self._roots = [v for v, _ in graph.outputs]
        self._gradient_roots = [v for v, _ in graph.outputs[graph.num_heads:]]
        self._never = {i for i in range(forward) if nodes[i].op in NEVER_MIRRORED}
        # Keys MXNet may recompute, with their forward ids (what _mirror_ids keeps).
        self._copy_index = {name: i for name, i in self.forward_index.items() if i not in self._never}
        self._compiled = self._prepare_compiled() if _replay is not None else None

    # NOTE [ the compiled replay ]
    # ``planned_bytes`` is the planner's inner loop: the allocator search calls it
    # ~1000 times per network (about 2 ms each in Python on resnet50's executed graph).
    # ``_replay.c`` does the same walk in C on flat arrays made once here; the Python
    # walk (``_planned_bytes_python``) stays the specification and the fallback when
    # the extension was not built, and tests/core/test_allocator.py checks that both
    # give the same bytes on hand-built and captured graphs, with and without a limit.
    # Same figures mean the same search path, so plans do not depend on which ran.
    # The C walk has no fixed limits (outputs, inputs or nodes per graph: its buffers
    # are sized from the graph, indices are int64); ``prepare`` checks every index the
    # walk follows.  A graph the C walk cannot take (an in-place table it does not know,
    # arrays ``prepare`` refuses) is walked in Python, with a debug line saying why.

    def _prepare_compiled(self) -> Optional[object]:
        try:
            arrays = self._compiled_arrays()
            if arrays is None:
                return None
            return _replay.prepare(self.graph.num_forward, self.graph.match_range, arrays)
        except (ValueError, TypeError, OverflowError, MemoryError) as error:
            logger.debug("the compiled replay cannot take this executed graph (%s); "
                         "replaying it in Python (same figures, slower)", error)
            return None

    def _compiled_arrays(self) -> Optional[Tuple[array[int], ...]]:
        """The flat int64 arrays ``_replay.prepare`` takes, or None when an operator's in-place
        options are not among those the C walk knows."""
        nodes = self.graph.nodes

        def csr(rows):
            starts, flat = array("q", [0]), array("q")
            for row in rows:
                flat.extend(row)
                starts.append(len(flat))
            return starts, flat

        input_start, input_node = csr([[s for s, _ in n.inputs] for n in nodes])
        input_output = array("q", [k for n in nodes for _, k in n.inputs])
        output_start = array("q", self._offsets + [self._entry_count])
        entry_size = array("q", [size for sizes in self._sizes for size in sizes])
        dep_start, deps = csr(self._deps)
        backward_start, backward_deps = csr(self._backward_deps)
        owned_start, owned = csr(self._owned)
        kinds = array("q")
        for op in self._ops:
            pairs = INPLACE_OPTIONS.get(op, ())
            kind = {(): 0, ((0, 0),): 1, ((0, 0), (1, 0)): 2}.get(tuple(pairs))
            if kind is None:
                logger.debug("the compiled replay does not know %s's in-place options %s; "
                             "replaying this graph in Python (same figures, slower)", op, pairs)
                return None
            kinds.append(kind | (4 if op in INPLACE_IDENTITY and kind else 0))
        return (input_start, input_node, input_output, output_start, entry_size, dep_start, deps,
                backward_start, backward_deps, owned_start, owned, array("q", self._references),
                array("q", list(self._gradient_flags)), kinds, array("q", self._gradient_roots))

    def _mirror_ids(self, mirrored: Iterable[str]) -> List[int]:
        index = self.forward_index
        return sorted({i for i in (index.get(n) for n in mirrored)
                       if i is not None and i not in self._never})

    def schedule(self, mirrored: Iterable[str], full: bool = False,
                 ) -> List[Tuple[str, Sequence[Tuple[int, int]], int]]:
        """The executed graph of a mirror set: ``(op, inputs, node id)`` in MXNet's order.

        Copies of mirrored nodes get ids after the unmirrored graph's nodes.  The
        forward pass comes first, unchanged (the heads' walk reaches every forward
        node before any gradient); ``full=True`` walks it too instead of assuming so.
        """
        copies = self._mirror_ids(mirrored)
        return self._steps(copies, self._order(copies, full))

    def _overrides(self, copies: Sequence[int], full: bool,
                   ) -> Tuple[Dict[int, Sequence[Tuple[int, int]]], Dict[int, List[int]]]:
        """Inputs and walk dependencies of the nodes mirroring changes: copies and the
        backward nodes of mirrored nodes."""
        count = len(self._ops)
        forward = self.graph.num_forward
        remap = list(range(forward))
        for offset, f in enumerate(copies):
            remap[f] = count + offset
        base_inputs = self._inputs
        floor = 0 if full else forward  # below it: forward nodes, already walked
        inputs_of: Dict[int, Sequence[Tuple[int, int]]] = {}
        deps_of: Dict[int, List[int]] = {}
        for offset, f in enumerate(copies):
            copied = [(remap[s] if s >= 0 else s, k) for s, k in base_inputs[f]]
            inputs_of[count + offset] = copied
            deps_of[count + offset] = [s for s, _ in copied if s >= floor]
            for b in self._owned[f]:
                moved = [(remap[s] if 0 <= s < forward else s, k) for s, k in base_inputs[b]]
                inputs_of[b] = moved
                deps_of[b] = [s for s, _ in moved if s >= floor] + [
                    d for d in (remap[d] if d < forward else d for d in self._deps[b]) if d >= floor]
        return inputs_of, deps_of

    def _order(self, copies: Sequence[int], full: bool = False,
               ) -> Tuple[List[int], Dict[int, Sequence[Tuple[int, int]]]]:
        """nnvm's post-order walk from the graph outputs, inputs before control dependencies."""
        count = len(self._ops)
        forward = self.graph.num_forward
        inputs_of, deps_of = self._overrides(copies, full)
        seen = bytearray(count + len(copies))
        if full:
            base_deps, roots, order = self._base_deps, self._roots, []
        else:
            base_deps, roots = self._backward_deps, self._gradient_roots
            order = list(range(forward))
            seen[:forward] = b"\x01" * forward
        for root in roots:
            if seen[root]:
                continue
            seen[root] = 1
            nodes_stack = [root]
            pending = deps_of.get(root)
            deps_stack = [base_deps[root] if pending is None else pending]
            positions = [0]
            while nodes_stack:
                top = len(nodes_stack) - 1
                pending = deps_stack[top]
                position = positions[top]
                while position < len(pending) and seen[pending[position]]:
                    position += 1
                if position < len(pending):
                    u = pending[position]
                    positions[top] = position + 1
                    seen[u] = 1
                    nodes_stack.append(u)
                    found = deps_of.get(u)
                    deps_stack.append(base_deps[u] if found is None else found)
                    positions.append(0)
                else:
                    order.append(nodes_stack.pop())
                    deps_stack.pop()
                    positions.pop()
        return order, inputs_of

    def _steps(self, copies: Sequence[int], walked) -> List[Tuple[str, Sequence[Tuple[int, int]], int]]:
        order, inputs_of = walked
        count = len(self._ops)
        ops, base_inputs = self._ops, self._inputs
        return [(ops[v] if v < count else ops[copies[v - count]],
                 inputs_of[v] if v in inputs_of else base_inputs[v], v) for v in order]

    def planned_bytes(self, mirrored: Iterable[str] = (), limit: Optional[int] = None) -> int:
        """Bytes nnvm's greedy allocator plans for the graph with ``mirrored`` recomputed.

        With ``limit``, the replay stops as soon as its blocks pass ``limit``
        bytes (they only ever grow) and returns a figure above ``limit`` that
        is not the full total: exact whenever the result is ``<= limit``.
        Compiled when the extension is built (NOTE [ the compiled replay ]).
        """
        if self._compiled is not None:
            return _replay.planned_bytes_of_names(self._compiled, mirrored, self._copy_index,
                                                  -1 if limit is None else limit)
        return self._planned_bytes_python(mirrored, limit)

    def planned_blocks(self, mirrored: Iterable[str] = ()) -> List[int]:
        """Bytes of each storage block nnvm's allocator plans (the pool entries an executor
        asks for at bind; their sum is :meth:`planned_bytes`)."""
        blocks: List[int] = []
        self._planned_bytes_python(mirrored, blocks_out=blocks)
        return blocks

    def _planned_bytes_python(self, mirrored: Iterable[str] = (), limit: Optional[int] = None,
                              blocks_out: Optional[List[int]] = None) -> int:
        """:meth:`planned_bytes` walked in Python (the specification of ``_replay.c``)."""
        copies = self._mirror_ids(mirrored)
        order, inputs_of = self._order(copies)
        count = len(self._ops)
        offsets = self._offsets + [0] * len(copies)
        sizes = self._sizes + [self._sizes[f] for f in copies]
        total = self._entry_count
        for position, f in enumerate(copies):
            offsets[count + position] = total
            total += len(self._sizes[f])
        # References: the unmirrored counts, corrected for the nodes mirroring changes
        # and for nodes the walk no longer reaches (a copy can stand in for them).
        references = self._references + [0] * (total - self._entry_count)
        base_entries = self._entries
        present = None if len(order) == count + len(copies) else set(order)
        entries_of: Dict[int, List[int]] = {}
        for v, inputs in inputs_of.items():
            if v < count:
                for entry in base_entries[v]:
                    if entry >= 0:
                        references[entry] -= 1
            if present is not None and v not in present:
                continue
            entries = [offsets[s] + k if s >= 0 else -1 for s, k in inputs]
            entries_of[v] = entries
            for entry in entries:
                if entry >= 0:
                    references[entry] += 1
        if present is not None:
            for v in range(count):
                if v not in present and v not in inputs_of:
                    for entry in base_entries[v]:
                        if entry >= 0:
                            references[entry] -= 1
        return _allocate(order, inputs_of, entries_of, self._inputs, self._entries, references,
                         self._ops_of(copies), offsets, sizes, self._gradient_flags,
                         self.graph.match_range, limit, blocks_out)

    def _ops_of(self, copies: Sequence[int]) -> List[str]:
        return self._ops + [self._ops[f] for f in copies]

    def planned_mb(self, mirrored: Iterable[str] = ()) -> float:
        """:meth:`planned_bytes` in MB, as MXNet prints it (whole MB, rounded down)."""
        return float(self.planned_bytes(mirrored) >> MB_SHIFT)

    def replays_capture(self) -> bool:
        """Whether replaying the unmirrored graph gives MXNet's own operator order back."""
        return [v for _, _, v in self.schedule((), full=True)] == list(range(len(self._ops)))

    def agrees_with(self, measured_mb: float, mirrored: Iterable[str] = (),
                    tolerance: float = 0.01) -> bool:
        """Whether the model reproduces a measured bind within ``tolerance`` (relative)."""
        return self.agrees(self.planned_mb(mirrored), measured_mb, tolerance)

    @staticmethod
    def agrees(modelled_mb: float, measured_mb: float, tolerance: float = 0.01) -> bool:
        """Whether a modelled figure is within ``tolerance`` (relative, at least 1 MB) of MXNet's."""
        return abs(modelled_mb - measured_mb) <= max(1.0, tolerance * measured_mb)


def _allocate(order: Sequence[int], inputs_of: Dict[int, Sequence[Tuple[int, int]]],
              entries_of: Dict[int, List[int]], base_inputs: Sequence[Sequence[Tuple[int, int]]],
              base_entries: Sequence[List[int]], references: List[int], ops: Sequence[str],
              offsets: Sequence[int], sizes: Sequence[Tuple[int, ...]], gradient_flags: bytearray,
              match_range: int, limit: Optional[int] = None,
              blocks_out: Optional[List[int]] = None) -> int:
    """nnvm's ``PlanMemory`` walk over ``order``; returns the total bytes of its blocks.

    Entries are dense ids (``offsets[node] + output``); a block id per entry,
    ``-2`` for none yet, ``-1`` for bound arrays (variables, gradients).
    ``references`` counts the readers of every entry (heads included); nodes in
    ``inputs_of``/``entries_of`` read other inputs than in the unmirrored graph.
    Blocks only grow, so once their total passes ``limit`` the walk stops and
    returns that partial total (above ``limit``).  ``blocks_out``, when given, receives the
    bytes of every block (MXNet's pool entries of the bind).
    """
    storage = [-2] * len(references)
    block_refs: List[int] = []
    blocks: List[int] = []
    free: List[Tuple[int, int]] = []
    insort, bisect_left = bisect.insort, bisect.bisect_left
    inplace_options = INPLACE_OPTIONS
    allocated = 0
    bound = limit if limit is not None else -1
    for v in order:
        if v in entries_of:
            inputs, entries = inputs_of[v], entries_of[v]
        else:
            inputs, entries = base_inputs[v], base_entries[v]
        out_sizes = sizes[v]
        base = offsets[v]
        op = ops[v]
        pairs = inplace_options.get(op)
        if pairs:
            identity = op in INPLACE_IDENTITY
            taken = []
            for position, out in pairs:
                if position >= len(entries) or out >= len(out_sizes) or position in taken:
                    continue
                source = entries[position]
                out_entry = base + out
                if source < 0 or storage[out_entry] != -2:
                    continue
                block = storage[source]
                if block < 0 or not (block_refs[block] == 1 or identity):
                    continue
                s, k = inputs[position]
                if references[out_entry] > 0 and sizes[s][k] == out_sizes[out]:
                    taken.append(position)
                    storage[out_entry] = block
                    block_refs[block] += references[out_entry]
        if len(out_sizes) == 1:
            wanted = [(out_sizes[0], base)] if storage[base] == -2 else []
        else:
            wanted = sorted(((out_sizes[k], base + k) for k in range(len(out_sizes))
                             if storage[base + k] == -2), reverse=True)
        for size, entry in wanted:
            if gradient_flags[entry] if entry < len(gradient_flags) else False:
                storage[entry] = -1
                continue
            block = -1
            if match_range:
                position = bisect_left(free, (size, -1))
                if position < len(free) and free[position][0] <= size * match_range:
                    block = free.pop(position)[1]
                elif position > 0 and free[position - 1][0] >= size // match_range:
                    block = free.pop(position - 1)[1]
                    if blocks[block] < size:
                        allocated += size - blocks[block]
                        blocks[block] = size
            if block < 0:
                block = len(blocks)
                blocks.append(size)
                block_refs.append(0)
                allocated += size
            if 0 <= bound < allocated:
                return allocated
            storage[entry] = block
            block_refs[block] = references[entry]
        for entry in entries:
            if entry < 0:
                continue
            block = storage[entry]
            if block < 0:
                continue
            block_refs[block] -= 1
            if block_refs[block] == 0:
                insort(free, (blocks[block], block))
        for k in range(len(out_sizes)):
            block = storage[base + k]
            if block >= 0 and block_refs[block] == 0:
                insort(free, (blocks[block], block))
    if blocks_out is not None:
        blocks_out.extend(blocks)
    return allocated


@dataclass
class AllocatorSearchResult:
    """Outcome of :func:`search_allocator_plan`."""

    mirrored: FrozenSet[str]
    planned_bytes: int
    start_bytes: int
    evaluations: int
    seconds: float
    history: List[Tuple[int, int]] = field(default_factory=list)
    #: Whether the safety time limit stopped the search (the result then depends on the machine).
    timed_out: bool = False


def search_allocator_plan(model: AllocatorModel, start: Iterable[str], movable: Sequence[str],
                          accept: Optional[Callable[[FrozenSet[str]], bool]] = None,
                          time_limit: Optional[float] = None, max_evaluations: int = 100000,
                          seed: int = 0,
                          progress: Optional[Callable[[int], None]] = None) -> AllocatorSearchResult:
    """Lower MXNet's planned memory of a mirror set by local moves scored with the model.

    # NOTE [ searching against the allocator ]
    # The planned total depends on which blocks the greedy allocator happens to
    # grow (NOTE [ replaying MXNet's memory plan ]), so plans an exact liveness
    # model ranks equal differ by hundreds of MB and the landscape is flat with
    # narrow steps.  A walk that accepts every move not worse than the current
    # plan (sideways moves included) does better here than strict descent,
    # which stalls after a few hundred evaluations (measured on resnet152 b32:
    # descent 1214 MB, walk 1164 MB from the same 1311 MB start).  Moves: flip
    # one to three consecutive forward nodes anywhere, or act next to a kept
    # node: flip it or a neighbour, or move the cut across it (keep its
    # producers instead of it, or its consumers).
    #
    # When ``STALL_EVALUATIONS`` (or twice the movable nodes) evaluations in a
    # row found nothing lower, it restarts from the best plan with a few random
    # flips; after ``MAX_RESTARTS`` such stalls it stops (small graphs finish in
    # milliseconds), else after ``max_evaluations``.  Every stop is decided by
    # counting evaluations, never by the clock, so the result is the same for a
    # seed on every machine, busy or quiet, and on every distributed worker.
    # ``time_limit`` is only a safety net far above what the planner's counts
    # need; hitting it is reported (``timed_out``) and logged as a warning.

    Parameters
    ----------
    model : AllocatorModel
        The executed graph's allocator model.
    start : iterable of str
        The mirror set to start from.
    movable : sequence of str
        Forward nodes the search may flip, in topological order.
    accept : callable, optional
        ``accept(mirrored) -> bool``: constraints beyond memory (an overhead cap).
    time_limit : float, optional
        A safety net in seconds (None: none).  The result depends on the
        machine only when it is hit (``timed_out``).
    max_evaluations : int
        Model evaluations at most.
    seed : int
        Random seed.
    progress : callable, optional
        ``progress(evaluations_done)``, called every 100 evaluations.

    Returns
    -------
    AllocatorSearchResult
    """
    started = time.perf_counter()
    moves = _SearchMoves.of(model, movable)
    names = moves.names
    evaluate = _RememberedBytes(model)
    current = frozenset(n for n in start)
    current_bytes = start_bytes = evaluate(current)
    best, best_bytes = current, current_bytes
    history = [(0, start_bytes)]
    rng = random.Random(seed)
    evaluations = 1
    if not names or max_evaluations < MIN_SEARCH_EVALUATIONS:
        return AllocatorSearchResult(best, best_bytes, start_bytes, evaluations, 0.0, history)
    deadline = None if time_limit is None else started + time_limit
    timed_out = False
    patience = max(STALL_EVALUATIONS, 2 * len(names))
    last_gain = evaluations
    restarts = 0
    while evaluations < max_evaluations:
        if deadline is not None and time.perf_counter() > deadline:
            timed_out = True
            break
        if evaluations - last_gain >= patience:
            # Stalled: start again from the best plan shaken by a few random flips.
            restarts += 1
            if restarts > MAX_RESTARTS:
                break
            frozen = moves.shaken(rng, best, restarts)
            if accept is None or accept(frozen):
                current, current_bytes = frozen, evaluate(frozen)
                evaluations += 1
            last_gain = evaluations
            continue
        frozen = moves.draw(rng, current)
        if frozen == current or (accept is not None and not accept(frozen)):
            continue
        value = evaluate(frozen, limit=current_bytes)  # exact when accepted
        evaluations += 1
        if progress is not None and evaluations % 100 == 0:
            progress(evaluations)
        if value <= current_bytes:
            current, current_bytes = frozen, value
            if value < best_bytes:
                best, best_bytes = frozen, value
                history.append((evaluations, value))
                last_gain = evaluations
    return AllocatorSearchResult(best, best_bytes, start_bytes, evaluations,
                                 time.perf_counter() - started, history, timed_out)


class _SearchMoves:
    """The moves of :func:`search_allocator_plan` over the movable forward nodes (NOTE
    [ searching against the allocator ]): each draws from the generator in a fixed order, so a
    seed gives the same walk."""

    def __init__(self, names: List[str], neighbours: Dict[str, List[str]],
                 producers: Dict[str, List[str]], consumers: Dict[str, List[str]]) -> None:
        self.names, self.names_set = names, frozenset(names)
        self.neighbours, self.producers, self.consumers = neighbours, producers, consumers

    @classmethod
    def of(cls, model: AllocatorModel, movable: Sequence[str]) -> "_SearchMoves":
        """The movable nodes the model knows, in order, and their forward edges among them."""
        names = [n for n in movable if n in model.forward_index]
        position = {n: i for i, n in enumerate(names)}
        neighbours: Dict[str, List[str]] = {n: [] for n in names}
        producers: Dict[str, List[str]] = {n: [] for n in names}
        consumers: Dict[str, List[str]] = {n: [] for n in names}
        graph = model.graph
        for name in names:
            node = graph.nodes[model.forward_index[name]]
            for source, _ in node.inputs:
                if 0 <= source < graph.num_forward:
                    parent = model.forward_keys[source]
                    if parent in position:
                        producers[name].append(parent)
                        consumers[parent].append(name)
                        neighbours[name].append(parent)
                        neighbours[parent].append(name)
        return cls(names, neighbours, producers, consumers)

    def shaken(self, rng: random.Random, best: FrozenSet[str], restarts: int) -> FrozenSet[str]:
        """``best`` with ``2 + restarts`` random nodes flipped (a restart after a stall)."""
        shaken = set(best)
        for name in rng.sample(self.names, min(len(self.names), 2 + restarts)):
            shaken ^= {name}
        return frozenset(shaken)

    def draw(self, rng: random.Random, current: FrozenSet[str]) -> FrozenSet[str]:
        """One random move from ``current``: next to a kept node, or one to three consecutive
        nodes flipped."""
        candidate = set(current)
        names = self.names
        # (the list of kept names is built only when a move next to one is drawn; whether it
        # is empty is asked first, as before, so the random sequence is the same)
        if not self.names_set.issubset(current) and rng.random() < 0.5:
            pivot = rng.choice([n for n in names if n not in current])
            neighbours = self.neighbours[pivot]
            move = rng.randrange(4)
            if move == 0 or not neighbours:
                candidate ^= {pivot}
            elif move == 1:
                candidate ^= {rng.choice(neighbours)}
            elif move == 2 and self.producers[pivot]:
                candidate.add(pivot)
                candidate.difference_update(self.producers[pivot])
            elif self.consumers[pivot]:
                candidate.add(pivot)
                candidate.difference_update(self.consumers[pivot])
            else:
                candidate ^= {pivot, rng.choice(neighbours)}
        else:
            first = rng.randrange(len(names))
            for name in names[first:first + rng.choice((1, 1, 2, 3))]:
                candidate ^= {name}
        return frozenset(candidate)


#: Mirror sets whose figures one search remembers at most (NOTE [ a search remembers its figures ]).
REMEMBERED_FIGURES = 1 << 15


class _RememberedBytes:
    """``model.planned_bytes`` for one search, each mirror set replayed once where it can be.

    # NOTE [ a search remembers its figures ]
    # The walk revisits mirror sets (a third of the evaluations of a 'min' plan of
    # mobilenetv2_1.0 were sets it had already scored: a flip and its undo, a
    # restart from the best).  A set's figure is kept with whether it is the exact
    # total (always without a limit; with one, when it is within the limit).  A kept
    # exact total answers any request; a kept figure above a limit answers a request
    # with a limit no higher (it is above that one too).  The walk only asks whether a
    # figure is within its limit and keeps figures that are, so its path, its
    # evaluation count and its result are what replaying every set gives.  At most
    # ``REMEMBERED_FIGURES`` sets are kept (the first ones; the rest are replayed).
    """

    def __init__(self, model: AllocatorModel) -> None:
        self._model = model
        self._known: Dict[FrozenSet[str], Tuple[int, Optional[int]]] = {}

    def __call__(self, mirrored: FrozenSet[str], limit: Optional[int] = None) -> int:
        known = self._known.get(mirrored)
        if known is not None:
            value, asked = known
            if asked is None or value <= asked or (limit is not None and limit <= asked):
                return value
        value = self._model.planned_bytes(mirrored, limit=limit)
        if known is not None or len(self._known) < REMEMBERED_FIGURES:
            self._known[mirrored] = (value, limit)
        return value
