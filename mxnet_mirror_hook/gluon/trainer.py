"""``MirroredTrainer``: a small training loop on top of ``mirror()``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import mxnet as mx
from mxnet import autograd, gluon

from ..errors import GluonMirrorError, ShapeError, UnsupportedBlockError
from ..options import MirrorOptions, takes_options
from ..plan import MirrorPlan
from .api import mirror, mirror_state

__all__ = ["MirroredTrainer"]


def _first(output: Any) -> Any:
    """The main output of a block returning several (auxiliary heads)."""
    while isinstance(output, (list, tuple)):
        output = output[0]
    return output


def _horovod_optimizer(optimizer: Any) -> bool:
    kind = type(optimizer)
    return kind.__name__ == "DistributedOptimizer" and kind.__module__.startswith("horovod")


@takes_options
class MirroredTrainer:
    """Train a Gluon ``HybridBlock`` with mirrored (recomputed) activations.

    A small training loop on top of :func:`mirror`: ``step(data, label)`` does
    exactly this, in less memory::

        with autograd.record():
            losses = [loss(net(x), y) for x, y in zip(split_and_load(data), split_and_load(label))]
        autograd.backward(losses)
        trainer.step(data.shape[0])

    Parameters
    ----------
    net : gluon.HybridBlock
        The network (initialized or not; hybridized or not).  It is mirrored
        in place (:func:`unmirror` switches that off).
    loss : gluon.loss.Loss
        A per-sample loss, such as ``gluon.loss.SoftmaxCrossEntropyLoss()``.
    optimizer : str, mx.optimizer.Optimizer or gluon.Trainer
        As for ``gluon.Trainer``; or a ready Trainer (Horovod's
        ``DistributedTrainer`` included), used as it is.
    optimizer_params : dict, optional
        As for ``gluon.Trainer`` (not with a ready Trainer).
    context : Context or list of Context, optional
        Devices to train on (default: the contexts the Parameters live on).
        A batch is split along its first axis across them.
    kvstore : str
        As for ``gluon.Trainer``.
    max_bound_shapes : int
        Batch shapes whose executors stay bound.
    options : MirrorOptions, optional
        Planning options; the keyword arguments below override its fields.
    <mirror options>

    Attributes
    ----------
    trainer : gluon.Trainer
        The Trainer doing the updates.
    """

    def __init__(self, net: gluon.HybridBlock, loss: gluon.Block, optimizer: Any,
                 optimizer_params: Optional[Dict[str, Any]] = None, *, context: Any = None,
                 kvstore: str = "device", max_bound_shapes: int = 2,
                 options: Optional[MirrorOptions] = None, **overrides: Any) -> None:
        if not isinstance(net, gluon.HybridBlock):
            raise UnsupportedBlockError(f"net must be a gluon.HybridBlock (it is traced to a symbol), "
                                        f"got {type(net).__name__}; hybrid_forward-based blocks all "
                                        f"qualify")
        if not isinstance(loss, gluon.Block):
            raise UnsupportedBlockError(f"loss must be a gluon loss (a Block), got {type(loss).__name__}")
        if _horovod_optimizer(optimizer):
            raise GluonMirrorError("hvd.DistributedOptimizer does not work with gluon.Trainer (the "
                                   "Trainer never forwards rescale_grad to the wrapped optimizer): "
                                   "pass hvd.DistributedTrainer(net.collect_params(), optimizer, "
                                   "optimizer_params) as the optimizer instead")
        self.net, self.loss = net, loss
        self._params = net.collect_params()
        if isinstance(optimizer, gluon.Trainer):
            if optimizer_params:
                raise GluonMirrorError("optimizer_params cannot be given with a ready Trainer; set "
                                       "them when making the Trainer")
            self.trainer = optimizer
        elif hasattr(optimizer, "step") and hasattr(optimizer, "allreduce_grads"):
            self.trainer = optimizer  # a Trainer-like object (e.g. a Horovod trainer of another build)
        else:
            self.trainer = gluon.Trainer(self._params, optimizer, optimizer_params, kvstore=kvstore)
        self._context = context
        mirror(net, options=MirrorOptions.coerce(options, **overrides), max_shapes=max_bound_shapes)
        # The plans' footprints (and device_memory) count this Trainer's optimizer state.
        state = mirror_state(net)
        assert state is not None  # mirror() has just set it
        state.optimizer = (getattr(self.trainer, "_optimizer", None), None)

    @property
    def mirror_plan(self) -> Optional[MirrorPlan]:
        """The plan of the last batch shape (None before the first step)."""
        state = mirror_state(self.net)
        return state.last_plan if state is not None else None

    def _contexts(self) -> List["mx.Context"]:
        if self._context is not None:
            return list(self._context) if isinstance(self._context, (list, tuple)) else [self._context]
        for param in self._params.values():
            try:
                return list(param.list_ctx())
            except RuntimeError:
                continue
        return [mx.cpu()]

    def step(self, data: "mx.nd.NDArray", label: "mx.nd.NDArray") -> float:
        """Forward, backward and update on one batch; returns the mean loss.

        Parameters
        ----------
        data : NDArray
            A batch, batch axis first.
        label : NDArray
            Its labels, batch axis first.

        Raises
        ------
        ShapeError
            If data and label disagree on the batch size, or the batch is
            smaller than the number of devices.
        """
        contexts = self._contexts()
        if data.shape[0] != label.shape[0]:
            raise ShapeError(f"data has batch size {data.shape[0]} but label has {label.shape[0]}")
        if data.shape[0] < len(contexts):
            raise ShapeError(f"a batch of {data.shape[0]} cannot be split over "
                             f"{len(contexts)} devices")
        parts = gluon.utils.split_and_load(data, contexts, even_split=False)
        targets = gluon.utils.split_and_load(label, contexts, even_split=False)
        with autograd.record():
            losses = [self.loss(_first(self.net(x)), y) for x, y in zip(parts, targets)]
        autograd.backward(losses)
        self.trainer.step(data.shape[0])
        total = sum(float(loss.sum().asscalar()) for loss in losses)
        return total / data.shape[0]

    @property
    def learning_rate(self) -> float:
        """The Trainer's learning rate."""
        return self.trainer.learning_rate

    def set_learning_rate(self, lr: float) -> None:
        """Set the Trainer's learning rate."""
        self.trainer.set_learning_rate(lr)
