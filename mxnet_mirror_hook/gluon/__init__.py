"""Gluon support: ``net = mirror(net)`` mirrors a HybridBlock inside the user's own autograd loop.

Hybridized Gluon (CachedOp) and autograd never mirror: MXNet passes no mirror
function to their gradient pass.  :func:`mirror` therefore makes a block run,
while autograd records for training, a *mirrored executor*: the block is
traced to a symbol, planned like any symbol (through the plan cache, per input
shapes, dtypes and context), and bound with the block's own Parameter arrays as
its arguments, gradients and auxiliary states.  Autograd computes the head
gradient of the block's outputs (whatever the loss), and the executor's
backward turns it into the Parameters' gradients, so the user's loop,
``gluon.Trainer`` (or Horovod's ``DistributedTrainer``) and metrics stay as
they are::

    net = mirror(net)
    with autograd.record():
        outputs = [net(X) for X in gluon.utils.split_and_load(data, ctx)]
        losses = [loss_fn(yhat, y) for yhat, y in zip(outputs, labels)]
    autograd.backward(losses)
    trainer.step(batch_size)

Outside ``autograd.record()`` or under ``autograd.predict_mode()`` the block
runs as before (CachedOp when hybridized), with no planning and no overhead.
With ``backend='segments'`` (or ``'auto'`` choosing them) the executor is a
chain of executor segments instead (NOTE [ executor segments behind a mirrored
block ] in ``binding.py``).  ``MirroredTrainer`` is a small training loop built
on the same path.

A mirrored block takes the calls plain Gluon takes: NDArrays, ``None`` for an
optional input and nested lists or tuples of them, returning outputs in the
structure the block returns (NOTE [ nested inputs and outputs of a mirrored
block ]); lazily initialized Parameters get plain Gluon's initial values at the
same seed (NOTE [ deferred initialization in plain Gluon's order ]).

The modules: ``api`` (mirror, unmirror, plan_block), ``state`` (``MirrorState``:
plans and bound executors per block), ``hooks`` (the autograd wrap and the one
``HookRegistry`` holding every pending forward), ``records`` (a bound executor
and a recorded forward), ``binding`` (binding a plan to the Parameters' arrays),
``signature`` (nested calls and their traces), ``deferred`` (deferred
initialization), ``trainer`` (``MirroredTrainer``).
"""
from __future__ import annotations

# _MirroredForward and _restore_state: blocks pickled before the package split name them here.
from .api import _MirroredForward  # noqa: F401
from .api import is_mirrored, mirror, mirror_state, plan_block, unmirror
from .state import MirrorState
from .state import restore_state as _restore_state  # noqa: F401
from .trainer import MirroredTrainer

__all__ = ["mirror", "unmirror", "is_mirrored", "mirror_state", "plan_block", "MirrorState",
           "MirroredTrainer"]
