"""``MirroredBucketingModule``: a drop-in ``mx.mod.BucketingModule`` with a plan per bucket."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

import mxnet as mx
from mxnet.io import DataDesc

from .core.budget import Budget
from .errors import MirrorHookError, OptionError
from .module import MirroredModule
from .options import MirrorOptions, takes_options
from .plan import MirrorPlan

__all__ = ["MirroredBucketingModule", "bucket_shapes"]

logger = logging.getLogger(__name__)

#: Buckets planned at once by :meth:`MirroredBucketingModule.prepare_buckets`.
PREPARE_THREADS = 2


def bucket_shapes(descs: Optional[Sequence[Any]], default_key: Any, key: Any) -> Optional[List[DataDesc]]:
    """The input descriptors of bucket ``key``, from the default bucket's.

    A bucket key that is a sequence length sets the time axis (``'T'`` in the
    descriptor's layout, as ``mx.rnn.BucketSentenceIter`` declares it), or else
    the one axis whose size is the default key.  Returns ``None`` when that
    cannot be told (the bucket is then planned when first used).
    """
    if not descs:
        return []
    if not isinstance(key, int) or not isinstance(default_key, int):
        return None
    result = []
    for desc in descs:
        if not isinstance(desc, DataDesc):
            desc = DataDesc(*desc)
        shape = list(desc.shape)
        layout = desc.layout or ""
        if "T" in layout and layout.find("T") < len(shape):
            shape[layout.find("T")] = key
        else:
            axes = [axis for axis, size in enumerate(shape) if size == default_key]
            if len(axes) > 1:
                return None
            for axis in axes:
                shape[axis] = key
        result.append(DataDesc(desc.name, tuple(shape), desc.dtype, desc.layout))
    return result


# NOTE [ every bucket under the module's options ]
# Every bucket is planned with the module's options, every field of them, with 'auto'
# replaced by the backend the default bucket chose (NOTE [ one backend for all buckets ]).
# That replacement loses one thing: under 'auto', ``max_overhead`` is a limit the default
# bucket's one-level plan was held to (it is kept only when its estimated overhead is
# within it), but ``backend='mirror'`` plans under ``memory_budget`` alone, so the other
# buckets' one-level plans were not held to it (and came from the cache of plans made
# without it).  So, without a budget of the user's, such a bucket plans the least one-level
# memory within the limit (``Budget.within_overhead``, as 'auto' plans it for the default
# bucket).  A bucket whose default bucket kept the one-level plan within the limit is
# also held to the same limit here; when its own one-level plan's estimate is above
# it, the bucket recomputes nothing (plain MXNet's plan for it: never above the limit, and
# it binds beside the default bucket's executors as any bucket does) and one warning says
# so.  A segment chain cannot be the fallback: a bucket shares the default bucket's
# executors and memory, and a one-level default bucket's are plain executors.  Where the
# default bucket was not held to the limit (its segment path failed, or it draws random
# numbers that segments would redraw, each already said in a warning), neither are the
# others.  Under 'segments' the limit is applied by the planner itself.
class _BucketModule(MirroredModule):
    """A bucket other than the default one: a :class:`MirroredModule` whose plans are held to
    :attr:`overhead_limit` (NOTE [ every bucket under the module's options ])."""

    #: The estimated overhead this bucket's plans are held to (None: not held); set by the owner.
    overhead_limit: Optional[float] = None
    #: The bucket's key, for the warning.
    bucket_key: Any = None
    #: Buckets already warned of (shared by the owner's bucket modules: a bucket planned up front
    #: gets a new module when first bound).
    warned: Optional[Set[Any]] = None

    def _plan_for(self, data_shapes: Sequence[DataDesc],
                  label_shapes: Optional[Sequence[DataDesc]], grad_req: Any) -> MirrorPlan:
        plan = super()._plan_for(data_shapes, label_shapes, grad_req)
        if self.overhead_limit is None or plan.overhead <= self.overhead_limit:
            return plan
        warned = self.warned if self.warned is not None else set()
        if self.bucket_key not in warned:
            warned.add(self.bucket_key)
            logger.warning("bucket %r: its one-level plan's estimated overhead (%.1f%%) is above "
                           "max_overhead=%g, which the default bucket's one-level plan is within; "
                           "this bucket recomputes nothing (%.0f MB of activations)", self.bucket_key,
                           100 * plan.overhead, self.overhead_limit, plan.baseline_mb)
        options = self.mirror_options
        self.mirror_options = options.replace(planner="none", memory_budget=None, device_memory=None)
        try:
            return super()._plan_for(data_shapes, label_shapes, grad_req)
        finally:
            self.mirror_options = options


@takes_options
class MirroredBucketingModule(mx.mod.BucketingModule):
    """``BucketingModule`` whose buckets are :class:`MirroredModule` objects.

    Each bucket key gets its own plan (through the shared plan cache), and
    buckets share memory with the default bucket as in ``BucketingModule``.

    Parameters
    ----------
    sym_gen, default_bucket_key, logger, context, work_load_list,
    fixed_param_names, state_names, group2ctxs, compression_params
        As for ``mx.mod.BucketingModule``.
    options : MirrorOptions, optional
        The mirroring options in one object; the keyword arguments below
        override its fields.  With ``backend='auto'`` (the default) the
        decision is made once, on the default bucket, and every bucket binds
        with the backend it chose (NOTE [ one backend for all buckets ]).
    <mirror options>

    Attributes
    ----------
    mirror_plans : dict
        Bucket key -> :class:`MirrorPlan` (``None`` for buckets bound without gradients).
    """

    binded: bool  # BaseModule's flag (MXNet has no annotations): set in its __init__ and in bind

    def __init__(self, sym_gen: Callable, default_bucket_key: Any = None, logger: Any = logging,
                 context: Any = mx.cpu(), work_load_list: Optional[list] = None,
                 fixed_param_names: Optional[list] = None, state_names: Optional[list] = None,
                 group2ctxs: Any = None, compression_params: Any = None, *,
                 options: Optional[MirrorOptions] = None, **overrides: Any) -> None:
        mirror_options = MirrorOptions.coerce(options, **overrides)
        super().__init__(sym_gen, default_bucket_key, logger=logger, context=context,
                         work_load_list=work_load_list, fixed_param_names=fixed_param_names,
                         state_names=state_names, group2ctxs=group2ctxs,
                         compression_params=compression_params)
        self.mirror_options = mirror_options
        self._announced: List[Any] = []
        self._warned_buckets: Set[Any] = set()

    @property
    def mirror_plans(self) -> Dict[Any, Optional[MirrorPlan]]:
        """The plan of every bound bucket, by bucket key."""
        return {key: module.mirror_plan for key, module in self._buckets.items()}

    # NOTE [ one backend for all buckets ]
    # Buckets share parameters and memory with the default bucket, so every bucket must
    # bind the same way (one mirrored executor, or a chain of segments).  Under 'auto'
    # the default bucket decides (it is bound first, and it is the largest bucket in
    # BucketSentenceIter's use); every other bucket is planned with the backend the
    # default bucket's plan has ('mirror' when it kept the one-level plan or fell back,
    # 'segments' when it took segments: each bucket then chooses its own split).  Deciding
    # per bucket would let buckets of one module bind differently.
    def bucket_options(self, bucket_key: Any) -> MirrorOptions:
        """The options bucket ``bucket_key`` is planned with: the module's, with ``'auto'`` replaced
        by the default bucket's backend once that bucket has a plan (NOTE [ one backend for all
        buckets ])."""
        options = self.mirror_options
        if options.backend != "auto" or bucket_key == self._default_bucket_key:
            return options
        default = self._buckets.get(self._default_bucket_key)
        plan = default.mirror_plan if default is not None else None
        if plan is None:  # not bound for training: nothing was decided, one-level like MXNet
            return options.replace(backend="mirror")
        if plan.backend == "mirror" and options.max_overhead is not None and not options.budget.is_limit:
            # The least one-level memory within the limit, as the default bucket's 'auto' planned
            # it (NOTE [ every bucket under the module's options ]).
            return options.replace(backend="mirror",
                                   memory_budget=Budget.within_overhead(options.max_overhead))
        return options.replace(backend=plan.backend)

    def overhead_limit(self, bucket_key: Any) -> Optional[float]:
        """The estimated overhead bucket ``bucket_key``'s plans are held to: ``max_overhead`` under
        ``'auto'`` when the default bucket kept its one-level plan within it, else None (NOTE
        [ every bucket under the module's options ])."""
        options = self.mirror_options
        if bucket_key == self._default_bucket_key or options.max_overhead is None \
                or options.backend != "auto":
            return None
        default = self._buckets.get(self._default_bucket_key)
        plan = default.mirror_plan if default is not None else None
        if plan is None or plan.backend != "mirror" or plan.fallback is not None \
                or plan.overhead > options.max_overhead:
            return None
        return options.max_overhead

    def _new_bucket_module(self, bucket_key: Any) -> MirroredModule:
        symbol, data_names, label_names = self._call_sym_gen(bucket_key)
        kind = MirroredModule if bucket_key == self._default_bucket_key else _BucketModule
        module = kind(symbol, data_names, label_names, logger=self.logger,
                      context=self._context, work_load_list=self._work_load_list,
                      fixed_param_names=self._fixed_param_names,
                      state_names=self._state_names, group2ctxs=self._group2ctxs,
                      compression_params=self._compression_params,
                      options=self.bucket_options(bucket_key))
        if isinstance(module, _BucketModule):
            module.overhead_limit, module.bucket_key = self.overhead_limit(bucket_key), bucket_key
            module.warned = self._warned_buckets
        return module

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
            raise OptionError("shared_module is not supported by BucketingModule; buckets share "
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
        if self._announced and module.mirror_plan is not None:
            others = [k for k in self._announced if k != key and k not in self._buckets]
            self.prepare_buckets(others, data_shapes, label_shapes)

    def fit(self, train_data: Any, *args: Any, **kwargs: Any) -> None:
        """``BucketingModule.fit``, with the buckets ``train_data`` announces planned up front.

        An iterator with a ``buckets`` list (``mx.rnn.BucketSentenceIter``
        has one) gets every bucket planned when the default bucket is bound,
        before the first batch (see :meth:`prepare_buckets`), so the first
        epoch does not stall on planning.  Other arguments as for
        ``BucketingModule.fit``.
        """
        self._announced = list(getattr(train_data, "buckets", None) or [])
        try:
            super().fit(train_data, *args, **kwargs)
        finally:
            self._announced = []

    def prepare_buckets(self, bucket_keys: Iterable[Any], data_shapes: Any,
                        label_shapes: Any = None) -> Dict[Any, MirrorPlan]:
        """Plan ``bucket_keys`` now, through the plan cache, so that switching to them later
        binds without planning.

        Parameters
        ----------
        bucket_keys : iterable
            Bucket keys (sequence lengths, as ``BucketSentenceIter`` uses).
        data_shapes, label_shapes : list of DataDesc or (name, shape)
            The default bucket's inputs; each bucket's are derived with
            :func:`bucket_shapes`.

        Returns
        -------
        dict
            Bucket key -> plan, for the buckets that could be planned (a bucket
            whose shapes cannot be derived, or whose planning fails, is planned
            when it is first used instead, where its error is raised).
        """
        assert self.binded, "call bind before prepare_buckets"
        default = self._buckets[self._default_bucket_key]
        jobs = []
        for key in bucket_keys:
            data = bucket_shapes(data_shapes, self._default_bucket_key, key)
            labels = bucket_shapes(label_shapes, self._default_bucket_key, key)
            if data is None or labels is None:
                logger.debug("bucket %r: its shapes cannot be derived; planned when first used", key)
                continue
            jobs.append((key, data, labels or None))
        if not jobs:
            return {}
        started = time.perf_counter()
        # The user's sym_gen runs here, one bucket after the other: it is not thread-safe
        # (mx.rnn cells count their unrolled steps in shared state); only planning is parallel.
        modules = {key: self._new_bucket_module(key) for key, _, _ in jobs}

        def plan(job):
            key, data, labels = job
            module = modules[key]
            module.inputs_need_grad = default.inputs_need_grad
            try:
                return key, module._plan_for(data, labels, default._grad_req)
            except MirrorHookError as error:
                logger.debug("bucket %r: not planned up front (%s)", key, error)
                return key, None

        with ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="mirror-bucket") as pool:
            plans = {key: plan for key, plan in pool.map(plan, jobs) if plan is not None}
        logger.info("planned %d buckets up front in %.1f s: %s", len(plans),
                    time.perf_counter() - started, ", ".join(map(str, plans)))
        return plans

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
