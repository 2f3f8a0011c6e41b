"""``MirroredModule``: a drop-in ``mx.mod.Module`` that binds a mirrored symbol."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mxnet as mx
from mxnet.module.executor_group import _split_input_slice
from mxnet.io import DataDesc

from .options import MirrorOptions, takes_options
from .mx.segments import executor_group_for
from .plan import MirrorPlan, plan_mirror

__all__ = ["MirroredModule"]

logger = logging.getLogger(__name__)


def per_device_descs(descs: Optional[Sequence[DataDesc]], contexts: Sequence["mx.Context"],
                     work_load_list: Sequence[float]) -> List[DataDesc]:
    """The descriptors one device sees: the batch axis cut to the largest slice."""
    if not descs:
        return []
    result = []
    for desc in descs:
        axis = DataDesc.get_batch_axis(desc.layout)
        shape = tuple(desc.shape)
        if axis >= 0 and len(contexts) > 1 and axis < len(shape):
            slices = _split_input_slice(shape[axis], work_load_list)
            largest = max(s.stop - s.start for s in slices)
            shape = shape[:axis] + (largest,) + shape[axis + 1:]
        result.append(DataDesc(desc.name, shape, desc.dtype, desc.layout))
    return result


def _grad_req_mapping(symbol: "mx.sym.Symbol", grad_req: Any) -> Union[str, Dict[str, str]]:
    """``Module.bind``'s grad_req (str, list in argument order, or dict) for ``plan_mirror``."""
    if isinstance(grad_req, (list, tuple)):
        return dict(zip(symbol.list_arguments(), grad_req))
    return grad_req


def _params_dict(params: Any) -> Optional[Dict[str, Any]]:
    """``Module``'s optimizer_params (a dict or a tuple of pairs) as a dict."""
    return None if params is None else dict(params)


def _segments_of(plan: Optional[MirrorPlan]) -> Any:
    """The segment plan to bind with, or None for MXNet's one-level mirror."""
    return plan.segment_plan if plan is not None and plan.backend == "segments" else None


def _same_segments(new: MirrorPlan, old: MirrorPlan) -> bool:
    """Whether two plans bind the same way (backend and split)."""
    return new.backend == old.backend and new.segment_plan == old.segment_plan


@takes_options
class MirroredModule(mx.mod.Module):
    """An ``mx.mod.Module`` that trains in less memory by recomputing forward nodes.

    ``bind`` for training plans which nodes to recompute (through the plan
    cache), and binds the symbol with ``force_mirroring`` on them; inference
    binds are plain.  Everything else behaves as in ``Module``: results are
    the same, the saved symbol is the user's own, and a plain ``Module`` can
    load the checkpoints.

    Parameters
    ----------
    symbol, data_names, label_names, logger, context, work_load_list,
    fixed_param_names, state_names, group2ctxs, compression_params
        As for ``mx.mod.Module``.
    options : MirrorOptions, optional
        The mirroring options in one object; the keyword arguments below
        override its fields.
    <mirror options>

    Attributes
    ----------
    mirror_plan : MirrorPlan or None
        The plan of the last training bind.
    mirror_options : MirrorOptions
        The options every plan of this module is made with.
    """

    def __init__(self, symbol: "mx.sym.Symbol", data_names: Sequence[str] = ("data",),
                 label_names: Sequence[str] = ("softmax_label",), logger: Any = logging,
                 context: Union["mx.Context", List["mx.Context"]] = mx.cpu(),
                 work_load_list: Optional[List[float]] = None,
                 fixed_param_names: Optional[List[str]] = None,
                 state_names: Optional[List[str]] = None, group2ctxs: Any = None,
                 compression_params: Any = None, *, options: Optional[MirrorOptions] = None,
                 **overrides: Any) -> None:
        # Validated now (a bad planner name or budget fails here, not at the first bind).
        mirror_options = MirrorOptions.coerce(options, **overrides)
        super().__init__(symbol, data_names=data_names, label_names=label_names, logger=logger,
                         context=context, work_load_list=work_load_list,
                         fixed_param_names=fixed_param_names, state_names=state_names,
                         group2ctxs=group2ctxs, compression_params=compression_params)
        self.mirror_options = mirror_options
        self._user_symbol = symbol
        self.mirror_plan: Optional[MirrorPlan] = None
        self._mirror_optimizer: Tuple[Any, Any] = (None, None)  # (optimizer, params) once known

    # ----------------------------------------------------------------- planning
    def _plan_for(self, data_shapes: Sequence[DataDesc],
                  label_shapes: Optional[Sequence[DataDesc]], grad_req: Any) -> MirrorPlan:
        return plan_mirror(
            self._user_symbol,
            per_device_descs(data_shapes, self._context, self._work_load_list),
            per_device_descs(label_shapes, self._context, self._work_load_list) or None,
            options=self.mirror_options,
            grad_req=_grad_req_mapping(self._user_symbol, grad_req),
            fixed_param_names=self._fixed_param_names, inputs_need_grad=self.inputs_need_grad,
            optimizer=self._mirror_optimizer[0], optimizer_params=_params_dict(self._mirror_optimizer[1]),
            device=self._context[0].device_type)

    # -------------------------------------------------------------- optimizer
    # NOTE [ the optimizer of a module's footprint ]
    # ``fit`` binds before it creates the optimizer, so it records the optimizer it was
    # given first and the training bind plans with it (``device_memory`` counts its
    # state).  A module bound by hand plans with the assumed SGD with momentum
    # (NOTE [ the optimizer a footprint assumes ]); ``init_optimizer`` then sets the
    # plan's optimizer, and when ``device_memory`` is set and the footprint with it no
    # longer fits, says so in one warning (rebind, or call ``fit``, to plan with it).
    def fit(self, *args: Any, **kwargs: Any) -> None:
        """As ``Module.fit``; the training bind's plan counts ``optimizer``'s state."""
        bound = inspect.signature(mx.mod.BaseModule.fit).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._mirror_optimizer = (bound.arguments["optimizer"], bound.arguments["optimizer_params"])
        super().fit(*args, **kwargs)

    def init_optimizer(self, kvstore: Any = "local", optimizer: Any = "sgd",
                       optimizer_params: Any = (("learning_rate", 0.01),), force_init: bool = False) -> None:
        """As ``Module.init_optimizer``; :attr:`mirror_plan`'s footprint then counts this optimizer."""
        super().init_optimizer(kvstore=kvstore, optimizer=optimizer, optimizer_params=optimizer_params,
                               force_init=force_init)
        self._mirror_optimizer = (optimizer, optimizer_params)
        plan = self.mirror_plan
        if plan is None or plan.footprint_source is None or not self.optimizer_initialized:
            return
        self.mirror_plan = plan = plan.with_footprint(optimizer=self._optimizer, optimizer_params=None)
        limit = self.mirror_options.device_memory_mb
        try:
            footprint = plan.footprint  # not None: the plan has a footprint source
        except ValueError as error:  # an optimizer the footprint does not know
            logger.warning("the footprint cannot count this optimizer's state: %s", error)
            return
        if limit is not None and footprint is not None and footprint.total > limit:
            logger.warning("with %s the footprint is %.0f MB, above device_memory %.0f MB (the plan was "
                           "made for %s); bind again or call fit() to plan with this optimizer",
                           plan.optimizer_label, footprint.total, limit,
                           "the assumed optimizer" if self._mirror_optimizer[0] is None else "another")

    def _needs_plan(self, for_training: bool, grad_req: Any, inputs_need_grad: bool) -> bool:
        """Whether a bind computes any gradient (else mirroring cannot help)."""
        if not for_training:
            return False
        trainable = [n for n in self._param_names if n not in set(self._fixed_param_names or ())]
        if not trainable and not inputs_need_grad:
            return False
        if isinstance(grad_req, str):
            return grad_req != "null"
        if isinstance(grad_req, dict):
            return any(v != "null" for v in grad_req.values())
        if isinstance(grad_req, (list, tuple)):
            return any(v != "null" for v in grad_req)
        return True

    def bind(self, data_shapes: Any, label_shapes: Any = None, for_training: bool = True,
             inputs_need_grad: bool = False, force_rebind: bool = False,
             shared_module: Optional[mx.mod.Module] = None, grad_req: Any = "write") -> None:
        """Bind as ``Module.bind`` does, with a mirrored symbol when training.

        See ``mx.mod.Module.bind`` for the parameters.
        """
        if self.binded and not force_rebind:
            self.logger.warning("Already bound, ignoring bind()")
            return
        self.inputs_need_grad = inputs_need_grad
        bound_symbol = self._user_symbol
        plan = None
        if self._needs_plan(for_training, grad_req, inputs_need_grad):
            descs_data, descs_label = mx.module.base_module._parse_data_desc(
                self.data_names, self.label_names, data_shapes, label_shapes)
            plan = self._plan_for(descs_data, descs_label, grad_req)
            bound_symbol = plan.symbol
        self._symbol = bound_symbol
        try:
            with executor_group_for(_segments_of(plan)):
                super().bind(data_shapes, label_shapes, for_training=for_training,
                             inputs_need_grad=inputs_need_grad, force_rebind=force_rebind,
                             shared_module=shared_module, grad_req=grad_req)
        finally:
            # Everything but the executors sees the user's symbol (save_checkpoint, .symbol).
            self._symbol = self._user_symbol
        self.mirror_plan = plan

    def reshape(self, data_shapes: Any, label_shapes: Any = None) -> None:
        """Reshape for new input shapes, replanning through the cache.

        When the new shapes call for a different decision the executors are
        rebound with it; parameters, optimizer and kvstore are kept.
        """
        assert self.binded
        if self.mirror_plan is None:
            super().reshape(data_shapes, label_shapes)
            return
        descs_data, descs_label = mx.module.base_module._parse_data_desc(
            self.data_names, self.label_names, data_shapes, label_shapes)
        plan = self._plan_for(descs_data, descs_label, self._grad_req)
        if plan.mirrored == self.mirror_plan.mirrored and _same_segments(plan, self.mirror_plan):
            super().reshape(data_shapes, label_shapes)
            self.mirror_plan = plan
            return
        logger.info("new input shapes need a different mirror plan; rebinding executors")
        if self.params_initialized:
            self._sync_params_from_devices()  # Module.bind copies them into the new executors
        # Module.bind keeps the optimizer, updater and kvstore; only executors are new.
        self._symbol = plan.symbol
        try:
            with executor_group_for(_segments_of(plan)):
                super().bind(descs_data, descs_label, for_training=self.for_training,
                             inputs_need_grad=self.inputs_need_grad, force_rebind=True,
                             grad_req=self._grad_req)
        finally:
            self._symbol = self._user_symbol
        self.mirror_plan = plan

    # --------------------------------------------------------------- checkpoint
    @property
    def symbol(self) -> "mx.sym.Symbol":
        """The user's symbol (the bound one is ``mirror_plan.symbol``)."""
        return self._user_symbol

    @classmethod
    def load(cls, prefix: str, epoch: int, load_optimizer_states: bool = False,
             **kwargs: Any) -> "MirroredModule":
        """Create a ``MirroredModule`` from a checkpoint (as ``Module.load``).

        Keyword arguments of ``MirroredModule`` (``options`` and every
        option's keyword) are accepted besides ``Module``'s.
        """
        symbol, args, auxs = mx.model.load_checkpoint(prefix, epoch)
        module = cls(symbol=symbol, **kwargs)
        module._arg_params = args
        module._aux_params = auxs
        module.params_initialized = True
        if load_optimizer_states:
            module._preload_opt_states = "%s-%04d.states" % (prefix, epoch)
        return module

    def _sync_params_from_devices(self) -> None:
        """Copy parameters from the devices, after pending writes have finished.

        # NOTE [ reading BatchNorm statistics ]
        # With MXNet 1.9.1's MKLDNN BatchNorm, copying the moving statistics
        # right after training can read values that the engine has not yet
        # written (seen with a plain Module too: two identical runs disagree
        # unless ``mx.nd.waitall()`` comes first).  Waiting here makes
        # ``get_params`` and checkpoints exact.
        """
        mx.nd.waitall()
        super()._sync_params_from_devices()
