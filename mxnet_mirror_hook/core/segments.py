"""Executor segments: split the forward graph into pieces that are recomputed one at a time.

# NOTE [ executor segments ]
# MXNet's mirror is one level: a recomputed node is replayed once during
# backward, and the gradient of every kept node holds its forward inputs (NOTE
# [ what backward keeps ] in liveness.py), so a network whose boundaries are
# small against its per-step working set (an unrolled RNN, a very deep residual
# stack) cannot go below roughly "everything backward reads between two kept
# tensors, plus all kept tensors".  Segments go further (torch.utils.checkpoint's
# scheme, with MXNet executors): the graph is cut into k pieces, each bound as
# its own executor sharing one memory pool; forward keeps only the tensors that
# cross a cut (the boundaries); backward walks the pieces last to first,
# re-runs a piece's forward from its stored inputs and then its backward with
# the gradient of its outputs.  The peak is then about
#
#     boundaries (values, their gradients and each executor's head-gradient copy)
#     + the largest piece's forward-and-backward working set,
#
# at the cost of re-running the forward of every piece but the last (under one
# extra forward).  Inside a piece MXNet's own mirror can still be used (two
# levels): ``SegmentSpec.mirrored``.
#
# The cuts are those of the cut-set chain (planners/dp.py), found on the
# as-late-as-possible order of the graph (NOTE [ linearising for cuts ] in
# graph.py) so that an unrolled RNN has a cut after every step.  Operators that
# do not depend on a data input (an RNN's zero begin state, a transform of a
# parameter), and cheap ones reading only variables (the split or embedding of
# an RNN's input sequence, REPLAYED_OPS), are not owned by any piece: each piece
# that reads them replays them, so they never become boundaries.  Variables (data, labels, parameters,
# auxiliary states) are never boundaries either: every piece binds the same
# arrays, and a parameter read by several pieces (tied weights, the shared
# weights of an unrolled RNN) gets its gradient summed over them.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from .cost import iteration_cost, node_costs
from .graph import Graph, NodeKind
from .liveness import drop_unread_copies
from .planners.dp import DEFAULT_GRAD_FACTOR, CutChain, build_cut_chain

__all__ = ["Entry", "SegmentSpec", "SegmentPlan", "segment_plan_for_cuts", "choose_cuts",
           "plan_segments", "best_segment_plan", "HEAD_GRAD_COPIES", "LossHead", "loss_head",
           "head_buffer_floats", "head_tile", "shared_pool_bytes", "full_cut_chain",
           "plan_segments_with_head", "head_chunk_count", "head_chunk_rows", "HEAD_CHUNK_BYTES",
           "alternative_cuts", "cut_positions", "least_pool_choice", "MATCH_RANGES",
           "gradient_slots"]

#: A tensor: (producing node's name, output index).
Entry = Tuple[str, int]

#: Bytes of each boundary tensor counted by the estimate: its stored value, the
#: gradient array the consumers write, and the head-gradient copy the producing
#: executor makes in ``backward(out_grads)`` (segment-executors research).
HEAD_GRAD_COPIES = 3

#: Upper bound on segments tried when choosing k.
MAX_SEGMENTS = 48


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: the operators it computes and the tensors it exchanges.

    Attributes
    ----------
    index : int
        Position in the chain (0 first).
    nodes : tuple of str
        Operators it computes (owned ones and replayed data-independent ones),
        in the graph's original topological order.
    inputs : tuple of Entry
        Boundary tensors it reads, produced by earlier segments.
    outputs : tuple of Entry
        Tensors it produces that later segments read; for the last segment, the
        graph's outputs in order.
    variables : tuple of str
        Data, label, parameter and auxiliary variables it reads.
    mirrored : frozenset of str
        Operators of this segment bound with ``force_mirroring`` (two levels).
    working_bytes : int
        Modelled forward-and-backward working set (MXNet's planned bytes).
    match_range : int
        ``NNVM_EXEC_MATCH_RANGE`` the segment is bound under (0: the process's setting,
        MXNet's default 16; NOTE [ a match range per segment ]).
    """

    index: int
    nodes: Tuple[str, ...]
    inputs: Tuple[Entry, ...]
    outputs: Tuple[Entry, ...]
    variables: Tuple[str, ...]
    mirrored: FrozenSet[str] = frozenset()
    working_bytes: int = 0
    match_range: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe form."""
        return {"index": self.index, "nodes": list(self.nodes),
                "inputs": [list(e) for e in self.inputs], "outputs": [list(e) for e in self.outputs],
                "variables": list(self.variables), "mirrored": sorted(self.mirrored),
                "working_bytes": self.working_bytes, "match_range": self.match_range}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegmentSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["index"]), tuple(data["nodes"]),
                   tuple((str(n), int(o)) for n, o in data["inputs"]),
                   tuple((str(n), int(o)) for n, o in data["outputs"]),
                   tuple(data["variables"]), frozenset(data.get("mirrored", ())),
                   int(data.get("working_bytes", 0)), int(data.get("match_range", 0)))


@dataclass(frozen=True)
class SegmentPlan:
    """A split of the graph into segments, with its modelled memory.

    Attributes
    ----------
    segments : tuple of SegmentSpec
        In forward order.
    boundary_bytes : int
        Bytes of all boundary tensors (each stored once).
    estimated_bytes : int
        ``HEAD_GRAD_COPIES * boundary_bytes + max working_bytes``.
    recompute_fraction : float
        Forward cost of the re-run segments (all but the last) as a fraction of
        one plain training iteration (forward + backward).
    boundary_shapes : dict
        Shape of each boundary tensor, keyed ``"node:output"``.
    replay_random : bool
        Segments that draw random numbers (Dropout) replay their forward draws when re-run
        (``recompute_dropout=True``; NOTE [ replaying random draws in re-run segments ] in
        ``mx/segments.py``).  Without it a chain refuses such segments.
    head_chunks : int
        0, or the number of row chunks the last segment (a FullyConnected +
        SoftmaxOutput loss head, :func:`loss_head`) is run in instead of one
        executor (NOTE [ chunked loss head ]).
    """

    segments: Tuple[SegmentSpec, ...]
    boundary_bytes: int
    estimated_bytes: int
    recompute_fraction: float
    boundary_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    replay_random: bool = False
    head_chunks: int = 0

    @property
    def count(self) -> int:
        """Number of segments."""
        return len(self.segments)

    @property
    def boundaries(self) -> List[Entry]:
        """Every boundary tensor, in forward order."""
        return [e for s in self.segments[:-1] for e in s.outputs]

    def readers(self) -> Dict[str, List[int]]:
        """For each variable, the segments that read it."""
        found: Dict[str, List[int]] = {}
        for segment in self.segments:
            for name in segment.variables:
                found.setdefault(name, []).append(segment.index)
        return found

    def shared_variables(self) -> List[str]:
        """Variables read by more than one segment (their gradients are summed)."""
        return sorted(n for n, r in self.readers().items() if len(r) > 1)

    def executor_count(self) -> int:
        """Segments bound as executors (all but a chunked loss head)."""
        return self.count - 1 if self.head_chunks else self.count

    def bind_order(self, skip: Iterable[int] = ()) -> List[int]:
        """Executor segments in the order a chain binds them: the largest working set first
        (it owns the memory pool; NOTE [ the shared pool's union ]), ties by position.
        ``skip``: segments bound as no executor (NOTE [ gathered steps ] in mx/segments.py)."""
        skipped = set(skip)
        return sorted((i for i in range(self.executor_count()) if i not in skipped),
                      key=lambda i: (-self.segments[i].working_bytes, i))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe form (for the plan cache and ``MirrorPlan.to_dict``)."""
        return {"segments": [s.to_dict() for s in self.segments],
                "boundary_bytes": self.boundary_bytes, "estimated_bytes": self.estimated_bytes,
                "recompute_fraction": self.recompute_fraction,
                "boundary_shapes": {k: list(v) for k, v in self.boundary_shapes.items()},
                "replay_random": self.replay_random, "head_chunks": self.head_chunks}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegmentPlan":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(SegmentSpec.from_dict(s) for s in data["segments"]),
                   int(data["boundary_bytes"]), int(data["estimated_bytes"]),
                   float(data["recompute_fraction"]),
                   {k: tuple(v) for k, v in data.get("boundary_shapes", {}).items()},
                   bool(data.get("replay_random", False)), int(data.get("head_chunks", 0)))

    def with_working_bytes(self, measured: Sequence[int]) -> "SegmentPlan":
        """The same split with measured working sets (MXNet's plan of each segment), so that
        :meth:`bind_order` binds the really largest segment first."""
        if len(measured) != self.count:
            raise ValueError(f"need one figure per segment ({self.count}), got {len(measured)}")
        segments = tuple(dataclasses.replace(s, working_bytes=int(m))
                         for s, m in zip(self.segments, measured))
        return dataclasses.replace(self, segments=segments)

    def with_match_ranges(self, ranges: Sequence[int]) -> "SegmentPlan":
        """The same split with each segment bound under ``ranges[i]`` as
        ``NNVM_EXEC_MATCH_RANGE`` (0: the process's setting; NOTE [ a match range per segment ])."""
        if len(ranges) != self.count:
            raise ValueError(f"need one match range per segment ({self.count}), got {len(ranges)}")
        if any(int(r) < 0 for r in ranges):
            raise ValueError(f"match ranges must be >= 0 (0: MXNet's setting), got {list(ranges)}")
        segments = tuple(dataclasses.replace(s, match_range=int(r))
                         for s, r in zip(self.segments, ranges))
        return dataclasses.replace(self, segments=segments)

    def with_replay_random(self, replay: bool = True) -> "SegmentPlan":
        """The same split with :attr:`replay_random` set."""
        return dataclasses.replace(self, replay_random=bool(replay))

    def with_head_chunks(self, chunks: int) -> "SegmentPlan":
        """The same split with the last segment run in ``chunks`` row chunks (0: one executor)."""
        return dataclasses.replace(self, head_chunks=int(chunks))

    def with_mirrored(self, mirrored: Iterable[str], graph: Graph) -> "SegmentPlan":
        """The same split with ``force_mirroring`` on ``mirrored`` inside each segment (two levels).

        A segment's outputs are never mirrored (they are what the next segments
        start from), nor are nodes of ``graph`` whose copy nothing in their segment would
        read (NOTE [ copies nothing reads ] in liveness.py: a segment output kept after a
        mirrored convolution made MXNet refuse the bind without MKLDNN).
        """
        chosen = frozenset(mirrored)
        segments = []
        for segment in self.segments:
            outputs = {name for name, _ in segment.outputs}
            inside = frozenset(n for n in segment.nodes if n in chosen and n not in outputs)
            inside = drop_unread_copies(graph, inside)
            if self.head_chunks and segment.index == self.count - 1:
                inside = frozenset()  # a chunked head runs no executor (NOTE [ chunked loss head ])
            segments.append(dataclasses.replace(segment, mirrored=inside))
        return dataclasses.replace(self, segments=tuple(segments))


def shared_pool_bytes(blocks: Sequence[Sequence[int]]) -> int:
    """Bytes of the memory pool a chain of executors shares, bound in the given order.

    # NOTE [ the shared pool's union ]
    # MXNet binds an executor with ``shared_exec`` by giving each of its planned
    # storage blocks, largest first, the smallest block of the shared pool that
    # is at least as large and not yet given to this executor; a block that
    # finds none is allocated and appended to the pool (InitDataEntryMemory in
    # src/executor/graph_executor.cc).  So the pool of a chain is at least its
    # largest executor's plan and can be more: segments of different shapes
    # add blocks.  ``blocks`` are the executors' planned block sizes in bind
    # order (the allocator model's :meth:`planned_blocks`); the result is the
    # sum of the pool's blocks after the last bind.
    """
    pool: List[int] = []
    for planned in blocks:
        free = sorted(pool)
        for size in sorted(planned, reverse=True):
            position = bisect.bisect_left(free, size)
            if position < len(free):
                free.pop(position)
            else:
                pool.append(size)
    return sum(pool)


def gradient_slots(plan: SegmentPlan, keys: Mapping[Entry, Any],
                   shareable: Iterable[Entry] = ()) -> Dict[Entry, int]:
    """An array slot for the gradient of each boundary in ``keys``; boundaries in
    ``shareable`` with equal keys (shape and type) share a slot when their lives do not overlap.

    # NOTE [ boundary gradients share arrays ]
    # A boundary's gradient array is written while backward runs its reader's
    # segment and read once, when the producer's ``backward(out_grads)`` copies
    # it into its head-gradient array, before any of the producer's operators
    # run.  Backward runs the segments last to first, so the gradient of a
    # boundary produced by segment p and read by segment c lives from step c to
    # the start of step p; a boundary read at step p may share an array with one
    # written at step p (the engine orders the write after the copy's read: the
    # same array, one engine variable).  A chain of k segments held k-1 gradient
    # arrays; a linear chain needs one per shape.  Only boundaries written with
    # 'write' share (one reader binding: NOTE [ one variable per reader ]);
    # summed ones are zeroed when backward starts and keep their own, as do the
    # gathered ones (NOTE [ gathered steps ]).  Greedy interval colouring in
    # backward order (lowest free slot); exact for intervals.

    Parameters
    ----------
    plan : SegmentPlan
        The chain.
    keys : mapping of Entry to hashable
        Every boundary that has a gradient array, with the key arrays must share (shape, type).
    shareable : iterable of Entry
        Boundaries that may share (each read by exactly one segment, written with 'write').

    Returns
    -------
    dict of Entry to int : slot per boundary (equal slots: one array).
    """
    producer = {tuple(e): s.index for s in plan.segments for e in s.outputs}
    readers: Dict[Entry, List[int]] = {}
    for segment in plan.segments:
        for entry in segment.inputs:
            readers.setdefault(tuple(entry), []).append(segment.index)
    last = plan.count - 1
    lives = []
    for entry in shareable:
        entry = tuple(entry)
        if entry not in keys or len(readers.get(entry, ())) != 1 or entry not in producer:
            continue
        # Backward step (0 = the last segment) writing it, and the step reading it.
        lives.append((last - readers[entry][0], last - producer[entry], entry))
    slots: Dict[Entry, int] = {}
    free_from: Dict[int, int] = {}           # slot -> first step it may be written again
    slot_key: Dict[int, Any] = {}
    for written, read, entry in sorted(lives, key=lambda item: (item[0], item[1], item[2])):
        found = [slot for slot, step in free_from.items()
                 if slot_key[slot] == keys[entry] and step <= written]
        slot = min(found) if found else len(slot_key)
        slot_key[slot] = keys[entry]
        free_from[slot] = read
        slots[entry] = slot
    for entry in sorted(tuple(e) for e in keys):
        if entry not in slots:
            slots[entry] = len(slot_key)
            slot_key[slots[entry]] = keys[entry]
    return slots


#: ``NNVM_EXEC_MATCH_RANGE`` values a segment may be bound under when the pool is tuned
#: (NOTE [ a match range per segment ]); 16 is MXNet's default.
MATCH_RANGES = (2, 4, 8, 16, 32)

#: Combinations of per-segment variants :func:`least_pool_choice` tries exhaustively; beyond
#: it, a fixed number of coordinate-descent passes.
POOL_CHOICE_LIMIT = 4096
POOL_CHOICE_PASSES = 3


def least_pool_choice(options: Sequence[Mapping[Any, Tuple[float, Sequence[int]]]]
                      ) -> Tuple[int, List[Any]]:
    """The variant of each executor that makes the chain's shared pool least.

    # NOTE [ a match range per segment ]
    # The shared pool is the union of the executors' blocks (NOTE [ the shared
    # pool's union ]): a segment whose blocks are many and small adds blocks
    # even when its own plan is well below the largest one.  MXNet's planner
    # lets a freed block serve a tensor within a factor NNVM_EXEC_MATCH_RANGE
    # of its size (default 16; read at every bind, so it can differ per
    # executor).  Under another range a segment plans other blocks, a few MB
    # more or less on its own, but sometimes far better dovetailed with the
    # others: resnet152_v1b, batch 32, two segments planned 'min' on their own,
    # cut after layers3_bottleneckv1b1: pool 1069 MB with both at 16, 1045 MB
    # with the first at 2; cut one block later: 980 MB, 969 MB with the first
    # at 8 and the second at 2.  So under ``'min'`` each segment is measured under each of
    # MATCH_RANGES and the combination with the least pool is bound (the chain
    # sets the variable around each segment's bind).
    #
    # ``options[i]`` maps variant keys to (MXNet's planned MB, the allocator
    # model's blocks) of executor i (segment order).  The chain binds the
    # largest planned MB first, ties by position (:meth:`SegmentPlan.bind_order`),
    # so the order follows the chosen variants.  Exhaustive up to
    # POOL_CHOICE_LIMIT combinations; beyond, coordinate descent from each
    # executor's least plan, POOL_CHOICE_PASSES passes (bounded by work, not time).

    Returns
    -------
    (bytes, keys) : the pool's bytes and the chosen key of each executor.
    """
    if not options:
        return 0, []
    if any(not o for o in options):
        raise ValueError("every executor needs at least one variant")
    keys = [sorted(o, key=repr) for o in options]

    def pool(choice: Sequence[Any]) -> int:
        chosen = [options[i][k] for i, k in enumerate(choice)]
        order = sorted(range(len(chosen)), key=lambda i: (-chosen[i][0], i))
        return shared_pool_bytes([chosen[i][1] for i in order])

    combinations = math.prod(len(k) for k in keys)
    if combinations <= POOL_CHOICE_LIMIT:
        best = min(itertools.product(*keys), key=lambda c: (pool(c), c.__repr__()))
        return pool(best), list(best)
    choice = [min(k, key=lambda key, o=o: (sum(o[key][1]), repr(key))) for k, o in zip(keys, options)]
    current = pool(choice)
    for _ in range(POOL_CHOICE_PASSES):
        improved = False
        for i, candidates in enumerate(keys):
            for key in candidates:
                trial = choice[:i] + [key] + choice[i + 1:]
                value = pool(trial)
                if value < current:
                    choice, current, improved = trial, value, True
        if not improved:
            break
    return current, choice


def entry_key(entry: Entry) -> str:
    """``"node:output"``, the key of a boundary in :attr:`SegmentPlan.boundary_shapes`."""
    return f"{entry[0]}:{entry[1]}"


def _depends_on_data(graph: Graph) -> List[bool]:
    """For each node, whether it depends on a data or label input (variables: only inputs)."""
    found = [False] * len(graph.nodes)
    for position, node in enumerate(graph.nodes):
        if node.kind is NodeKind.INPUT:
            found[position] = True
        elif node.kind is NodeKind.OP:
            found[position] = any(found[s] for s, _ in node.inputs)
    return found


def _entry_bytes(graph: Graph, entry: Tuple[int, int]) -> int:
    shapes = graph.nodes[entry[0]].output_shapes
    shape = shapes[entry[1]] if entry[1] < len(shapes) else ()
    return math.prod(shape) * 4 if shape else 0


#: Cheap operators that are replayed in every segment reading them when all their inputs are
#: variables (or such replayed operators): splitting or embedding the input sequence of an RNN
#: would otherwise make every step's slice a boundary (three copies of the whole input).
REPLAYED_OPS = frozenset({"SliceChannel", "split", "Embedding", "reshape", "Reshape", "transpose",
                          "SwapAxis", "swapaxes", "expand_dims", "slice", "slice_axis", "Flatten",
                          "flatten", "Cast", "cast", "identity", "_copy", "squeeze"})


def _replayed(graph: Graph) -> List[bool]:
    """Operators replayed by every segment that reads them (never boundaries): those that do
    not depend on a data input, and cheap ones (:data:`REPLAYED_OPS`) reading only variables and
    replayed operators."""
    data = _depends_on_data(graph)
    found = [False] * len(graph.nodes)
    for position, node in enumerate(graph.nodes):
        if node.kind is not NodeKind.OP:
            continue
        if not data[position]:
            found[position] = True
        elif node.op in REPLAYED_OPS and all(graph.nodes[s].kind is not NodeKind.OP or found[s]
                                             for s, _ in node.inputs):
            found[position] = True
    return found


class _Crossings:
    """Which tensors cross which positions of a (late-ordered) graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        replayed = _replayed(graph)
        self.owned = [node.kind is NodeKind.OP and not replayed[position]
                      for position, node in enumerate(graph.nodes)]
        size = len(graph.nodes)
        last: Dict[Tuple[int, int], int] = {}
        for position, node in enumerate(graph.nodes):
            for source, output in node.inputs:
                if self.owned[source]:
                    last[(source, output)] = max(last.get((source, output), -1), position)
        self.head_positions = [h[0] for h in graph.heads]
        for head in graph.heads:
            last[tuple(head)] = size  # type: ignore[index]
        #: (producer position, last reader position, entry, bytes), by producer.
        self.spans = sorted((e[0], end, e, _entry_bytes(graph, e)) for e, end in last.items()
                            if end > e[0])
        # Bytes crossing the gap after each position.
        delta = [0] * (size + 2)
        for start, end, _, nbytes in self.spans:
            delta[start] += nbytes
            delta[end] -= nbytes
        self.crossing: List[int] = []
        running = 0
        for position in range(size):
            running += delta[position]
            self.crossing.append(running)
        self.first_head = min(self.head_positions, default=size)
        #: Owned operators before each position (``owned_before[p + 1]``: up to and including p).
        self.owned_before = [0]
        for flag in self.owned:
            self.owned_before.append(self.owned_before[-1] + flag)

    def valid(self, position: int) -> bool:
        """A cut after ``position`` keeps every graph output in the last segment."""
        return position < self.first_head and any(
            self.owned[i] for i in range(position + 1, len(self.graph.nodes)))

    def candidates(self, chain: CutChain) -> List[int]:
        """The positions of ``chain`` a cut may follow (interior and :meth:`valid`)."""
        return [p for p in chain.positions[1:-1] if self.valid(p)]


_CROSSINGS: "weakref.WeakKeyDictionary[Graph, _Crossings]" = weakref.WeakKeyDictionary()


def _crossings_of(late: Graph) -> "_Crossings":
    """:class:`_Crossings` of a linearised graph, computed once per graph object (segment
    planning asks for it per split)."""
    found = _CROSSINGS.get(late)
    if found is None:
        found = _CROSSINGS[late] = _Crossings(late)
    return found


def segment_plan_for_cuts(graph: Graph, cuts: Sequence[int], chain: Optional[CutChain] = None,
                          grad_factor: float = DEFAULT_GRAD_FACTOR,
                          mirrored: Iterable[str] = ()) -> SegmentPlan:
    """The segments of ``graph`` cut after the given positions of its as-late-as-possible order.

    Parameters
    ----------
    graph : Graph
        The forward graph (any topological order; it is linearised as late as possible).
    cuts : sequence of int
        Increasing positions in ``graph.as_late_as_possible()``; segment s holds
        the owned operators after cut s-1 up to and including cut s.
    chain : CutChain, optional
        ``build_cut_chain(graph, ...)`` when the caller has it (for working sets).
    grad_factor : float
        Gradient buffers per segment, in units of its largest tensor.
    mirrored : iterable of str
        Operators to mirror inside the segments (two levels).

    Raises
    ------
    ValueError
        If the cuts are not increasing, or a cut would leave a graph output
        outside the last segment.
    """
    late = graph.as_late_as_possible()
    crossings = _crossings_of(late)
    cuts = list(cuts)
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cut positions must increase, got {cuts}")
    for cut in cuts:
        if not 0 <= cut < len(late.nodes) or not crossings.valid(cut):
            raise ValueError(f"no segment boundary can follow position {cut}: the graph outputs must "
                             "all be computed by the last segment")
    nodes = late.nodes
    owner = [-1] * len(nodes)
    for position in range(len(nodes)):
        if crossings.owned[position]:
            owner[position] = bisect.bisect_left(cuts, position)
    count = len(cuts) + 1
    original = {node.name: position for position, node in enumerate(graph.nodes)}

    members: List[set] = [set() for _ in range(count)]
    inputs: List[set] = [set() for _ in range(count)]
    variables: List[set] = [set() for _ in range(count)]
    outputs: List[set] = [set() for _ in range(count)]
    for position, node in enumerate(nodes):
        if owner[position] < 0:
            continue
        members[owner[position]].add(position)
    for s in range(count):
        stack = list(members[s])
        while stack:
            position = stack.pop()
            for source, output in nodes[position].inputs:
                producer = nodes[source]
                if producer.kind is not NodeKind.OP:
                    variables[s].add(producer.name)
                elif owner[source] == s:
                    continue
                elif owner[source] >= 0:
                    inputs[s].add((source, output))
                    outputs[owner[source]].add((source, output))
                elif source not in members[s]:   # replayed here (NOTE [ executor segments ])
                    members[s].add(source)
                    stack.append(source)
    for s in range(count):
        if not members[s]:
            raise ValueError(f"segment {s} would be empty; cut at distinct operator positions")
    chosen = frozenset(mirrored)
    if chain is None:
        chain = build_cut_chain(graph, max_frontier=len(nodes), max_cuts=len(nodes),
                                grad_factor=grad_factor)
    segments = []
    boundary_shapes: Dict[str, Tuple[int, ...]] = {}
    boundary_bytes = 0
    cost = node_costs(late)
    rerun = 0.0
    bounds = [-1] + cuts + [len(nodes) - 1]
    for s in range(count):
        ordered = sorted(members[s], key=lambda p: original[nodes[p].name])
        if s == count - 1:
            out_entries = [(nodes[p].name, o) for p, o in late.heads]
        else:
            out_entries = [(nodes[p].name, o) for p, o in sorted(outputs[s])]
            for p, o in sorted(outputs[s]):
                shape = tuple(nodes[p].output_shapes[o]) if o < len(nodes[p].output_shapes) else ()
                boundary_shapes[entry_key((nodes[p].name, o))] = shape
                boundary_bytes += _entry_bytes(late, (p, o))
            rerun += sum(cost.get(nodes[p].name, 0.0) for p in members[s])
        names = [nodes[p].name for p in ordered]
        out_names = {n for n, _ in out_entries}
        segments.append(SegmentSpec(
            index=s, nodes=tuple(names),
            inputs=tuple((nodes[p].name, o) for p, o in sorted(inputs[s])),
            outputs=tuple(out_entries),
            variables=tuple(sorted(variables[s], key=lambda n: original[n])),
            mirrored=frozenset(n for n in names if n in chosen and n not in out_names),
            working_bytes=int(_working_bytes(chain, late, bounds[s], bounds[s + 1], grad_factor))))
    total = iteration_cost(late)
    estimate = HEAD_GRAD_COPIES * boundary_bytes + max(s.working_bytes for s in segments)
    return SegmentPlan(tuple(segments), boundary_bytes, int(estimate),
                       rerun / total if total else 0.0, boundary_shapes)


def _working_bytes(chain: CutChain, late: Graph, start: int, end: int, grad_factor: float) -> float:
    """Modelled working set of the owned operators in positions (start, end]: what backward
    reads among their outputs plus gradient buffers (NOTE [ the cut-set chain ] in dp.py)."""
    need = chain.need_prefix[end + 1] - chain.need_prefix[start + 1]
    largest = max(chain.op_bytes[start + 1:end + 1], default=0)
    return need + grad_factor * largest


def choose_cuts(graph: Graph, count: int, chain: Optional[CutChain] = None,
                grad_factor: float = DEFAULT_GRAD_FACTOR) -> List[int]:
    """Positions (in the as-late-as-possible order) of ``count - 1`` cuts that split the
    working set evenly, each the cut with the fewest crossing bytes near its target.

    Fewer cuts are returned when the graph has fewer candidate positions.
    """
    if count <= 1:
        return []
    late = graph.as_late_as_possible()
    if chain is None:
        chain = build_cut_chain(graph, max_frontier=len(late.nodes), max_cuts=len(late.nodes),
                                grad_factor=grad_factor)
    crossings = _crossings_of(late)
    candidates = crossings.candidates(chain)
    if not candidates:
        return []
    owned_before = crossings.owned_before
    total = chain.need_prefix[-1]
    weight = [chain.need_prefix[p + 1] for p in candidates]
    width = total / (2 * count)
    cuts: List[int] = []
    for m in range(1, count):
        target = total * m / count
        low = bisect.bisect_left(weight, target - width)
        high = bisect.bisect_right(weight, target + width)
        # Every segment must own an operator.
        floor = owned_before[cuts[-1] + 1] if cuts else 0
        window = [i for i in range(low, high) if owned_before[candidates[i] + 1] > floor]
        if not window:
            continue
        best = min(window, key=lambda i: (crossings.crossing[candidates[i]], abs(weight[i] - target)))
        cuts.append(candidates[best])
    return cuts


def cut_positions(graph: Graph, plan: SegmentPlan) -> List[int]:
    """The cuts of ``plan`` as positions of ``graph.as_late_as_possible()`` (the last owned
    operator of each segment but the last; the inverse of :func:`segment_plan_for_cuts`)."""
    late = graph.as_late_as_possible()
    crossings = _crossings_of(late)
    position = {node.name: p for p, node in enumerate(late.nodes)}
    cuts = []
    for segment in plan.segments[:-1]:
        owned = [position[n] for n in segment.nodes if n in position and crossings.owned[position[n]]]
        if not owned:
            raise ValueError(f"segment {segment.index} owns no operator of this graph")
        cuts.append(max(owned))
    return cuts


def alternative_cuts(graph: Graph, cuts: Sequence[int], limit: int,
                     chain: Optional[CutChain] = None) -> List[List[int]]:
    """Other cut lists, each moving one of ``cuts`` to a nearby position crossed by no more
    bytes: the ``limit`` nearest such positions per cut (by distance in the as-late-as-possible
    order, earlier first on ties), keeping every segment owning an operator.

    :func:`choose_cuts` balances the modelled working sets; what the shared pool of the
    bound executors holds also depends on how the segments' storage blocks dovetail (NOTE
    [ the shared pool's union ]), which only measuring tells, so the planner measures these
    neighbours too under ``'min'`` (resnet152_v1b, batch 32: the balanced cut after
    layers3_bottleneckv1b1 gives 1143 MB, the same-size cut one block later 1054 MB).
    """
    late = graph.as_late_as_possible()
    if chain is None:
        chain = full_cut_chain(graph)
    crossings = _crossings_of(late)
    candidates = crossings.candidates(chain)
    owned_before = crossings.owned_before
    found: List[List[int]] = []
    for i, cut in enumerate(cuts):
        low = cuts[i - 1] if i > 0 else -1
        high = cuts[i + 1] if i + 1 < len(cuts) else len(late.nodes) - 1
        near = [p for p in candidates if low < p < high and p != cut
                and crossings.crossing[p] <= crossings.crossing[cut]
                and owned_before[p + 1] > owned_before[low + 1]
                and owned_before[high + 1] > owned_before[p + 1]]
        near.sort(key=lambda p: (abs(p - cut), p))
        for p in near[:max(0, limit)]:
            found.append(list(cuts[:i]) + [p] + list(cuts[i + 1:]))
    return found


def full_cut_chain(graph: Graph, grad_factor: float = DEFAULT_GRAD_FACTOR) -> CutChain:
    """The cut chain segment planning reads (every cut, any frontier): build it once and pass
    it to the functions below when planning several splits of one graph."""
    return build_cut_chain(graph, max_frontier=len(graph.nodes), max_cuts=len(graph.nodes),
                           grad_factor=grad_factor)


def plan_segments(graph: Graph, count: int, grad_factor: float = DEFAULT_GRAD_FACTOR,
                  mirrored: Iterable[str] = (), chain: Optional[CutChain] = None) -> SegmentPlan:
    """A plan with (at most) ``count`` segments (fewer when the graph has fewer cuts);
    ``chain``: :func:`full_cut_chain` of ``graph`` at ``grad_factor`` (built when None)."""
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    cuts = choose_cuts(graph, count, chain, grad_factor)
    return segment_plan_for_cuts(graph, cuts, chain, grad_factor, mirrored)


def best_segment_plan(graph: Graph, max_count: int = MAX_SEGMENTS, tolerance: float = 0.05,
                      grad_factor: float = DEFAULT_GRAD_FACTOR,
                      chain: Optional[CutChain] = None) -> SegmentPlan:
    """The plan with the least estimated memory over 1..``max_count`` segments.

    Among plans within ``tolerance`` of the least estimate the one with the
    fewest segments is returned (each segment costs executor calls and a
    boundary copy per iteration).  ``chain`` as in :func:`plan_segments`.
    """
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    plans: List[SegmentPlan] = []
    seen = set()
    for count in range(1, max_count + 1):
        cuts = tuple(choose_cuts(graph, count, chain, grad_factor))
        if cuts in seen:
            continue
        seen.add(cuts)
        plans.append(segment_plan_for_cuts(graph, cuts, chain, grad_factor))
    least = min(p.estimated_bytes for p in plans)
    return min((p for p in plans if p.estimated_bytes <= least * (1 + tolerance)),
               key=lambda p: (p.count, p.estimated_bytes))


# NOTE [ chunked loss head ]
# A language model's loss head, FullyConnected over every step's output (N rows
# of H) to a vocabulary of V followed by SoftmaxOutput, plans about 2 * N * V
# floats in one segment (the classifier output and its gradient; 244 MB for
# 3200 x 10000), far above the recurrent segments.  Both operators are row-wise
# when the classifier's input is (N, H): row r of the output needs row r of the
# input only.  So the last segment can run in row chunks instead of one
# executor (mx/segments.py, ``ChunkedHead``):
#
#   forward   for each chunk: FullyConnected of its rows into one (c, V) work
#             buffer, SoftmaxOutput of that into the chunk's rows of the one
#             (N, V) output array Module keeps (metrics read outputs after
#             backward, so the full softmax output stays);
#   backward  by tiles: column blocks of the classes (as many as row chunks)
#             times about sqrt(chunks) row parts (:func:`head_tile`).  A tile's
#             block of SoftmaxOutput's gradient, ``(output - one_hot(label)) *
#             scale`` with ignored rows zeroed, needs only the kept output and the
#             labels (the same float32 operations as MXNet's kernel:
#             bit-identical, tested); FullyConnected's own backward kernel on the
#             tile (MKLDNN's here: ``dot`` products ran four times slower on this
#             CPU build) with the block's rows of the weight gives the tile's
#             partial input gradient (its rows) and partial weight and bias
#             gradients (the block's rows), each written in place by the first
#             tile that reaches it and added by the others through one
#             tile-sized buffer.  Row chunks alone would need a (V, H) buffer for
#             the weight gradient (MXNet's imperative operators cannot add into
#             an output: 19.5 MB of the vocabulary-10000 language model), column
#             blocks alone an (N, H) one for the input's.
#
# The head then holds N * V (output) + max(c * V, tile) (work) + tile (the
# labels' one-hot) + the partial gradients' tile-sized buffers, instead of
# MXNet's plan of the whole head, all allocated at bind by the chain and counted
# in the static figure (NOTE [ static memory of a segment plan ] in
# mx/segments.py; :func:`head_buffer_floats`).  Exactness: the outputs are
# bit-identical to the head as one executor (tests/api/test_segments_head.py)
# when the chunk rows are a multiple of HEAD_ROW_MULTIPLE; the gradients are
# sums over tiles, so they differ from the one-GEMM kernel in float32 rounding
# (~1e-7 relative; with one tile they are bit-identical, tested).
# SoftmaxOutput's normalization is applied over the whole batch: 'batch' and
# 'valid' divide by the full row count (or the count of labels other than
# ignore_label, counted over all rows), folded into each chunk's grad_scale
# exactly as MXNet computes the factor (float32 grad_scale / count).  Forms
# whose gradient is not row-local or not a function of the output and label
# alone (multi_output, preserve_shape, out_grad, smooth_alpha, probability
# labels) are refused by :func:`loss_head` with the reason, and the plan keeps
# an unchunked last segment.

#: Target bytes of a chunk's (rows, V) work buffer.
HEAD_CHUNK_BYTES = 4 * 2 ** 20

#: Operators that merge per-step outputs into one tensor without computing.
_MERGE_OPS = frozenset({"expand_dims", "Concat", "concat", "stack", "Reshape", "reshape", "Flatten",
                        "flatten"})

#: Operators that only reshape the label (row-major order kept) on its way to SoftmaxOutput.
_LABEL_RESHAPES = frozenset({"Reshape", "reshape", "Flatten", "flatten", "squeeze", "expand_dims"})


def _flag(attrs: Mapping[str, str], name: str) -> bool:
    return str(attrs.get(name, "False")).strip().lower() in ("true", "1")


@dataclass(frozen=True)
class LossHead:
    """A FullyConnected + SoftmaxOutput loss head that can run in row chunks.

    Attributes
    ----------
    fc, softmax : str
        Node names of the classifier and of the loss.
    data : Entry
        The classifier's input tensor, (rows, hidden).
    weight, bias : str
        Parameter variables (bias None with ``no_bias``).
    label : str
        The label variable (reshaped to (rows,) on the way, if at all).
    rows, hidden, classes : int
        N, H and V.
    fc_attrs, softmax_attrs : dict
        Operator parameters as MXNet's JSON gives them.
    """

    fc: str
    softmax: str
    data: Entry
    weight: str
    bias: Optional[str]
    label: str
    rows: int
    hidden: int
    classes: int
    fc_attrs: Dict[str, str]
    softmax_attrs: Dict[str, str]

    @property
    def nodes(self) -> FrozenSet[str]:
        """The two operators the head computes."""
        return frozenset({self.fc, self.softmax})

    def head_bytes(self, chunks: int, extra_input_rows: bool = False) -> int:
        """Bytes a chunked head holds: the output and :func:`head_buffer_floats`' buffers
        (``extra_input_rows``: the input's gradient is accumulated, 'add')."""
        sizes = head_buffer_floats(self.rows, self.hidden, self.classes, chunks,
                                   "add" if extra_input_rows else "write", "write", "write")
        return 4 * (self.rows * self.classes + sum(sizes.values()))


def head_buffer_floats(rows: int, hidden: int, classes: int, chunks: int, data_req: str,
                       weight_req: str, bias_req: str) -> Dict[str, int]:
    """Floats of each buffer a chunked head allocates beside its (rows, classes) output
    (NOTE [ chunked loss head ]): ``work`` (a row chunk's classifier output in forward, a
    tile's loss gradient in backward), ``one_hot`` (the tile's labels), ``data_work`` (a
    tile's partial input gradient), ``weight_work`` / ``bias_work`` (a tile's partial weight
    and bias gradient rows)."""
    step = head_chunk_rows(rows, chunks)
    tile_rows, block = head_tile(rows, classes, chunks)
    row_parts, blocks = -(-rows // tile_rows), -(-classes // block)
    return {"work": max(step * classes, tile_rows * block), "one_hot": tile_rows * block,
            "data_work": tile_rows * hidden if (blocks > 1 or data_req == "add") else 0,
            "weight_work": block * hidden if (row_parts > 1 or weight_req != "write") else 0,
            "bias_work": block if (row_parts > 1 or bias_req != "write") else 0}


def head_tile(rows: int, classes: int, chunks: int) -> Tuple[int, int]:
    """Rows and classes of a tile of a chunked head's backward: ``chunks`` column blocks of the
    classes, and about sqrt(chunks) row parts (a multiple of HEAD_ROW_MULTIPLE rows), so that a
    tile's partial input and weight gradients are small (NOTE [ chunked loss head ])."""
    block = max(1, -(-classes // max(1, chunks)))
    return head_chunk_rows(rows, math.ceil(math.sqrt(max(1, chunks)))), block


def loss_head(graph: Graph) -> Tuple[Optional[LossHead], str]:
    """The graph's FullyConnected + SoftmaxOutput loss head, or None and why it cannot be chunked.

    See NOTE [ chunked loss head ].
    """
    if len(graph.heads) != 1:
        return None, "the graph has several outputs"
    sm_index, _ = graph.heads[0]
    softmax = graph.nodes[sm_index]
    if softmax.op != "SoftmaxOutput":
        return None, f"the output is {softmax.op}, not SoftmaxOutput"
    attrs = dict(softmax.attrs)
    for name in ("multi_output", "preserve_shape", "out_grad"):
        if _flag(attrs, name):
            return None, f"SoftmaxOutput has {name}=True (its gradient is not row-local as chunked)"
    if float(attrs.get("smooth_alpha", 0.0) or 0.0) != 0.0:
        return None, "SoftmaxOutput has smooth_alpha (label smoothing is not chunked)"
    if attrs.get("normalization", "null") not in ("null", "batch", "valid"):
        return None, f"unknown SoftmaxOutput normalization {attrs.get('normalization')!r}"
    if len(softmax.inputs) != 2:
        return None, "SoftmaxOutput without a label input"
    (fc_index, fc_out), (label_index, _) = softmax.inputs
    fc = graph.nodes[fc_index]
    if fc.op != "FullyConnected" or fc_out != 0:
        return None, "SoftmaxOutput does not read a FullyConnected"
    consumers = graph.consumers()
    if consumers[fc_index] != [sm_index]:
        return None, "the classifier's output has other readers"
    label = graph.nodes[label_index]
    while label.kind is NodeKind.OP:
        if label.op not in _LABEL_RESHAPES or len(label.inputs) != 1:
            return None, f"the label is computed ({label.op}), not a reshaped variable"
        label = graph.nodes[label.inputs[0][0]]
    fc_attrs = dict(fc.attrs)
    no_bias = _flag(fc_attrs, "no_bias")
    if len(fc.inputs) != (2 if no_bias else 3):
        return None, "unexpected FullyConnected inputs"
    data_index, data_out = fc.inputs[0]
    weight = graph.nodes[fc.inputs[1][0]]
    bias = None if no_bias else graph.nodes[fc.inputs[2][0]]
    if weight.kind is not NodeKind.PARAM or (bias is not None and bias.kind is not NodeKind.PARAM):
        return None, "the classifier's weight or bias is computed, not a parameter"
    if graph.nodes[data_index].kind is not NodeKind.OP:
        return None, "the classifier reads a variable directly (nothing to split before it)"
    data_shapes = graph.nodes[data_index].output_shapes
    data_shape = tuple(data_shapes[data_out]) if data_out < len(data_shapes) else ()
    out_shape = tuple(fc.output_shapes[0]) if fc.output_shapes else ()
    if len(data_shape) != 2 or len(out_shape) != 2 or data_shape[0] != out_shape[0]:
        return None, f"the classifier's input {data_shape} is not (rows, hidden)"
    label_shape = tuple(label.output_shapes[0]) if label.output_shapes else ()
    if math.prod(label_shape) != out_shape[0]:
        return None, f"the label {label_shape} is not one class per row (probability labels?)"
    return LossHead(fc.name, softmax.name, (graph.nodes[data_index].name, data_out), weight.name,
                    bias.name if bias is not None else None, label.name, out_shape[0], data_shape[1],
                    out_shape[1], fc_attrs, attrs), ""


#: Chunk rows are a multiple of this: CPU GEMM kernels (MKLDNN, OpenBLAS) give a row other bits
#: when the row count is not (measured: 13-row chunks of a 64 x 16 x 20000 product differ in the
#: last bit from the whole product, 16-row chunks do not; 96-200-row chunks of 3200 x 512 x
#: 10000 match too).
HEAD_ROW_MULTIPLE = 16


def head_chunk_rows(rows: int, chunks: int) -> int:
    """Rows per chunk when ``rows`` are split in (at most) ``chunks`` chunks."""
    step = -(-rows // max(1, chunks))
    step = -(-step // HEAD_ROW_MULTIPLE) * HEAD_ROW_MULTIPLE
    return max(1, min(rows, step))


def head_chunk_count(head: LossHead, chunk_bytes: Optional[int] = None) -> int:
    """Row chunks for a head: work buffers of about ``chunk_bytes`` (default
    :data:`HEAD_CHUNK_BYTES`; 0 when one chunk would do)."""
    chunk_bytes = HEAD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(HEAD_ROW_MULTIPLE, chunk_bytes // (4 * head.classes) // HEAD_ROW_MULTIPLE
               * HEAD_ROW_MULTIPLE)
    chunks = -(-head.rows // rows)
    return chunks if chunks > 1 else 0


def plan_segments_with_head(graph: Graph, count: int, head: LossHead,
                            grad_factor: float = DEFAULT_GRAD_FACTOR,
                            chain: Optional[CutChain] = None) -> SegmentPlan:
    """A plan with (at most) ``count`` segments whose last one is exactly the loss head, run in
    :func:`head_chunk_count` row chunks (NOTE [ chunked loss head ])."""
    late = graph.as_late_as_possible()
    crossings = _crossings_of(late)
    position = {node.name: p for p, node in enumerate(late.nodes)}
    first_head = min(position[head.fc], position[head.softmax])
    owned_before = [p for p in range(first_head) if crossings.owned[p]]
    if not owned_before:
        raise ValueError("nothing to compute before the loss head")
    head_cut = owned_before[-1]
    chain = chain if chain is not None else full_cut_chain(graph, grad_factor)
    # choose_cuts spreads the working set of the whole graph; the head's share is large, so ask
    # for proportionally more pieces to get about ``count - 1`` before the head.
    before, total = chain.need_prefix[head_cut + 1], chain.need_prefix[-1]
    scaled = max(1, math.ceil((count - 1) * total / before)) if before > 0 else count - 1
    cuts = {c for c in choose_cuts(graph, min(scaled, len(late.nodes)), chain, grad_factor)
            if c < head_cut} | {head_cut}
    # The operators that merge the steps into the head's input (an unrolled RNN's expand_dims
    # + Concat + Reshape) get a segment of their own: with the last steps they planned 51-57 MB
    # against 36-43 for the other segments (the merged tensor and its gradient's split).
    merge = head_cut
    while merge > 0 and (not crossings.owned[merge] or late.nodes[merge].op in _MERGE_OPS):
        merge -= 1
    if merge < head_cut and crossings.owned[merge] and crossings.valid(merge):
        cuts = {c for c in cuts if c < merge} | {merge, head_cut}
    cuts = sorted(cuts)
    plan = segment_plan_for_cuts(graph, cuts, chain, grad_factor)
    if set(plan.segments[-1].nodes) - {n for n in plan.segments[-1].nodes
                                       if late.node(n).op in _LABEL_RESHAPES} != head.nodes:
        raise ValueError("the last segment is not exactly the loss head")
    return plan.with_head_chunks(max(2, head_chunk_count(head)))
