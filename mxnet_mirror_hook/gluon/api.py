"""``mirror(net)`` and its companions: switch mirroring on and off for a Gluon block."""
from __future__ import annotations

import logging
import weakref
from typing import Any, Optional, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ..errors import UnsupportedBlockError
from ..options import MirrorOptions, takes_options
from ..plan import MirrorPlan
from .hooks import REGISTRY
from .signature import has_symbol
from .state import MirrorState, UntraceableBlockError

logger = logging.getLogger(__name__)

__all__ = ["mirror", "unmirror", "is_mirrored", "mirror_state", "plan_block"]

#: The instance attribute holding a mirrored block's :class:`MirrorState`.
STATE_ATTR = "_mirror_hook_state"


@takes_options
def mirror(block: "gluon.HybridBlock", *, options: Optional[MirrorOptions] = None, max_shapes: int = 2,
           max_pending: int = 2, **overrides: Any) -> "gluon.HybridBlock":
    """Mirror ``block`` in place whenever autograd records for training; returns ``block``.

    ``net = mirror(net)`` (or just ``mirror(net)``) may come before
    ``initialize()``, before or after ``hybridize()``, before the Trainer
    exists.  Afterwards, inside ``autograd.record()`` (training mode) the
    block's forward runs a mirrored executor planned for the input shapes,
    dtypes and context; ``autograd.backward(losses)`` / ``loss.backward()``
    run its backward with the head gradient autograd computed, writing the
    Parameters' gradients before they return, so ``trainer.step`` follows as
    usual.  Outside recording, or under ``autograd.predict_mode()``, the
    block runs exactly as before.  With ``backend='segments'`` (or ``'auto'``
    choosing them) the block runs as a chain of executor segments (NOTE
    [ executor segments behind a mirrored block ]).

    Parameters
    ----------
    block : gluon.HybridBlock
        The network (its outermost block: its inputs must not be outputs of
        recorded operations).
    options : MirrorOptions, optional
        Planning options; the keyword arguments below override its fields.
    max_shapes : int
        Input signatures (shapes/dtypes) whose executors stay bound per
        context; the least recently used is released beyond it.
    max_pending : int
        Forwards per context and signature that may await their backward at
        once (each holds its own executor).
    <mirror options>

    Returns
    -------
    gluon.HybridBlock
        ``block`` itself.

    Raises
    ------
    UnsupportedBlockError
        For a plain (non-hybrid) ``Block``.
    BackendError
        At the first training forward, with ``backend='segments'``, for a
        network that draws random numbers in forward (Dropout): a re-run
        segment would draw other masks.  ``'auto'`` keeps the one-level
        mirror for such networks.
    """
    if not isinstance(block, gluon.HybridBlock):
        raise UnsupportedBlockError(f"mirror() needs a gluon.HybridBlock (it is traced to a symbol), "
                                    f"got {type(block).__name__}; rewrite it as a HybridBlock with "
                                    f"hybrid_forward, or mirror a HybridBlock inside it")
    opts = MirrorOptions.coerce(options, **overrides)
    state = mirror_state(block)
    if state is not None:
        state.reconfigure(opts, max_shapes, max_pending)
    else:
        _attach(block, MirrorState(block, opts, max_shapes, max_pending))
    return block


def _attach(block: "gluon.HybridBlock", state: MirrorState) -> None:
    # Instance attributes: the class, isinstance, parameter names and files stay the block's own.
    object.__setattr__(block, STATE_ATTR, state)
    object.__setattr__(block, "forward", _MirroredForward(block))
    weakref.finalize(block, state.release)  # forwards still waiting must not keep executors alive
    REGISTRY.attach(block)


def _mirrored_forward(block: "gluon.HybridBlock", original: Any, *args: Any) -> Any:
    # NOTE [ a block that cannot be traced trains plainly ]
    # Mirroring binds the block's traced symbol; a hybrid_forward that calls nd.* on
    # its inputs, reads values or branches on them cannot be traced.  Plain Gluon
    # trains such a block (unhybridized), so the plugin must too: the first failed
    # trace logs one warning saying why and the block's own forward runs from then
    # on (``mirror_state(net).plain_reason`` keeps the reason).
    state = mirror_state(block)
    if state is None or state.plain_reason is not None \
            or not (autograd.is_recording() and autograd.is_training()) or has_symbol(args):
        return original(*args)
    try:
        return state.forward(block, args)
    except UntraceableBlockError as error:
        state.plain_reason = str(error)
        logger.warning("mirror: %s; %s trains without mirroring", error, type(block).__name__)
    return original(*args)


class _MirroredForward:
    """The instance ``forward`` of a mirrored block (picklable: it is rebuilt on unpickling)."""

    def __init__(self, block: "gluon.HybridBlock") -> None:
        self._block = weakref.ref(block)
        self.__doc__ = type(block).forward.__doc__

    def __call__(self, *args: Any) -> Any:
        block = self._block()
        if block is None:  # only reachable through a reference kept past the block's life
            raise ReferenceError("the mirrored block of this forward no longer exists")
        return _mirrored_forward(block, type(block).forward.__get__(block), *args)

    def __reduce__(self) -> Tuple[Any, tuple]:
        return _MirroredForward, (self._block(),)


def unmirror(block: "gluon.HybridBlock") -> "gluon.HybridBlock":
    """Switch mirroring off for ``block`` (releases its executors); returns ``block``."""
    state = mirror_state(block)
    if state is None:
        return block
    state.release()
    object.__delattr__(block, STATE_ATTR)
    if "forward" in vars(block):
        object.__delattr__(block, "forward")
    REGISTRY.detach(block)
    return block


def is_mirrored(block: "gluon.Block") -> bool:
    """Whether :func:`mirror` is on for ``block``."""
    return getattr(block, STATE_ATTR, None) is not None


def mirror_state(block: "gluon.Block") -> Optional[MirrorState]:
    """The :class:`MirrorState` of a mirrored block (None when not mirrored)."""
    return getattr(block, STATE_ATTR, None)


def plan_block(block: "gluon.HybridBlock", *inputs: Any, dtype: Any = "float32",
               options: Optional[MirrorOptions] = None, **option_kwargs: Any) -> MirrorPlan:
    """The plan :func:`mirror` would use for these inputs, without training (nothing is bound).

    Parameters
    ----------
    block : gluon.HybridBlock
        Mirrored or not; initialized (deferred shapes are completed from the
        inputs).
    *inputs : NDArray, tuple of int, None, or (nested) lists of them
        Sample inputs as the block is called with them, each array given
        itself or by its shape (then zeros of ``dtype`` on the CPU).
    dtype : str or numpy dtype
        The dtype of inputs given as shapes.
    options, **option_kwargs
        As for :func:`mirror` (default: the block's mirror options, if mirrored).

    Returns
    -------
    MirrorPlan
        With ``baseline_mb`` (the unmirrored executor) and ``planned_mb``.
    """
    arrays = [_sample(x, dtype) for x in inputs]
    state = mirror_state(block)
    if state is None or options is not None or option_kwargs:
        base = options if options is not None else (state.options if state is not None else None)
        state = MirrorState(block, MirrorOptions.coerce(base, **option_kwargs), 1, 1)
    return state.plan(block, arrays)


def _sample(value: Any, dtype: Any) -> Any:
    """An input of :func:`plan_block`: an array, None, zeros for a shape, or a nested list of them."""
    if value is None or isinstance(value, mx.nd.NDArray):
        return value
    if all(isinstance(x, (int, np.integer)) for x in value):
        return mx.nd.zeros(tuple(value), dtype=dtype)
    return type(value)(_sample(x, dtype) for x in value)
