"""The arrays a segment chain allocates beside its executors' pool, in one object that both
allocates them (``mx/segments/chain.py``) and counts them for the static figure
(``mx/segments/measure.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping

from .plan import Entry, SegmentPlan

__all__ = ["gradient_slots"]


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

