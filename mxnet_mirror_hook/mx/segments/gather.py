"""Segments that only place boundary tensors side by side, and run no executor
(NOTE [ gathered steps ])."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx

from ...core.segments.plan import Entry, SegmentPlan
from .split import boundary_name

__all__ = ["GatherLayout", "gather_layout", "find_gathers"]

# NOTE [ gathered steps ]
# An unrolled language model merges its steps' outputs into the classifier's
# input (expand_dims + Concat + Reshape: the rows of an (N, T, H) tensor).  As
# a segment of its own that is pure data movement, yet each step's output is
# a boundary (value, gradient, the head-gradient copy of its executor) and
# the merged tensor another (three copies again): 6 x N x T x H floats, and
# the segment's own plan (the merged tensor and the split of its gradient).
# A segment made only of expand_dims, one Concat and a row-major reshape of
# boundaries (:func:`gather_layout`) gets no executor: each producer's forward
# writes its output straight into its place in the merged tensor's array
# (``_slice_assign`` in place), and its backward takes its head gradient as
# a slice of the merged tensor's gradient.  A step's output that other
# segments read too keeps its arrays (the slice is added to its gradient).
# The values are the same (copies); the gradients too (Concat's backward is
# that slicing).  Counted in the static figure: the merged tensor's value and
# gradient, the producers' head-gradient copies, and the largest slice.


@dataclass(frozen=True)
class GatherLayout:
    """A segment that only places boundary tensors side by side (NOTE [ gathered steps ]).

    Attributes
    ----------
    shape : tuple of int
        Shape of the concatenation (the segment's output is that, reshaped row-major).
    axis : int
        Concatenation axis.
    pieces : tuple of (str, int, int)
        Per boundary variable: its name and its ``[begin, end)`` along ``axis``.
    """

    shape: Tuple[int, ...]
    axis: int
    pieces: Tuple[Tuple[str, int, int], ...]

    def piece_shape(self, begin: int, end: int) -> Tuple[int, ...]:
        """Shape of ``[begin, end)`` along the axis."""
        return tuple(end - begin if i == self.axis else d for i, d in enumerate(self.shape))

    def region(self, begin: int, end: int) -> Dict[str, str]:
        """``slice`` / ``_slice_assign`` parameters of ``[begin, end)`` along the axis."""
        low = tuple(begin if i == self.axis else None for i in range(len(self.shape)))
        high = tuple(end if i == self.axis else None for i in range(len(self.shape)))
        return {"begin": str(low), "end": str(high)}


_RESHAPES = frozenset({"Reshape", "reshape", "Flatten", "flatten"})
_CONCATS = frozenset({"Concat", "concat"})


def gather_layout(symbol: "mx.sym.Symbol", shapes: Mapping[str, Tuple[int, ...]]) -> Optional[GatherLayout]:
    """The :class:`GatherLayout` of a segment symbol made only of ``expand_dims``, one ``Concat``
    and a final row-major reshape over boundary variables each read once, else None."""
    document = json.loads(symbol.tojson())
    nodes = document["nodes"]
    if len(document["heads"]) != 1:
        return None
    index = document["heads"][0][0]
    while nodes[index]["op"] in _RESHAPES:
        index = nodes[index]["inputs"][0][0]
    concat = nodes[index]
    if concat["op"] not in _CONCATS:
        return None
    attrs = concat.get("attrs") or {}
    names = [n["name"] for n in nodes if n["op"] == "null"]
    if any(not n.endswith("_segment_boundary") for n in names) or len(set(names)) != len(names):
        return None
    sources = []
    for ref in concat["inputs"]:
        node, expanded = nodes[ref[0]], None
        if node["op"] == "expand_dims":
            expanded = int((node.get("attrs") or {}).get("axis", 0))
            node = nodes[node["inputs"][0][0]]
        if node["op"] != "null":
            return None
        sources.append((node["name"], expanded))
    if len({name for name, _ in sources}) != len(sources) or set(names) != {n for n, _ in sources}:
        return None
    ndim = len(shapes[sources[0][0]]) + (1 if sources[0][1] is not None else 0)
    axis = int(attrs.get("dim", 1))
    axis = axis + ndim if axis < 0 else axis
    pieces: List[Tuple[str, int, int]] = []
    offset = 0
    shape: Optional[List[int]] = None
    for name, expanded in sources:
        piece = list(shapes[name])
        if expanded is not None:
            if (expanded + ndim if expanded < 0 else expanded) != axis:
                return None
            piece.insert(axis, 1)
        if len(piece) != ndim:
            return None
        if shape is None:
            shape = list(piece)
            shape[axis] = 0
        if [d for i, d in enumerate(piece) if i != axis] != [d for i, d in enumerate(shape) if i != axis]:
            return None
        pieces.append((name, offset, offset + piece[axis]))
        offset += piece[axis]
    assert shape is not None  # sources is not empty
    shape[axis] = offset
    return GatherLayout(tuple(shape), axis, tuple(pieces))


def find_gathers(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"],
                 shapes: Mapping[str, Tuple[int, ...]]
                 ) -> Tuple[Dict[int, GatherLayout], Dict[Entry, List[Tuple[int, int, int]]]]:
    """The gathering segments of a split (NOTE [ gathered steps ]): their layouts by segment
    index, and for each gathered boundary the ``(segment, begin, end)`` places it goes to (the
    boundaries nothing but gathers read get no arrays of their own:
    :attr:`~mxnet_mirror_hook.core.segments.layout.ChainLayout.gathered_only`)."""
    gathers: Dict[int, GatherLayout] = {}
    for index in range(1, plan.count - 1):  # the first has nothing to gather, the last no reader
        layout = gather_layout(symbols[index], shapes)
        if layout is not None:
            gathers[index] = layout
    by_name = {boundary_name(e): e for s in plan.segments for e in s.inputs}
    gathered: Dict[Entry, List[Tuple[int, int, int]]] = {}
    for index, layout in gathers.items():
        for name, begin, end in layout.pieces:
            gathered.setdefault(by_name[name], []).append((index, begin, end))
    return gathers, gathered

