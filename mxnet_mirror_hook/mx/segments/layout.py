"""The chain's own arrays from MXNet's inference: the bindings of each variable, the gradient
requests they give, and the :class:`~mxnet_mirror_hook.core.segments.layout.ChainLayout` both the
chain and the static figure use."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import mxnet as mx

from ...core.segments.plan import Entry, SegmentPlan
from .split import boundary_name, source_name

__all__ = ["reader_bindings", "shareable_gradients", "summed_request"]


def reader_bindings(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"]) -> Dict[str, int]:
    """Bindings of each argument and boundary over a chain's segments (NOTE [ one variable
    per reader ]: a segment may bind one several times); a chunked head reads its segment's
    variables and inputs once."""
    readers: Dict[str, int] = {}
    for index, segment in enumerate(plan.segments):
        if plan.head_chunks and index == plan.count - 1:
            names = list(segment.variables) + [boundary_name(e) for e in segment.inputs]
        else:
            names = [source_name(n) for n in symbols[index].list_arguments()]
        for name in names:
            readers[name] = readers.get(name, 0) + 1
    return readers


def shareable_gradients(plan: SegmentPlan, gathers: Mapping[int, Any],
                        gathered: Mapping[Entry, Any], readers: Mapping[str, int]) -> List[Entry]:
    """Boundaries whose gradient array may be shared (NOTE [ boundary gradients share arrays ]
    in core/segments.py): bound once, so written with 'write', and not gathered."""
    merged = {tuple(e) for index in gathers for e in plan.segments[index].outputs}
    return [tuple(e) for e in plan.boundaries
            if readers.get(boundary_name(e), 0) == 1 and tuple(e) not in gathered
            and tuple(e) not in merged]


def summed_request(request: str, readers: int) -> str:
    """The gradient request a segment binds for a variable the user asked ``request`` of:
    'null' stays, a variable bound by several readers (segments, or readers inside one: NOTE [
    one variable per reader ]) sums its gradients ('add'), and 'inplace' is 'write'."""
    if request == "null":
        return "null"
    return "add" if readers > 1 else ("write" if request == "inplace" else request)

