"""The arrays a segment chain allocates beside its executors' pool, in one object that both
allocates them (``mx/segments/chain.py``) and counts them for the static figure
(``mx/segments/measure.py``).

# NOTE [ the chain's own arrays ]
# Beside the memory pool its executors share (NOTE [ the shared pool's union ]),
# a chain allocates arrays of its own: each boundary's value and gradient (the
# gradients once per slot, NOTE [ boundary gradients share arrays ]), and, with
# several segments, a copy of the outputs (NOTE [ outputs outlive the re-runs ]
# in mx/segments/chain.py), or the arrays of a chunked loss head instead (NOTE
# [ chunked loss head ]).  Each producing executor also holds the head-gradient
# copy of its outputs (``backward(out_grads)``), and a boundary gathered into a
# merged tensor has its gradient slice taken into a temporary (NOTE [ gathered
# steps ] in mx/segments/gather.py).  :class:`ChainLayout` lists all of them with
# each tensor's shape and element type: the chain allocates from it and the static
# figure counts it, so the two cannot drift apart, and a float16 or float64 chain is
# counted at its own element size.  (The pool is what MXNet reports, 4 bytes per
# element whatever the type.)  The planner's estimate (``SegmentPlan.boundary_bytes``)
# counts the same boundaries from the graph's element sizes
# (:func:`~mxnet_mirror_hook.core.segments.tensors.graph_tensor`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

from .head import head_buffer_floats
from .plan import Entry, SegmentPlan, as_entry
from .tensors import TensorSpec

__all__ = ["HeadArrays", "ChainLayout", "gradient_slots"]


@dataclass(frozen=True)
class HeadArrays:
    """The arrays a chunked loss head allocates: its (rows, classes) output and the buffers of
    :func:`~mxnet_mirror_hook.core.segments.head.head_buffer_floats`, all of one element type.

    Attributes
    ----------
    rows, hidden, classes, chunks : int
        The head's N, H, V and row chunks.
    data_req, weight_req, bias_req : str
        Gradient requests of the input, weight and bias (``'write'``, ``'add'``, ``'null'``).
    itemsize : int
        Bytes per element (the classifier input's).
    dtype : str
        Its NumPy name, when known.
    """

    rows: int
    hidden: int
    classes: int
    chunks: int
    data_req: str
    weight_req: str
    bias_req: str
    itemsize: int = 4
    dtype: str = ""

    def floats(self) -> Dict[str, int]:
        """Elements of each buffer beside the output (:func:`head_buffer_floats`)."""
        return head_buffer_floats(self.rows, self.hidden, self.classes, self.chunks, self.data_req,
                                  self.weight_req, self.bias_req)

    @property
    def nbytes(self) -> int:
        """Bytes of the output and the buffers."""
        return self.itemsize * (self.rows * self.classes + sum(self.floats().values()))


#: Where a gathered boundary goes: (gathering segment, begin, end) along its concat axis.
GatherPlace = Tuple[int, int, int]


@dataclass(frozen=True)
class ChainLayout:
    """Every array a segment chain allocates beside its executors' pool (NOTE [ the chain's own
    arrays ]).

    Attributes
    ----------
    plan : SegmentPlan
        The chain's split.
    boundaries : dict of Entry to TensorSpec
        Every boundary of ``plan`` (the outputs of all segments but the last).
    gathering : frozenset of int
        Segments that only gather boundaries and run no executor (NOTE [ gathered steps ]).
    gathered : dict of Entry to tuple of (int, int, int)
        Boundaries gathered into a merged tensor, and where each goes.
    shareable : frozenset of Entry
        Boundaries whose gradient may share an array (:func:`gradient_slots`).
    outputs : tuple of TensorSpec
        The chain's copies of the graph outputs (empty with one segment or a chunked head).
    head : HeadArrays or None
        A chunked loss head's arrays.
    """

    plan: SegmentPlan
    boundaries: Mapping[Entry, TensorSpec]
    gathering: FrozenSet[int] = frozenset()
    gathered: Mapping[Entry, Tuple[GatherPlace, ...]] = field(default_factory=dict)
    shareable: FrozenSet[Entry] = frozenset()
    outputs: Tuple[TensorSpec, ...] = ()
    head: Optional[HeadArrays] = None

    @functools.cached_property
    def gathered_only(self) -> FrozenSet[Entry]:
        """Boundaries that only gathering segments read: no value or gradient array of their own."""
        readers: Dict[Entry, set] = {}
        for segment in self.plan.segments:
            for entry in segment.inputs:
                readers.setdefault(as_entry(entry), set()).add(segment.index)
        return frozenset(e for e in self.gathered if readers.get(as_entry(e), set()) <= self.gathering)

    @functools.cached_property
    def values(self) -> Dict[Entry, TensorSpec]:
        """Boundaries with a value (and a gradient) array, in forward order."""
        return {e: spec for e, spec in self.boundaries.items() if e not in self.gathered_only}

    @functools.cached_property
    def gradient_slot(self) -> Dict[Entry, int]:
        """The gradient array (slot) of each boundary in :attr:`values`."""
        return gradient_slots(self.plan, {e: spec.key for e, spec in self.values.items()},
                              self.shareable)

    @functools.cached_property
    def slots(self) -> Dict[int, TensorSpec]:
        """Each gradient array, by slot."""
        found: Dict[int, TensorSpec] = {}
        for entry, slot in self.gradient_slot.items():
            found.setdefault(slot, self.values[entry])
        return found

    @functools.cached_property
    def head_gradient_copies(self) -> Dict[Entry, TensorSpec]:
        """Boundaries whose producing executor holds a head-gradient copy (all but the outputs
        of gathering segments, which run no executor)."""
        merged = {as_entry(e) for index in self.gathering for e in self.plan.segments[index].outputs}
        return {e: spec for e, spec in self.boundaries.items() if e not in merged}

    def largest_slice_bytes(self) -> int:
        """Bytes of the largest gathered boundary (the temporary its gradient slice takes)."""
        return max((self.boundaries[e].nbytes for e in self.gathered), default=0)

    def boundary_bytes(self) -> int:
        """Bytes of the boundary values, their gradient arrays, the executors' head-gradient
        copies and the largest gathered slice."""
        return (sum(s.nbytes for s in self.values.values()) + sum(s.nbytes for s in self.slots.values())
                + sum(s.nbytes for s in self.head_gradient_copies.values()) + self.largest_slice_bytes())

    def output_bytes(self) -> int:
        """Bytes of the chain's copies of the outputs."""
        return sum(s.nbytes for s in self.outputs)

    def head_bytes(self) -> int:
        """Bytes of a chunked loss head's arrays (0 without one)."""
        return self.head.nbytes if self.head is not None else 0


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
def gradient_slots(plan: SegmentPlan, keys: Mapping[Entry, Any],
                   shareable: Iterable[Entry] = ()) -> Dict[Entry, int]:
    """An array slot for the gradient of each boundary in ``keys``; boundaries in
    ``shareable`` with equal keys (shape and type) share a slot when their lives do not overlap
    (NOTE [ boundary gradients share arrays ]).

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
    slots: Dict[Entry, int] = {}
    free_from: Dict[int, int] = {}           # slot -> first step it may be written again
    slot_key: Dict[int, Any] = {}
    for written, read, entry in _gradient_lives(plan, keys, shareable):
        found = [slot for slot, step in free_from.items()
                 if slot_key[slot] == keys[entry] and step <= written]
        slot = min(found) if found else len(slot_key)
        slot_key[slot] = keys[entry]
        free_from[slot] = read
        slots[entry] = slot
    for entry in sorted(as_entry(e) for e in keys):
        if entry not in slots:
            slots[entry] = len(slot_key)
            slot_key[slots[entry]] = keys[entry]
    return slots


def _gradient_lives(plan: SegmentPlan, keys: Mapping[Entry, Any],
                    shareable: Iterable[Entry]) -> List[Tuple[int, int, Entry]]:
    """(backward step writing it, step reading it, entry) of each shareable boundary in
    ``keys`` read by one segment, sorted (step 0: the last segment's)."""
    producer = {as_entry(e): s.index for s in plan.segments for e in s.outputs}
    readers: Dict[Entry, List[int]] = {}
    for segment in plan.segments:
        for entry in segment.inputs:
            readers.setdefault(as_entry(entry), []).append(segment.index)
    last = plan.count - 1
    lives = []
    for entry in shareable:
        entry = as_entry(entry)
        if entry not in keys or len(readers.get(entry, ())) != 1 or entry not in producer:
            continue
        lives.append((last - readers[entry][0], last - producer[entry], entry))
    return sorted(lives, key=lambda item: (item[0], item[1], item[2]))
