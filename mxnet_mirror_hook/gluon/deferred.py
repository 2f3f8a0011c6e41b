"""Deferred initialization at the first mirrored forward, in the order plain Gluon's forward runs it."""
from __future__ import annotations

from typing import Any, List, Sequence, Set

import mxnet as mx
from mxnet import gluon
from mxnet.gluon.block import _flatten, _regroup

__all__ = ["finish_deferred_init"]

# NOTE [ deferred initialization in plain Gluon's order ]
# Parameters whose shape is known only at the first forward (``in_channels=0``, Dense without
# ``in_units``) are initialized then, each drawing its initial values from the one global random
# generator: the order in which they are initialized decides which values each gets.  Plain Gluon's
# first forward initializes them
#  * in a hybridized block (CachedOp, ``_build_cache``): in the order of the traced graph's inputs
#    (``symbol.list_inputs()``), after inferring every shape from the call's inputs;
#  * in a block that is not hybridized: block by block as the forward calls them, each block's
#    ``params`` in their own order when one of its registered Parameters is still deferred; a
#    hybridized child initializes its own subtree in its graph's order.
# A mirrored forward never runs those paths (the executor reads the Parameters' arrays), so it
# initializes the Parameters in the same order itself before binding: the graph's order for a
# hybridized block; for a block that is not, the call order found by a symbolic call of the block
# with forward hooks on every child.  Initializing in another order (``collect_params()``'s, as
# before) trains from other initial weights at the same seed.  One difference remains for a block
# that is not hybridized: plain Gluon runs each layer's forward before the next layer is initialized,
# so a forward that draws random numbers (Dropout) before a lazily initialized layer shifts that
# layer's draws; the mirrored forward initializes everything first.


def finish_deferred_init(block: "gluon.HybridBlock", args: Sequence[Any]) -> None:
    """Initialize ``block``'s deferred Parameters for the call ``block(*args)`` as plain Gluon would.

    Parameters
    ----------
    block : gluon.HybridBlock
        The mirrored block.
    args : sequence
        The call's positional inputs (NDArrays, None, nested lists and tuples of them).
    """
    params = list(block.collect_params().values())
    if not any(param._deferred_init for param in params):
        return
    block._deferred_infer_shape(*args)  # traces with the call's structure, as Gluon's forward does
    order = _graph_order(block, args) if block._active else _call_order(block, args)
    for param in order + params:  # then any Parameter the graph does not read, as before
        param._finish_deferred_init()


def _graph_order(block: "gluon.HybridBlock", args: Sequence[Any]) -> List["gluon.Parameter"]:
    """A hybridized block's Parameters in the order its CachedOp initializes them."""
    _, out = block._get_graph(*args)
    params = block.collect_params()
    return [params[name] for name in out.list_inputs() if name in params]


def _call_order(block: "gluon.HybridBlock", args: Sequence[Any]) -> List["gluon.Parameter"]:
    """A not hybridized block's Parameters in the order its imperative forward initializes them."""
    order: List["gluon.Parameter"] = []
    inside: List[bool] = []  # per open call: whether it runs inside a hybridized block
    done: Set[int] = set()  # ids of the Parameters already in ``order``

    def before(child: "gluon.Block", inputs: Any) -> None:
        outer = bool(inside and inside[-1])
        hybridized = isinstance(child, gluon.HybridBlock) and child._active
        inside.append(outer or hybridized)  # first: tracing a hybridized child calls its children
        if outer or not isinstance(child, gluon.HybridBlock):
            return
        if hybridized:
            found = _graph_order(child, inputs)
        elif any(p._deferred_init and id(p) not in done for p in child._reg_params.values()):
            found = list(child.params.values())
        else:
            found = []
        order.extend(found)
        done.update(id(p) for p in found)

    def after(child: "gluon.Block", inputs: Any, output: Any) -> None:
        inside.pop()

    handles: List[Any] = []
    block.apply(lambda child: None if child is block else handles.extend(
        (child.register_forward_pre_hook(before), child.register_forward_hook(after))))
    symbols = _symbols_like(args)
    before(block, symbols)  # the block itself without its own hooks, as Gluon's trace calls it
    try:
        type(block).forward(block, *symbols)
    finally:
        for handle in handles:
            handle.detach()
    return order


def _symbols_like(args: Sequence[Any]) -> List[Any]:
    """Symbol variables in the structure of ``args`` (None stays None)."""
    flat, fmt = _flatten(list(args), "input")
    symbols = [None if x is None else mx.sym.var(f"data{i}") for i, x in enumerate(flat)]
    return list(_regroup(symbols, fmt))
