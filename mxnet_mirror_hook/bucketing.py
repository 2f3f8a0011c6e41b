"""``MirroredBucketingModule``: a drop-in ``mx.mod.BucketingModule`` with a plan per bucket."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence, Union

import mxnet as mx

from .core.budget import BudgetLike, parse_budget
from .core.planners import get_planner
from .module import MirroredModule
from .plan import MirrorPlan

__all__ = ["MirroredBucketingModule"]


class MirroredBucketingModule(mx.mod.BucketingModule):
    """``BucketingModule`` whose buckets are :class:`MirroredModule` objects.

    Each bucket key gets its own plan (through the shared plan cache), and
    buckets share memory with the default bucket as in ``BucketingModule``.

    Parameters
    ----------
    sym_gen, default_bucket_key, logger, context, work_load_list,
    fixed_param_names, state_names, group2ctxs, compression_params
        As for ``mx.mod.BucketingModule``.
    planner, memory_budget, cache_dir, cost_ctx, keep_ops
        As for :class:`MirroredModule`.
    backend, segments
        As for :class:`MirroredModule`, but ``backend='auto'`` is refused: buckets share
        parameters and memory with the default bucket, which needs every bucket bound by
        the same backend (``'mirror'`` or ``'segments'``).

    Attributes
    ----------
    mirror_plans : dict
        Bucket key -> :class:`MirrorPlan` (``None`` for buckets bound without gradients).
    """

    def __init__(self, sym_gen: Callable, default_bucket_key: Any = None, logger: Any = logging,
                 context: Any = mx.cpu(), work_load_list: Optional[list] = None,
                 fixed_param_names: Optional[list] = None, state_names: Optional[list] = None,
                 group2ctxs: Any = None, compression_params: Any = None, *,
                 planner: str = "auto", memory_budget: BudgetLike = None,
                 cache_dir: Union[None, str, bool] = None, cost_ctx: Optional["mx.Context"] = None,
                 keep_ops: Optional[Sequence[str]] = None, backend: str = "mirror",
                 segments: Optional[int] = None) -> None:
        if backend not in ("mirror", "segments"):
            raise ValueError(f"MirroredBucketingModule takes backend 'mirror' or 'segments', got "
                             f"{backend!r} (every bucket must bind the same way)")
        get_planner(planner)
        parse_budget(memory_budget)
        super().__init__(sym_gen, default_bucket_key, logger=logger, context=context,
                         work_load_list=work_load_list, fixed_param_names=fixed_param_names,
                         state_names=state_names, group2ctxs=group2ctxs,
                         compression_params=compression_params)
        self._mirror_options = dict(planner=planner, memory_budget=memory_budget,
                                    cache_dir=cache_dir, cost_ctx=cost_ctx, keep_ops=keep_ops,
                                    backend=backend, segments=segments)

    @property
    def mirror_plans(self) -> Dict[Any, Optional[MirrorPlan]]:
        """The plan of every bound bucket, by bucket key."""
        return {key: module.mirror_plan for key, module in self._buckets.items()}

    def _new_bucket_module(self, bucket_key: Any) -> MirroredModule:
        symbol, data_names, label_names = self._call_sym_gen(bucket_key)
        return MirroredModule(symbol, data_names, label_names, logger=self.logger,
                              context=self._context, work_load_list=self._work_load_list,
                              fixed_param_names=self._fixed_param_names,
                              state_names=self._state_names, group2ctxs=self._group2ctxs,
                              compression_params=self._compression_params,
                              **self._mirror_options)

    def bind(self, data_shapes: Any, label_shapes: Any = None, for_training: bool = True,
             inputs_need_grad: bool = False, force_rebind: bool = False,
             shared_module: Any = None, grad_req: Any = "write") -> None:
        """Bind the default bucket (see ``BucketingModule.bind``)."""
        saved = self.get_params() if self.params_initialized and self.binded else None
        if force_rebind:
            self._reset_bind()
        if self.binded:
            self.logger.warning("Already bound, ignoring bind()")
            return
        if shared_module is not None:
            raise ValueError("shared_module is not supported by BucketingModule; buckets share "
                             "memory with the default bucket by themselves")
        self.for_training = for_training
        self.inputs_need_grad = inputs_need_grad
        self._grad_req = grad_req
        key = self._default_bucket_key
        module = self._buckets.get(key) or self._new_bucket_module(key)
        module.bind(data_shapes, label_shapes, for_training, inputs_need_grad,
                    force_rebind=False, shared_module=None, grad_req=grad_req)
        self._buckets[key] = module
        self._curr_module, self._curr_bucket_key = module, key
        self.binded = True
        if saved is not None:
            self.set_params(*saved)

    def switch_bucket(self, bucket_key: Any, data_shapes: Any, label_shapes: Any = None) -> None:
        """Switch to ``bucket_key``, binding (and planning) it on first use."""
        assert self.binded, "call bind before switching bucket"
        module = self._buckets.get(bucket_key)
        if module is None:
            module = self._new_bucket_module(bucket_key)
            self._buckets[bucket_key] = module
        if not module.binded:
            module.bind(data_shapes, label_shapes, self._curr_module.for_training,
                        self._curr_module.inputs_need_grad, force_rebind=False,
                        shared_module=self._buckets[self._default_bucket_key],
                        grad_req=self._grad_req)
            if self._monitor is not None:
                module.install_monitor(self._monitor)
        self._curr_module, self._curr_bucket_key = module, bucket_key
