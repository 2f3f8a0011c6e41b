"""The types of a segment plan: one segment (:class:`SegmentSpec`) and the split (:class:`SegmentPlan`).

See NOTE [ executor segments ] in :mod:`mxnet_mirror_hook.core.segments`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..graph import Graph
from ..liveness import drop_unread_copies

__all__ = ["Entry", "HEAD_GRAD_COPIES", "DEFAULT_GRAD_SUM_CAP", "SegmentSpec", "SegmentPlan", "entry_key",
           "as_entry"]


#: A tensor: (producing node's name, output index).
Entry = Tuple[str, int]

#: Bytes of each boundary tensor counted by the estimate: its stored value, the
#: gradient array the consumers write, and the head-gradient copy the producing
#: executor makes in ``backward(out_grads)`` (segment-executors research).
HEAD_GRAD_COPIES = 3

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


#: ``MXNET_EXEC_INPLACE_GRAD_SUM_CAP`` segments are bound and measured under by default
#: (NOTE [ the gradient-sum cap is read once per process ] in mx/segments/environment.py).
DEFAULT_GRAD_SUM_CAP = 2


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
        ``mx/segments/chain.py``).  Without it a chain refuses such segments.
    head_chunks : int
        0, or the number of row chunks the last segment (a FullyConnected +
        SoftmaxOutput loss head, :func:`loss_head`) is run in instead of one
        executor (NOTE [ chunked loss head ]).
    kept : tuple of int
        Segments that keep their activations from forward to backward in a memory pool of their
        own and are not re-run (NOTE [ selective segments ] in core/segments/selective.py); the
        others share the pool and are re-run as before.  Never the last segment.
    grad_sum_cap : int or None
        ``MXNET_EXEC_INPLACE_GRAD_SUM_CAP`` the segments are measured and bound under (None:
        MXNet's default, for networks MXNet cannot bind under the cap; NOTE [ a network the
        cap cannot bind ] in planning/candidates.py).
    """

    segments: Tuple[SegmentSpec, ...]
    boundary_bytes: int
    estimated_bytes: int
    recompute_fraction: float
    boundary_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    replay_random: bool = False
    head_chunks: int = 0
    kept: Tuple[int, ...] = ()
    grad_sum_cap: Optional[int] = DEFAULT_GRAD_SUM_CAP

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
        ``skip``: segments bound as no executor (NOTE [ gathered steps ] in mx/segments/gather.py).
        Kept segments (:attr:`kept`) own their pools and are not in this order."""
        skipped = set(skip) | set(self.kept)
        return sorted((i for i in range(self.executor_count()) if i not in skipped),
                      key=lambda i: (-self.segments[i].working_bytes, i))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe form (for the plan cache and ``MirrorPlan.to_dict``)."""
        return {"segments": [s.to_dict() for s in self.segments],
                "boundary_bytes": self.boundary_bytes, "estimated_bytes": self.estimated_bytes,
                "recompute_fraction": self.recompute_fraction,
                "boundary_shapes": {k: list(v) for k, v in self.boundary_shapes.items()},
                "replay_random": self.replay_random, "head_chunks": self.head_chunks,
                "kept": list(self.kept), "grad_sum_cap": self.grad_sum_cap}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegmentPlan":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(SegmentSpec.from_dict(s) for s in data["segments"]),
                   int(data["boundary_bytes"]), int(data["estimated_bytes"]),
                   float(data["recompute_fraction"]),
                   {k: tuple(v) for k, v in data.get("boundary_shapes", {}).items()},
                   bool(data.get("replay_random", False)), int(data.get("head_chunks", 0)),
                   tuple(int(i) for i in data.get("kept", ())),
                   _optional_int(data.get("grad_sum_cap", DEFAULT_GRAD_SUM_CAP)))

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

    def with_kept(self, kept: Iterable[int]) -> "SegmentPlan":
        """The same split with the segments ``kept`` keeping their activations (not re-run)."""
        chosen = tuple(sorted({int(i) for i in kept}))
        if any(not 0 <= i < self.count - 1 for i in chosen):
            raise ValueError(f"kept segments must be among the first {self.count - 1} (the last "
                             f"segment is never re-run); got {list(chosen)}")
        return dataclasses.replace(self, kept=chosen)

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


def as_entry(entry: Sequence[Any]) -> Entry:
    """``entry`` (a tuple, or a list read from JSON) as an :data:`Entry` tuple."""
    return (entry[0], entry[1])


def entry_key(entry: Entry) -> str:
    """``"node:output"``, the key of a boundary in :attr:`SegmentPlan.boundary_shapes`."""
    return f"{entry[0]}:{entry[1]}"


def _optional_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)
