"""A mirrored block's call signature: nested lists and tuples of NDArrays, and None, in and out."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import mxnet as mx
from mxnet import gluon
from mxnet.gluon.block import _flatten, _regroup

from ..errors import GluonMirrorError

__all__ = ["Trace", "Call", "flatten_call", "has_symbol", "trace"]

# NOTE [ nested inputs and outputs of a mirrored block ]
# Gluon blocks are called with NDArrays, None for an optional input (BERT's valid_length) and nested
# lists or tuples of them (a language model's list of states), and return the same.  A mirrored
# forward flattens the call as a hybridized block does (Gluon's `_flatten`): the executor's inputs
# are the NDArrays in order (`data`, or `data0`, `data1`... when there are several, the names
# Gluon's trace gives them), None leaves no input.  The block is traced once per input structure
# (`Trace`, keyed by the structure): the first through `HybridBlock._get_graph`, which the block
# caches and `export()` and the CachedOp reuse, a later different structure without touching that
# cache.  The executor's outputs are regrouped into the structure the traced block returned.


class Trace(NamedTuple):
    """The traced symbol of one input structure."""

    key: str  # the input structure (Gluon's format of the flattened call), as text
    names: List[str]  # the symbol's data inputs, one per NDArray of the call, in order
    symbol: "mx.sym.Symbol"  # every output of the block, flattened
    out_format: Any  # how to regroup the outputs (Gluon's format)


class Call(NamedTuple):
    """One mirrored call: its trace, its input arrays and the gradients they need."""

    trace: Trace
    arrays: List["mx.nd.NDArray"]  # the call's NDArrays, in the order of ``trace.names``
    requests: Dict[str, str]  # grad_req of every argument of the symbol
    leaves: List[Tuple[str, "mx.nd.NDArray"]]  # (name, input) pairs with an attached gradient


def has_symbol(args: Any) -> bool:
    """Whether (nested) ``args`` hold a Symbol (the block is being traced by a parent)."""
    if isinstance(args, mx.sym.Symbol):
        return True
    return isinstance(args, (list, tuple)) and any(has_symbol(x) for x in args)


def flatten_call(block: "gluon.HybridBlock", args: Sequence[Any]) -> Tuple[List["mx.nd.NDArray"], Any]:
    """The NDArrays of a call, in order, and the call's structure.

    Raises
    ------
    GluonMirrorError
        When an input is neither an NDArray, None nor a list or tuple of them, or when every input
        is None.
    """
    try:
        flat, structure = _flatten(list(args), "input")
    except ValueError:
        flat, structure = [object()], None
    arrays = [x for x in flat if x is not None]
    if not arrays or not all(isinstance(x, mx.nd.NDArray) for x in arrays):
        raise GluonMirrorError(f"a mirrored {type(block).__name__} takes NDArrays, None and (nested) "
                               f"lists or tuples of them as positional inputs (got "
                               f"{_describe(args)}); call unmirror(net) for this block")
    return arrays, structure


def _describe(args: Any) -> Any:
    if isinstance(args, (list, tuple)):
        return [_describe(x) for x in args]
    return type(args).__name__


def trace(block: "gluon.HybridBlock", args: Sequence[Any], structure: Any) -> Trace:
    """Trace ``block`` for a call with ``args`` (of ``structure``) to a symbol."""
    if not block._cached_graph or block._in_format == structure:
        inputs, symbol = block._get_graph(*args)
        return Trace(repr(structure), [x.name for x in inputs], symbol, block._out_format)
    # Another structure than the one the block cached: trace as _get_graph does, without caching.
    flat, _ = _flatten(list(args), "input")
    count = sum(x is not None for x in flat)
    names = ["data"] if count == 1 else [f"data{i}" for i in range(count)]
    variables = iter([mx.sym.var(name) for name in names])
    grouped = _regroup([None if x is None else next(variables) for x in flat], structure)
    params = {name: param.var() for name, param in block._reg_params.items()}
    with block.name_scope():
        out = block.hybrid_forward(mx.sym, *grouped, **params)
    outputs, out_format = _flatten(out, "output")
    return Trace(repr(structure), names, mx.sym.Group(outputs), out_format)
