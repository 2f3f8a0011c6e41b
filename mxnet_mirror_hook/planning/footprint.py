"""What a plan's whole footprint is computed from: :class:`FootprintSource` (the symbol, its inputs,
gradient requests and the optimizer), kept on :class:`~.result.MirrorPlan` and read lazily.

# NOTE [ the optimizer a footprint assumes ]
# Planning happens at bind, before ``init_optimizer``: the surfaces that know the optimizer
# (``MirroredModule.fit``/``init_optimizer``, ``MirroredTrainer``, ``max_batch``) pass it, and
# ``plan.with_optimizer`` sets it afterwards.  When none is known the footprint counts SGD with
# momentum 0.9 (one state array per updated weight: the usual convnet recipe, and neither the
# least nor the most an optimizer holds: Adam holds two) and says so (``optimizer_label`` ends in
# "assumed"), so a figure is never silently without the optimizer's state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from ..core.footprint import Footprint

__all__ = ["FootprintSource", "DEFAULT_OPTIMIZER", "DEFAULT_OPTIMIZER_PARAMS", "optimizer_label"]

#: The optimizer counted when none is known (NOTE [ the optimizer a footprint assumes ]).
DEFAULT_OPTIMIZER = "sgd"
DEFAULT_OPTIMIZER_PARAMS: Mapping[str, Any] = {"momentum": 0.9}


def optimizer_label(optimizer: Any, optimizer_params: Optional[Mapping[str, Any]], assumed: bool) -> str:
    """A short text naming the optimizer a footprint counts (``'sgd momentum 0.9 (assumed)'``)."""
    from ..mx.footprint import optimizer_spec

    name, options = optimizer_spec(optimizer, optimizer_params)
    if name is None:
        return "no optimizer"
    extras = [f"{key} {options[key]:g}" if isinstance(options[key], float) else key
              for key in ("momentum", "multi_precision", "centered")
              if options.get(key) not in (None, False, 0, 0.0)]
    text = " ".join([name] + extras)
    return text + (" (assumed)" if assumed else "")


@dataclass(frozen=True)
class FootprintSource:
    """Everything :func:`~mxnet_mirror_hook.mx.footprint.symbol_footprint` needs besides the plan's
    activation figure and its executor count.

    Attributes
    ----------
    symbol : mx.sym.Symbol
        The user's symbol (a mirrored or rewritten symbol has the same arguments).
    shapes, dtypes : mapping
        Every bound input's shape and dtype (per device).
    grad_req : mapping of str to str
        Every argument's gradient request, as the bind makes them.
    optimizer : str, mx.optimizer.Optimizer or None
        The optimizer; None with ``assumed`` True counts :data:`DEFAULT_OPTIMIZER`.
    optimizer_params : mapping, optional
        Its options when given by name.
    device : str
        ``'cpu'`` or ``'gpu'``: the device whose memory is counted.
    surface : str
        ``'module'`` or ``'gluon'`` (see ``symbol_footprint``).
    """

    symbol: Any
    shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]
    dtypes: Tuple[Tuple[str, str], ...]
    grad_req: Tuple[Tuple[str, str], ...]
    optimizer: Any = None
    optimizer_params: Optional[Tuple[Tuple[str, Any], ...]] = None
    device: str = "cpu"
    surface: str = "module"
    _cache: Dict[Tuple[float, int], Footprint] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of_setup(cls, setup: Any, optimizer: Any = None,
                 optimizer_params: Optional[Mapping[str, Any]] = None) -> "FootprintSource":
        """The source of a :class:`~.setup.PlanningSetup` (its user's symbol and bound inputs)."""
        shapes, types, requests = setup.bind_inputs
        return cls(setup.symbol, tuple((n, tuple(s)) for n, s in shapes.items()),
                   tuple((n, str(t)) for n, t in types.items()), tuple(sorted(requests.items())),
                   optimizer, _frozen(optimizer_params), setup.context.device_type)

    @property
    def assumed(self) -> bool:
        """Whether the optimizer is the default one, not one a surface passed."""
        return self.optimizer is None

    @property
    def optimizer_label(self) -> str:
        """The optimizer counted, in words."""
        if self.assumed:
            return optimizer_label(DEFAULT_OPTIMIZER, DEFAULT_OPTIMIZER_PARAMS, True)
        return optimizer_label(self.optimizer, dict(self.optimizer_params or ()), False)

    def replace(self, **changes: Any) -> "FootprintSource":
        """A copy with fields changed (``optimizer_params`` as a mapping)."""
        if "optimizer_params" in changes:
            changes["optimizer_params"] = _frozen(changes["optimizer_params"])
        return dataclasses.replace(self, _cache={}, **changes)

    def footprint(self, activations_mb: float, executors: int = 1) -> Footprint:
        """The whole footprint with ``activations_mb`` of activations on ``executors`` executors."""
        key = (float(activations_mb), int(executors))
        if key not in self._cache:
            from ..mx.footprint import symbol_footprint

            optimizer, params = ((DEFAULT_OPTIMIZER, DEFAULT_OPTIMIZER_PARAMS) if self.assumed
                                 else (self.optimizer, dict(self.optimizer_params or ())))
            self._cache[key] = symbol_footprint(
                self.symbol, dict(self.shapes), activations_mb=activations_mb, dtypes=dict(self.dtypes),
                input_names=[name for name, _ in self.shapes], grad_req=dict(self.grad_req),
                inputs_need_grad=True,  # the requests are the bind's own, inputs' included
                optimizer=optimizer, optimizer_params=params, context=self.device,
                surface=self.surface, executors=executors)
        return self._cache[key]


def _frozen(params: Optional[Mapping[str, Any]]) -> Optional[Tuple[Tuple[str, Any], ...]]:
    """Optimizer params as a hashable tuple (``Module.fit`` passes them as a tuple of pairs)."""
    if params is None:
        return None
    return tuple(sorted(dict(params).items()))
