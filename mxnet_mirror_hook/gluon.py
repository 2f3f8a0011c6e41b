"""Gluon support: ``MirroredTrainer`` trains a HybridBlock through a mirrored executor.

Hybridized Gluon (CachedOp) and autograd never mirror: MXNet passes no mirror
function to their gradient pass.  ``MirroredTrainer`` therefore traces the
block and its loss to a symbol, plans it like any symbol, and binds an
executor whose arguments, gradients and auxiliary states *are* the block's own
Parameter arrays.  Forward and backward run in the executor, and the update is
a real ``gluon.Trainer.step``, so the optimizer, its state and the kvstore are
Gluon's, and the block stays usable with plain Gluon afterwards.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mxnet as mx
from mxnet import gluon

from .core.budget import BudgetLike, parse_budget
from .core.planners import get_planner
from .errors import ShapeError
from .plan import MirrorPlan, plan_mirror

__all__ = ["MirroredTrainer"]

logger = logging.getLogger(__name__)

DATA_NAME = "mirror_hook_data"
LABEL_NAME = "mirror_hook_label"


class MirroredTrainer:
    """Train a Gluon ``HybridBlock`` with mirrored (recomputed) activations.

    ``step(data, label)`` does what this does with a ``gluon.Trainer`` of the
    same optimizer, in less memory::

        with autograd.record():
            l = loss(net(data), label)
        l.backward()
        trainer.step(data.shape[0])

    Parameters
    ----------
    net : gluon.HybridBlock
        The network (initialized; hybridized or not).
    loss : gluon.loss.Loss
        A per-sample loss, such as ``gluon.loss.SoftmaxCrossEntropyLoss()``.
    optimizer : str or mx.optimizer.Optimizer
        As for ``gluon.Trainer``.
    optimizer_params : dict, optional
        As for ``gluon.Trainer``.
    memory_budget : None, 'min', float, int or str
        See :func:`mxnet_mirror_hook.parse_budget`.
    context : Context or list of Context, optional
        Devices to train on (default: the contexts the Parameters live on).
        A batch is split along its first axis across them.
    kvstore : str
        As for ``gluon.Trainer``.
    planner, cache_dir, cost_ctx, keep_ops
        As for :class:`~mxnet_mirror_hook.MirroredModule`.

    Attributes
    ----------
    trainer : gluon.Trainer
        The Trainer doing the updates.
    mirror_plan : MirrorPlan or None
        The plan of the last batch shape.
    """

    def __init__(self, net: gluon.HybridBlock, loss: gluon.Block, optimizer: Any,
                 optimizer_params: Optional[Dict[str, Any]] = None, *,
                 memory_budget: BudgetLike = None, context: Any = None, kvstore: str = "device",
                 planner: str = "auto", cache_dir: Union[None, str, bool] = None,
                 cost_ctx: Optional["mx.Context"] = None,
                 keep_ops: Optional[Sequence[str]] = None, max_bound_shapes: int = 2) -> None:
        if not isinstance(net, gluon.HybridBlock):
            raise TypeError(f"net must be a gluon.HybridBlock (it is traced to a symbol), got "
                            f"{type(net).__name__}; hybrid_forward-based blocks all qualify")
        if not isinstance(loss, gluon.HybridBlock):
            raise TypeError(f"loss must be a gluon loss (HybridBlock), got {type(loss).__name__}")
        get_planner(planner)
        parse_budget(memory_budget)
        self.net, self.loss = net, loss
        self._params = net.collect_params()
        if context is None:
            context = self._params_contexts()
        self._contexts: List[mx.Context] = list(context) if isinstance(context, (list, tuple)) \
            else [context]
        self.trainer = gluon.Trainer(self._params, optimizer, optimizer_params, kvstore=kvstore)
        self._planner, self._budget, self._cache_dir = planner, memory_budget, cache_dir
        self._cost_ctx, self._keep_ops = cost_ctx, list(keep_ops or ())
        self._max_bound_shapes = max(1, max_bound_shapes)
        self._symbol: Optional[mx.sym.Symbol] = None
        self._bound: "OrderedDict[tuple, Tuple[MirrorPlan, List[mx.executor.Executor]]]" = OrderedDict()
        self.mirror_plan: Optional[MirrorPlan] = None

    # ------------------------------------------------------------------ setup
    def _params_contexts(self) -> List["mx.Context"]:
        for param in self._params.values():
            try:
                return list(param.list_ctx())
            except RuntimeError:
                continue
        return [mx.cpu()]

    def _training_symbol(self) -> "mx.sym.Symbol":
        if self._symbol is None:
            data, label = mx.sym.var(DATA_NAME), mx.sym.var(LABEL_NAME)
            out = self.net(data)
            if isinstance(out, (list, tuple)):
                out = out[0]
            per_sample = self.loss(out, label)
            # MakeLoss back-propagates ones, as autograd does for l.backward().
            self._symbol = mx.sym.MakeLoss(per_sample, name="mirror_hook_loss")
            names = set(self._symbol.list_arguments()) | set(self._symbol.list_auxiliary_states())
            missing = names - set(self._params.keys()) - {DATA_NAME, LABEL_NAME}
            if missing:
                raise ValueError(f"the traced symbol uses inputs that are not Parameters of net: "
                                 f"{sorted(missing)[:5]}; MirroredTrainer supports one data and "
                                 f"one label input")
        return self._symbol

    def _finish_deferred_init(self, data: "mx.nd.NDArray") -> None:
        if any(getattr(p, "_deferred_init", ()) for p in self._params.values()):
            with mx.autograd.pause():  # shapes only: no recording, no statistics update
                self.net(data[:1].as_in_context(self._contexts[0]))

    def _bind(self, slices: List[Tuple[Tuple[int, ...], Tuple[int, ...]]], dtype: Any,
              ) -> Tuple[MirrorPlan, List["mx.executor.Executor"]]:
        symbol = self._training_symbol()
        largest = max(slices, key=lambda s: s[0][0])
        plan = plan_mirror(symbol, [(DATA_NAME, largest[0], dtype)], [(LABEL_NAME, largest[1])],
                           planner=self._planner, memory_budget=self._budget,
                           ctx=self._cost_ctx, cache_dir=self._cache_dir,
                           grad_req={p.name: p.grad_req for p in self._params.values()},
                           keep_ops=self._keep_ops)
        arguments = plan.symbol.list_arguments()
        auxiliary = plan.symbol.list_auxiliary_states()
        executors = []
        for ctx, (data_shape, label_shape) in zip(self._contexts, slices):
            args, grads, requests = {}, {}, {}
            for name in arguments:
                if name == DATA_NAME:
                    args[name] = mx.nd.zeros(data_shape, ctx, dtype=dtype)
                    requests[name] = "null"
                elif name == LABEL_NAME:
                    args[name] = mx.nd.zeros(label_shape, ctx)
                    requests[name] = "null"
                else:
                    param = self._params[name]
                    args[name] = param.data(ctx)
                    requests[name] = param.grad_req
                    if param.grad_req != "null":
                        grads[name] = param.grad(ctx)
            aux = {name: self._params[name].data(ctx) for name in auxiliary}
            executors.append(plan.symbol.bind(ctx, args, args_grad=grads, grad_req=requests,
                                              aux_states=aux))
        return plan, executors

    # ------------------------------------------------------------------ train
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
        if data.shape[0] != label.shape[0]:
            raise ShapeError(f"data has batch size {data.shape[0]} but label has {label.shape[0]}")
        if data.shape[0] < len(self._contexts):
            raise ShapeError(f"a batch of {data.shape[0]} cannot be split over "
                             f"{len(self._contexts)} devices")
        self._finish_deferred_init(data)
        data_parts = gluon.utils.split_data(data, len(self._contexts), even_split=False)
        label_parts = gluon.utils.split_data(label, len(self._contexts), even_split=False)
        slices = [(tuple(d.shape), tuple(l.shape)) for d, l in zip(data_parts, label_parts)]
        key = (tuple(slices), str(data.dtype))
        if key not in self._bound:
            self._bound[key] = self._bind(slices, data.dtype)
            while len(self._bound) > self._max_bound_shapes:  # executors hold device memory
                self._bound.popitem(last=False)
        self._bound.move_to_end(key)
        plan, executors = self._bound[key]
        self.mirror_plan = plan
        for executor, part, target in zip(executors, data_parts, label_parts):
            part.copyto(executor.arg_dict[DATA_NAME])
            target.copyto(executor.arg_dict[LABEL_NAME])
            executor.forward(is_train=True)
            executor.backward()
        # gluon.Trainer refuses gradients autograd did not write (its stale-gradient
        # check); these were written by the executor's backward, into the very
        # arrays the Trainer reads, so they are fresh.  ignore_stale_grad=True
        # would instead silently skip updates.
        for param in self._params.values():
            if param.grad_req != "null":
                for array in param.list_data():
                    array._fresh_grad = True
        self.trainer.step(data.shape[0])
        losses = [executor.outputs[0] for executor in executors]
        total = sum(float(l.sum().asscalar()) for l in losses)
        return total / data.shape[0]

    @property
    def learning_rate(self) -> float:
        """The Trainer's learning rate."""
        return self.trainer.learning_rate

    def set_learning_rate(self, lr: float) -> None:
        """Set the Trainer's learning rate."""
        self.trainer.set_learning_rate(lr)
