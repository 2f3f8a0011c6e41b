"""Planning's request and setup: the symbol and inputs checked, the graph, template and measurement."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .._version import __version__
from ..cache import PlanKey, get_cache, grad_req_digest
from ..core.cost import measured_costs_of, use_measured_costs
from ..core.graph import Graph, NodeKind
from ..errors import ShapeError
from ..mx.apply import MirrorTemplate
from ..mx.bind import to_context
from ..mx.calibrate import table_costs
from ..mx.convert import normalize_inputs, structure_hash, symbol_to_graph
from ..options import MirrorOptions, normalize_keep_ops
from .measure import BindMeasure

__all__ = ["PlanRequest", "PlanningSetup", "prepare_planning", "grad_req_for"]


def grad_req_for(symbol: "mx.sym.Symbol", graph: Graph, grad_req: Union[str, Dict[str, str]],
                 fixed_param_names: Iterable[str], inputs_need_grad: bool) -> Dict[str, str]:
    """Per-argument gradient requests, as ``DataParallelExecutorGroup`` makes them."""
    fixed = set(fixed_param_names or ())
    requests: Dict[str, str] = {}
    for name in symbol.list_arguments():
        if isinstance(grad_req, dict):
            request = grad_req.get(name, "null")
        elif graph.node(name).kind is NodeKind.INPUT:
            request = grad_req if inputs_need_grad else "null"
        else:
            request = grad_req
        requests[name] = "null" if name in fixed else request
    return requests


def _validate_grad_req(grad_req: Union[str, Dict[str, str]]) -> None:
    allowed = ("write", "add", "null", "inplace")
    values = grad_req.values() if isinstance(grad_req, dict) else [grad_req]
    for value in values:
        if value not in allowed:
            raise ValueError(f"grad_req must be one of {allowed} (or a dict of them), got {grad_req!r}")


@dataclass(frozen=True)
class PlanRequest:
    """What the caller asked about the inputs, apart from the symbol and the options.

    Kept so that another symbol of the same request (a Dropout rewrite) is prepared alike.
    Fields are as :func:`plan_mirror` takes them.
    """

    data_shapes: Any
    label_shapes: Any = None
    grad_req: Union[str, Dict[str, str]] = "write"
    fixed_param_names: Optional[Sequence[str]] = None
    inputs_need_grad: bool = False

    def prepare(self, symbol: "mx.sym.Symbol", options: MirrorOptions) -> PlanningSetup:
        """:func:`prepare_planning` of ``symbol`` for this request under ``options``, with the
        operator times of the cache directory's calibration table when it has them all (NOTE [
        calibrating the cost model ] in mx/calibrate.py)."""
        setup = prepare_planning(symbol, self.data_shapes, self.label_shapes, ctx=options.cost_ctx,
                                 grad_req=self.grad_req, fixed_param_names=self.fixed_param_names,
                                 inputs_need_grad=self.inputs_need_grad, keep_ops=options.keep_ops)
        directory = get_cache(options.cache_dir).directory
        if directory is not None:
            use_measured_costs(setup.graph, table_costs(setup.graph, setup.context.device_type, directory))
        return setup


@dataclass
class PlanningSetup:
    """Everything planning needs from a symbol and its inputs (see :func:`prepare_planning`)."""

    graph: Graph
    template: MirrorTemplate
    measure: BindMeasure
    context: Any
    document: Dict[str, Any]
    requests: Dict[str, str]
    all_inputs: List[Tuple[str, Tuple[int, ...], Any]]
    keep_ops: Tuple[str, ...]
    symbol: Any
    request: PlanRequest
    #: The footprint source ``plan_mirror`` made for this setup (the device the plan runs on):
    #: ``'auto'`` compares the backends' footprints on it (planning/chain_footprint.py).
    footprint_source: Optional[Any] = None

    @property
    def input_shapes(self) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
        """``(name, shape)`` of every bound input, as :attr:`MirrorPlan.inputs` names them."""
        return tuple((name, tuple(shape)) for name, shape, _ in self.all_inputs)

    @property
    def bind_inputs(self) -> Tuple[Dict[str, tuple], Dict[str, Any], Dict[str, str]]:
        """Shapes, dtypes and gradient requests of every argument, as the binds take them."""
        return ({name: shape for name, shape, _ in self.all_inputs},
                {name: np.dtype(dtype) for name, _, dtype in self.all_inputs}, self.requests)

    @cached_property
    def structure(self) -> str:
        """The symbol's structure hash (computed once per setup)."""
        return structure_hash(self.symbol, self.document)

    def key(self, options: MirrorOptions) -> PlanKey:
        """The cache key of the one-level plan under ``options`` (a segments request's key is
        this one with its ``backend``).  A plan made from measured operator times has its own key."""
        measured = measured_costs_of(self.graph)
        planner = options.planner if measured is None else f"{options.planner}@measured-{measured.device}"
        return PlanKey(structure=self.structure, inputs=tuple(sorted(self.all_inputs)),
                       grad_req=grad_req_digest(self.requests), planner=planner,
                       budget=options.budget.key, mxnet_version=mx.__version__,
                       context=self.context.device_type, keep_ops=self.keep_ops,
                       plugin_version=__version__, recompute_dropout=options.recompute_dropout)


def prepare_planning(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None, *,
                     ctx: Union[None, str, "mx.Context"] = None,
                     grad_req: Union[str, Dict[str, str]] = "write",
                     fixed_param_names: Optional[Sequence[str]] = None,
                     inputs_need_grad: bool = False,
                     keep_ops: Optional[Iterable[str]] = None) -> PlanningSetup:
    """Check a symbol and its inputs and build the graph, template and measurement callback.

    Parameters are as for :func:`plan_mirror`; the errors too.
    """
    if not isinstance(symbol, mx.sym.Symbol):
        raise TypeError(f"symbol must be an mx.sym.Symbol, got {type(symbol).__name__}")
    _validate_grad_req(grad_req)
    context = to_context(ctx)
    inputs = normalize_inputs(data_shapes, "data") + normalize_inputs(label_shapes, "label")
    if not inputs:
        raise ShapeError("data_shapes is empty; give at least the shape of the data input, "
                         "e.g. [('data', (32, 3, 224, 224))]")
    names = [spec.name for spec in inputs]
    if len(set(names)) != len(names):
        raise ShapeError(f"an input appears in both data_shapes and label_shapes: {names}")
    document = json.loads(symbol.tojson())  # parsed once, shared below
    keep_ops = normalize_keep_ops(keep_ops)
    graph = symbol_to_graph(symbol, inputs, document=document, keep_ops=keep_ops)
    requests = grad_req_for(symbol, graph, grad_req, fixed_param_names or (), inputs_need_grad)
    if all(req == "null" for req in requests.values()):
        raise ValueError("nothing in this symbol gets a gradient (every parameter is fixed or "
                         "grad_req is 'null'); mirroring only helps training: bind it plainly")
    shapes = {spec.name: spec.shape for spec in inputs}
    types = {spec.name: np.dtype(spec.dtype) for spec in inputs}
    all_inputs = [(spec.name, spec.shape, spec.dtype) for spec in inputs]
    for node in graph.nodes:  # labels MXNet inferred are bound and keyed like given ones
        if node.kind is NodeKind.INPUT and node.name not in shapes:
            all_inputs.append((node.name, tuple(node.output_shapes[0]), "float32"))
            shapes[node.name] = tuple(node.output_shapes[0])
    template = MirrorTemplate(symbol, document)
    return PlanningSetup(graph=graph, template=template,
                         measure=BindMeasure(template, context, shapes, types, requests),
                         context=context, document=document, requests=requests,
                         all_inputs=all_inputs, keep_ops=keep_ops, symbol=symbol,
                         request=PlanRequest(data_shapes, label_shapes, grad_req, fixed_param_names,
                                             inputs_need_grad))
