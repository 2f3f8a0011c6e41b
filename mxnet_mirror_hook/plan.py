"""``plan_mirror``: plan, measure and cache a mirroring decision for a symbol."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from . import env
from ._version import __version__
from .cache import PlanCache, PlanKey, get_cache, grad_req_digest
from .core.budget import Budget, BudgetLike
from .core.cost import recompute_overhead
from .core.liveness import drop_unread_copies
from .core.graph import Graph, NodeKind, draws_random, replays_random
from .core.liveness import kept_bytes
from .core.units import MB
from .core.planners import get_planner
from .core.planners.base import NullProgress
from .core.segments import SegmentPlan
from .core.allocator import ExecutedGraph
from .errors import BackendError, BudgetUnreachableError, MeasurementError, ShapeError
from .options import MirrorOptions, normalize_keep_ops
from .progress import PlanProgress
from .mx.apply import MirrorTemplate
from .mx.convert import normalize_inputs, structure_hash, symbol_to_graph
from .mx.bind import planned_mb_in_process, to_context
from .mx.measure import executed_graph, measures_in_process, planned_mb_many

__all__ = ["MirrorPlan", "plan_mirror", "prepare_planning", "PlanningSetup"]

logger = logging.getLogger(__name__)


@dataclass
class MirrorPlan:
    """A mirroring plan for one symbol at one set of input shapes.

    Attributes
    ----------
    symbol : mx.sym.Symbol
        The symbol to bind: the user's, with ``force_mirroring`` on the
        recomputed nodes.
    baseline_mb : float
        MXNet's planned memory of the unmirrored symbol.
    planned_mb : float
        MXNet's planned memory of :attr:`symbol` (never above ``baseline_mb``).
    mirrored : tuple of str
        Recomputed nodes, in topological order.
    planner : str
        Name of the planner that made the plan.
    overhead : float
        Estimated extra compute as a fraction of one plain training iteration.
    budget : str
        The budget the plan was made for.
    context : str
        Device type the memory was measured on.
    kept_count : int
        Operators whose outputs are not recomputed.
    planning_seconds : float
        Time spent planning (or loading from the cache).
    from_cache : bool
        Whether the decision came from the plan cache.
    candidates : list of dict
        Every measured candidate: ``label``, ``planned_mb``, ``overhead``,
        ``mirrored_count`` (empty for plans from the cache).
    inputs : tuple of (name, shape)
        The per-device input shapes the plan was made for (named in
        :meth:`summary`, so that log lines of several shapes or buckets can be
        told apart).
    backend : str
        ``'mirror'`` (MXNet's one-level mirror: bind :attr:`symbol`) or
        ``'segments'`` (executor segments: :attr:`segment_plan`; :attr:`symbol`
        is then the user's symbol, split at bind).
    segment_plan : SegmentPlan or None
        The segments, for the ``'segments'`` backend.
    """

    symbol: Any
    baseline_mb: float
    planned_mb: float
    mirrored: Tuple[str, ...]
    planner: str
    overhead: float
    budget: str = "auto"
    context: str = "cpu"
    kept_count: int = 0
    planning_seconds: float = 0.0
    from_cache: bool = False
    candidates: List[Dict[str, Any]] = field(default_factory=list)
    inputs: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
    backend: str = "mirror"
    segment_plan: Optional[SegmentPlan] = None

    @property
    def segment_count(self) -> int:
        """Number of executor segments (1 for the one-level mirror)."""
        return self.segment_plan.count if self.segment_plan is not None else 1

    @property
    def ratio(self) -> float:
        """``planned_mb / baseline_mb`` (1.0 when nothing was saved)."""
        return self.planned_mb / self.baseline_mb if self.baseline_mb else 1.0

    @property
    def saved_mb(self) -> float:
        """Memory saved against the unmirrored plan."""
        return self.baseline_mb - self.planned_mb

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary (without the symbol)."""
        return {
            "baseline_mb": self.baseline_mb, "planned_mb": self.planned_mb, "ratio": self.ratio,
            "overhead": self.overhead, "planner": self.planner, "budget": self.budget,
            "context": self.context, "mirrored": list(self.mirrored),
            "mirrored_count": len(self.mirrored), "kept_count": self.kept_count,
            "planning_seconds": self.planning_seconds, "from_cache": self.from_cache,
            "inputs": {name: list(shape) for name, shape in self.inputs},
            "candidates": self.candidates, "backend": self.backend,
            "segment_count": self.segment_count,
            "segments": self.segment_plan.to_dict() if self.segment_plan is not None else None,
        }

    def summary(self) -> str:
        """One line for logs."""
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.inputs)
        backend = (f", {self.segment_count} segments" if self.backend == "segments" else "")
        if self.segment_plan is not None and self.segment_plan.replay_random:
            backend += ", random draws replayed"
        return (f"mirror plan [{self.planner}, budget {self.budget}, {self.context}{backend}]"
                f"{' for ' + shapes if shapes else ''}: "
                f"{self.baseline_mb:.0f} MB -> {self.planned_mb:.0f} MB ({self.ratio:.2f}x), "
                f"{len(self.mirrored)} recomputed / {self.kept_count} kept, est. overhead "
                f"{self.overhead:.1%}, {'cached' if self.from_cache else 'planned'} in "
                f"{self.planning_seconds:.2f} s")

    def __repr__(self) -> str:
        return f"<MirrorPlan {self.summary()}>"


class _BindMeasure:
    """The planners' measurement callback: decision -> MXNet's planned MB.

    ``many`` measures several decisions at once (in parallel worker processes);
    ``executed_graph`` captures the unmirrored bind's executed graph for the
    allocator model (None when MXNet's memory log cannot be read), and its
    bind's figure answers the unmirrored measurement.
    """

    def __init__(self, template: MirrorTemplate, context: "mx.Context", shapes: Dict[str, tuple],
                 types: Dict[str, Any], requests: Dict[str, str]) -> None:
        self.template, self.context = template, context
        self.shapes, self.types, self.requests = shapes, types, requests
        self._known: Dict[frozenset, float] = {}
        self.progress: Any = NullProgress()

    def __call__(self, mirrored: frozenset) -> float:
        return self.many([mirrored])[0]

    def many(self, decisions: Sequence[frozenset]) -> List[float]:
        fresh = [d for d in decisions if d not in self._known]
        if fresh:
            self.progress.phase(f"binding {len(fresh)} candidate(s)", len(fresh))
            texts = [self.template.build_json(d) for d in fresh]
            measured = planned_mb_many(texts, self.context, self.shapes, self.types, self.requests)
            self._known.update(zip(fresh, measured))
            self.progress.advance(len(fresh))
        return [self._known[d] for d in decisions]

    def executed_graph(self) -> Optional[ExecutedGraph]:
        text = self.template.build_json(frozenset())
        if measures_in_process(text):
            logger.info("binding in this process (Custom operators or %s=inprocess): no allocator "
                        "model, every plan is bound", env.MEASURE)
            return None
        self.progress.phase("capturing MXNet's executed graph")
        try:
            graph = executed_graph(text, self.context, self.shapes, self.types, self.requests)
        except MeasurementError as error:
            logger.warning("no allocator model for this symbol (%s); every plan is bound", error)
            return None
        if graph.measured_mb is not None:
            self._known[frozenset()] = graph.measured_mb
        return graph


#: Under the default budget, a network whose activations backward keeps (liveness model,
#: unmirrored) stay under this many bytes is not mirrored (NOTE [ deciding without candidates ]).
SMALL_ACTIVATIONS_BYTES = 1 * MB


def nothing_to_gain(graph: Graph, budget: Budget) -> Optional[str]:
    """Why mirroring cannot help ``graph`` under ``budget``, or None when it may.

    # NOTE [ deciding without candidates ]
    # Planning binds candidates in worker processes (seconds on a new process),
    # which a network gains nothing from when no operator may be recomputed, or
    # when, under the default budget, the outputs backward keeps are under 1 MB
    # (MXNet reports whole MB, so no plan could show a saving; an MNIST MLP at
    # batch 100 keeps ~0.1 MB).  Then the plan is the unmirrored symbol, decided
    # from the graph alone and measured by one bind in this process (tens of
    # milliseconds for such a network).  An explicit budget ('min', a fraction,
    # a size) always plans.
    """
    if not any(node.can_mirror for node in graph.op_nodes):
        return "no operator may be recomputed"
    if budget.kind == "auto" and kept_bytes(graph) < SMALL_ACTIVATIONS_BYTES:
        return f"backward keeps under {SMALL_ACTIVATIONS_BYTES / MB:.0f} MB of activations"
    return None


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


@dataclass
class PlanningSetup:
    """Everything planning needs from a symbol and its inputs (see :func:`prepare_planning`)."""

    graph: Graph
    template: MirrorTemplate
    measure: "_BindMeasure"
    context: Any
    document: Dict[str, Any]
    requests: Dict[str, str]
    all_inputs: List[Tuple[str, Tuple[int, ...], Any]]
    keep_ops: Tuple[str, ...]


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
                         measure=_BindMeasure(template, context, shapes, types, requests),
                         context=context, document=document, requests=requests,
                         all_inputs=all_inputs, keep_ops=keep_ops)


def _cpu_runs_unread_copies() -> bool:
    """Whether this process's CPU operators run a recomputed copy nothing reads: with MKLDNN
    (this build's default) they do; without it MXNet's convolution checks its output request
    and fails (NOTE [ copies nothing reads ] in core/liveness.py).  cuDNN's convolution on the
    GPU writes the copy's own (allocated) block and does not check."""
    if env.mkldnn_switched_off():
        return False
    try:
        return bool(mx.runtime.Features().is_enabled("MKLDNN"))
    except (AttributeError, RuntimeError, mx.base.MXNetError):
        return False


def plan_mirror(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None, *,
                options: Optional[MirrorOptions] = None,
                planner: Optional[str] = None, memory_budget: BudgetLike = None,
                ctx: Union[None, str, "mx.Context"] = None,
                cache_dir: Union[None, str, bool] = None,
                grad_req: Union[str, Dict[str, str]] = "write",
                fixed_param_names: Optional[Sequence[str]] = None,
                inputs_need_grad: bool = False,
                keep_ops: Optional[Iterable[str]] = None,
                backend: Optional[str] = None, segments: Optional[int] = None,
                recompute_dropout: Optional[bool] = None) -> MirrorPlan:
    """Plan which forward nodes to recompute during backward.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol, loss included.
    data_shapes : list of DataDesc or (name, shape), or dict
        Input shapes as ``Module.bind`` takes them (per device).
    label_shapes : same as data_shapes, optional
        Label shapes; labels MXNet can infer may be left out.
    options : MirrorOptions, optional
        Planner, budget, cache, measuring context and kept operators in one
        object; the keyword arguments below override its fields.
    planner : str
        A registered planner (``'auto'`` by default, ``'dp'``, ``'memonger'``,
        ``'none'``...).
    memory_budget : None, 'min', float, int or str
        See :func:`~mxnet_mirror_hook.core.budget.parse_budget`.
    ctx : mx.Context or str, optional
        Where to measure the plan (CPU by default; ``mx.gpu()`` for cuDNN's figures).
    cache_dir : str, None or False
        Plan cache directory (``None``: the default; ``False``: memory only).
    grad_req : str or dict
        Gradient request of the parameters, as in ``Module.bind``.
    fixed_param_names : list of str, optional
        Parameters that get no gradient.
    inputs_need_grad : bool
        Whether data inputs get gradients.
    keep_ops : iterable of str, optional
        Operator types never to recompute (their outputs are kept).  Dropout
        and BatchNorm variants that update statistics in their forward call
        are never recomputed in any case (see NOTE [ BatchNorm recomputed ] in
        :mod:`.mx.apply`).
    backend : str
        ``'mirror'`` (MXNet's one-level mirror, the default), ``'segments'``
        (executor segments, always) or ``'auto'`` (segments when they measure
        lower than the one-level plan; see :func:`plan_with_segments`).
    segments : int, optional
        Number of segments for the segments backend (default: chosen by the
        memory estimate).
    recompute_dropout : bool, optional
        Rewrite each ``Dropout`` before planning so that its output may be
        recomputed (:func:`~mxnet_mirror_hook.mx.dropout.recomputable_dropout`);
        :attr:`MirrorPlan.symbol` is then the rewritten, mirrored symbol (same
        arguments, outputs and auxiliary states).  With executor segments,
        networks with Dropout may be split instead, re-run segments replaying
        their draws (``segment_plan.replay_random``).  Off by default.

    Returns
    -------
    MirrorPlan
        Never worse than the unmirrored symbol: when nothing beats it, the
        plan is the unmirrored symbol.

    Raises
    ------
    TypeError
        For a symbol, budget or planner of the wrong type.
    ShapeError
        For shapes that do not fit the symbol.
    UnknownPlannerError
        For an unknown planner name.
    BudgetError
        For a budget that makes no sense; ``BudgetUnreachableError`` when no
        plan fits it.
    """
    started = time.perf_counter()
    options = MirrorOptions.coerce(options, planner=planner, memory_budget=memory_budget,
                                   cache_dir=cache_dir, cost_ctx=ctx, keep_ops=keep_ops,
                                   backend=backend, segments=segments,
                                   recompute_dropout=recompute_dropout)
    if options.backend != "mirror":  # executor segments (plan_with_segments, below)
        return plan_with_segments(symbol, data_shapes, label_shapes, options=options,
                                  grad_req=grad_req, fixed_param_names=fixed_param_names,
                                  inputs_need_grad=inputs_need_grad)
    # ---- recomputable dropout (issue 11)
    if options.recompute_dropout:
        from .mx.dropout import recomputable_dropout
        rewritten = recomputable_dropout(symbol)
        if rewritten is not symbol:
            return _plan_both_ways(symbol, rewritten, data_shapes, label_shapes, options=options,
                                   grad_req=grad_req, fixed_param_names=fixed_param_names,
                                   inputs_need_grad=inputs_need_grad)
    # ---- end recomputable dropout
    planner = options.planner
    chosen_planner = get_planner(planner)
    budget = options.budget
    setup = prepare_planning(symbol, data_shapes, label_shapes, ctx=options.cost_ctx,
                             grad_req=grad_req, fixed_param_names=fixed_param_names,
                             inputs_need_grad=inputs_need_grad, keep_ops=options.keep_ops)
    graph, template, context = setup.graph, setup.template, setup.context
    key = PlanKey(structure=structure_hash(symbol, setup.document),
                  inputs=tuple(sorted(setup.all_inputs)), grad_req=grad_req_digest(setup.requests),
                  planner=planner, budget=budget.key, mxnet_version=mx.__version__,
                  context=context.device_type, keep_ops=setup.keep_ops, plugin_version=__version__,
                  recompute_dropout=options.recompute_dropout)
    cache: PlanCache = get_cache(options.cache_dir)

    def finish(mirrored: Sequence[str], baseline_mb: float, planned_mb: float, overhead: float,
               from_cache: bool, candidates: Optional[List[Dict[str, Any]]] = None) -> MirrorPlan:
        """The plan for a decision, whether just planned or from the cache."""
        if not _cpu_runs_unread_copies():
            runnable = drop_unread_copies(graph, mirrored)
            if len(runnable) < len(mirrored):
                logger.warning(
                    "MKLDNN is off in this process: %d recomputed nodes whose copy nothing reads are "
                    "not recomputed (MXNet's convolution without MKLDNN refuses such copies; NOTE "
                    "[ copies nothing reads ]); the planned %.0f MB was measured with them",
                    len(mirrored) - len(runnable), planned_mb)
                mirrored = [name for name in mirrored if name in runnable]
        plan = MirrorPlan(
            symbol=template.build(frozenset(mirrored)), baseline_mb=baseline_mb,
            planned_mb=planned_mb, mirrored=tuple(mirrored), planner=planner, overhead=overhead,
            budget=str(budget), context=context.device_type,
            kept_count=len(graph.op_nodes) - len(mirrored),
            planning_seconds=time.perf_counter() - started, from_cache=from_cache,
            candidates=candidates or [],
            inputs=tuple((name, tuple(shape)) for name, shape, _ in setup.all_inputs))
        logger.info("%s", plan.summary())
        return plan

    def plan_now() -> MirrorPlan:
        """Plan with the chosen planner and store the decision in the cache."""
        reason = nothing_to_gain(graph, budget)
        if reason is not None:
            # NOTE [ deciding without candidates ]: one in-process bind of the
            # unmirrored symbol (no worker process to start) gives MXNet's figure.
            baseline_mb = planned_mb_in_process(template.build(frozenset()), context,
                                                setup.measure.shapes, setup.measure.types,
                                                setup.requests)
            logger.debug("not mirroring: %s", reason)
            plan = finish((), baseline_mb, baseline_mb, 0.0, from_cache=False,
                          candidates=[{"label": f"unmirrored ({reason})",
                                       "planned_mb": baseline_mb, "overhead": 0.0,
                                       "mirrored_count": 0}])
            cache.put(key, {"mirrored": [], "baseline_mb": baseline_mb,
                            "planned_mb": baseline_mb, "overhead": 0.0, "label": "unmirrored"})
            return plan
        label = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape, _ in setup.all_inputs)
        # A BudgetUnreachableError comes out unchained, with one smallest-reachable figure:
        # auto's search under a limit runs outside its except block (core/planners/auto).
        try:
            with PlanProgress(label) as progress:
                setup.measure.progress = progress
                outcome = chosen_planner.plan(graph, budget, setup.measure)
        finally:
            setup.measure.progress = NullProgress()
        chosen = outcome.chosen
        order = [n.name for n in graph.nodes if n.name in chosen.decision.mirrored]
        plan = finish(order, outcome.baseline_mb, chosen.planned_mb,
                      recompute_overhead(graph, order), from_cache=False,
                      candidates=[{"label": c.decision.label, "planned_mb": c.planned_mb,
                                   "overhead": c.overhead, "mirrored_count": len(c.decision.mirrored)}
                                  for c in outcome.candidates])
        cache.put(key, {"mirrored": list(order), "baseline_mb": plan.baseline_mb,
                        "planned_mb": plan.planned_mb, "overhead": plan.overhead,
                        "label": chosen.decision.label})
        return plan

    cached = cache.get(key)
    if cached is None:
        # One process plans a key, the others wait for its entry (NOTE [ ranks sharing a cache ]).
        with cache.planning(key):
            cached = cache.get(key)  # written meanwhile by the process that held the lock
            if cached is None:
                return plan_now()
    if all(name in graph and graph.node(name).can_mirror for name in cached["mirrored"]):
        return finish(cached["mirrored"], float(cached["baseline_mb"]),
                      float(cached["planned_mb"]), float(cached["overhead"]), from_cache=True)
    logger.warning("plan cache: entry names nodes this symbol lacks or that may no longer be "
                   "recomputed; planning again")
    cache.forget(key)
    return plan_now()


# ----------------------------------------------------------------- recomputable dropout (issue 11)
def _plan_both_ways(symbol: "mx.sym.Symbol", rewritten: "mx.sym.Symbol", data_shapes: Any,
                    label_shapes: Any, *, options: MirrorOptions, **rest: Any) -> MirrorPlan:
    """The lower of the plans of ``rewritten`` (Dropout recomputable) and of ``symbol`` as written.

    # NOTE [ recomputable dropout, both ways ]
    # Making Dropout recomputable lowers MXNet's plan for some networks (a
    # dropout MLP) and raises it for others (attention, where a kept Dropout
    # output is a free checkpoint for MXNet's one-level mirror: NOTE [
    # recomputable dropout form ] in mx/dropout.py).  With the option on, both
    # symbols are planned (each through the cache: the rewritten one under a
    # key with ``recompute_dropout``, the user's under today's key) and the
    # lower planned MB is returned; on a tie, the user's symbol (MXNet's own
    # Dropout draws).  So the option never plans more than leaving it off.
    # ``plan.symbol`` tells which was taken (a rewritten symbol has
    # ``<dropout>_mask_draw`` nodes).  A budget that only one of them reaches
    # takes that one; when neither does, the error with the lower reachable
    # figure is raised.
    """
    plans: List[MirrorPlan] = []
    errors: List[BudgetUnreachableError] = []
    for candidate, flag in ((symbol, False), (rewritten, True)):
        try:
            plans.append(plan_mirror(candidate, data_shapes, label_shapes,
                                     options=options.replace(recompute_dropout=flag), **rest))
        except BudgetUnreachableError as error:
            errors.append(error)
    if not plans:
        raise min(errors, key=lambda e: e.min_reachable_mb) from None
    chosen = min(plans, key=lambda plan: plan.planned_mb)  # first (the user's) on a tie
    if len(plans) == 2:
        logger.info("recomputable dropout: %.0f MB with Dropout rewritten, %.0f MB as written; %s",
                    plans[1].planned_mb, plans[0].planned_mb,
                    "rewritten" if chosen is plans[1] else "keeping the user's Dropout")
    return chosen


# ----------------------------------------------------------------- segments backend (issue 11)
#: Re-run forward allowed by the default budget, as a fraction of one plain iteration: about one
#: extra forward (forward : backward = 1 : 2).  Plain segments re-run at most one forward.
SEGMENT_RECOMPUTE_LIMIT = 0.4
#: 'auto' takes segments only when their static figure is at most this fraction of the one-level
#: plan.  The storage profiler (bench/bench_segments.py, beyond the bind-time arrays every backend
#: has) matched the static figure of the bench LSTM to ~1 MB but measured the 13-segment language
#: model ~55 MB above it (pool sharing between executors, per-executor buffers), so a small static
#: win is not trusted.
SEGMENT_WIN_FRACTION = 0.9


def plan_with_segments(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None, *,
                       options: MirrorOptions, grad_req: Union[str, Dict[str, str]] = "write",
                       fixed_param_names: Optional[Sequence[str]] = None,
                       inputs_need_grad: bool = False) -> MirrorPlan:
    """:func:`plan_mirror` with the executor-segments backend considered.

    # NOTE [ choosing the backend ]
    # Today's one-level plan is made first (through the cache, unchanged).  A
    # segment plan is then chosen by the memory estimate of
    # :mod:`.core.segments` (or with ``segments`` pieces) and measured
    # statically (NOTE [ static memory of a segment plan ] in mx/segments.py).
    # With the ``'min'`` budget the same split is also measured with today's
    # mirrored nodes inside each segment (two levels) and the lower kept.
    # ``'auto'`` takes the segments only when they measure below the one-level
    # plan and re-run at most about one forward under the default budget, so it
    # never returns a plan worse than today's; ``'segments'`` always takes them.

    Parameters
    ----------
    symbol, data_shapes, label_shapes, grad_req, fixed_param_names, inputs_need_grad
        As for :func:`plan_mirror`.
    options : MirrorOptions
        With ``backend`` ``'auto'`` or ``'segments'`` (``'mirror'`` is plain
        :func:`plan_mirror`) and ``segments`` (None: chosen by the estimate).
    """
    from dataclasses import replace

    from .core.segments import (MAX_SEGMENTS, best_segment_plan, full_cut_chain, head_chunk_count,
                                loss_head, plan_segments, plan_segments_with_head)
    from .mx.segments import segment_planned_mb

    backend, segments = options.backend, options.segments
    started = time.perf_counter()
    rest = dict(grad_req=grad_req, fixed_param_names=fixed_param_names,
                inputs_need_grad=inputs_need_grad)
    one_level = plan_mirror(symbol, data_shapes, label_shapes,
                            options=options.replace(backend="mirror", segments=None), **rest)
    if backend == "mirror":
        return one_level
    setup = prepare_planning(symbol, data_shapes, label_shapes, ctx=options.cost_ctx,
                             keep_ops=options.keep_ops, **rest)
    # NOTE [ segments and random operators ]
    # A segment's forward runs again before its backward; a Dropout (or sampler)
    # in it would draw a new mask there, and backward would differentiate a mask
    # forward never used: silently wrong gradients.  Without recompute_dropout
    # such networks keep MXNet's one-level mirror, which never recomputes
    # Dropout.  With it, the chain re-seeds the context's generator so that a
    # re-run segment draws what its forward drew (NOTE [ replaying random draws
    # in re-run segments ] in mx/segments.py); operators re-seeding is not known
    # to replay (a fused RNN's dropout, rrelu) are refused all the same.
    random_nodes = [n.name for n in setup.graph.op_nodes if draws_random(n.op, n.attrs)]
    if random_nodes and options.recompute_dropout:
        random_nodes = [n.name for n in setup.graph.op_nodes if not replays_random(n.op, n.attrs)]
    if random_nodes:
        if backend == "segments":
            raise BackendError(
                f"backend='segments' re-runs forward passes during backward, and this network "
                f"draws random numbers in forward ({', '.join(random_nodes[:3])}"
                f"{' ...' if len(random_nodes) > 3 else ''}): the re-run would use other dropout "
                f"masks. " + ("Re-seeding is not known to replay these operators' draws; "
                              if options.recompute_dropout else
                              "Pass recompute_dropout=True to replay Dropout draws (masks drawn "
                              "from per-segment seeds, not MXNet's own draws), or ")
                + "use backend='mirror' (or 'auto', which keeps the one-level plan here)")
        logger.info("segments not considered: %d nodes draw random numbers in forward (%s)",
                    len(random_nodes), random_nodes[0])
        return one_level
    replay = options.recompute_dropout and any(draws_random(n.op, n.attrs)
                                               for n in setup.graph.op_nodes)
    budget = options.budget
    request = backend if segments is None else f"{backend}:{segments}"
    key = PlanKey(structure=structure_hash(symbol, setup.document),
                  inputs=tuple(sorted(setup.all_inputs)), grad_req=grad_req_digest(setup.requests),
                  planner=options.planner, budget=budget.key,
                  mxnet_version=mx.__version__, context=setup.context.device_type,
                  keep_ops=setup.keep_ops, plugin_version=__version__, backend=request,
                  recompute_dropout=options.recompute_dropout)
    cache = get_cache(options.cache_dir)
    cached = cache.get(key)
    if cached is not None and cached.get("backend") in ("mirror", "segments"):
        if cached["backend"] == "mirror":
            return one_level
        try:
            chosen = SegmentPlan.from_dict(cached["segments"])
            known = all(n in setup.graph for s in chosen.segments for n in s.nodes)
        except (KeyError, TypeError, ValueError):
            known = False
        if known:
            return _segments_result(symbol, one_level, chosen, float(cached["planned_mb"]),
                                    float(cached["overhead"]), started, from_cache=True)
        cache.forget(key)

    graph = setup.graph
    chain = full_cut_chain(graph)  # shared by every split below
    if segments:
        splits = [plan_segments(graph, segments, chain=chain)]
    else:
        # The estimate misses parts of MXNet's per-segment plan (weight-gradient sums of
        # unrolled steps, replayed inputs), so finer splits than its choice are measured too.
        # Coarse splits too: in deep CNNs the early boundaries are large (resnet152_v1b, batch
        # 32, 'min': 3 segments plan 1151 MB, 6 segments 1568 MB).
        first = best_segment_plan(graph, chain=chain)
        splits, counts = [], set()
        for count in sorted({2, 3, 4, first.count, first.count * 2, first.count * 3}):
            split = first if count == first.count else plan_segments(graph, count, chain=chain)
            if split.count > 1 and split.count not in counts:
                counts.add(split.count)
                splits.append(split)
        splits = splits or [first]
    # NOTE [ chunked loss head ] in core/segments.py: a FullyConnected + SoftmaxOutput head is
    # also tried as its own last segment run in row chunks, beside the splits above (so the
    # choice below can only get lower).
    head, why = loss_head(graph)
    if head is None:
        logger.info("loss head not chunked: %s", why)
    elif not head_chunk_count(head):
        logger.info("loss head not chunked: its output fits one chunk")
    else:
        # With the head out of the way the recurrent part is the peak, and finer splits pay
        # (2x512 language model: 10 segments 245 MB, 21 segments 229 MB).
        widest = max(s.count for s in splits)
        head_counts = ([segments] if segments else
                       sorted({s.count for s in splits} | {2 * s.count for s in splits}
                              | {min(MAX_SEGMENTS, 4 * widest)}))
        for count in head_counts:
            try:
                split = plan_segments_with_head(graph, max(2, count), head, chain=chain)
            except ValueError as error:
                logger.info("loss head not chunked for %d segments: %s", count, error)
                continue
            if all(split.segments != other.segments or other.head_chunks != split.head_chunks
                   for other in splits):
                splits.append(split)
    splits = [split.with_replay_random(replay) for split in splits]
    candidates = list(splits)
    if budget.key == "min":
        # Two levels: today's decision inside each segment, and (for coarse splits) a plan
        # made for each segment on its own, which knows the segment's own cuts (resnet152_v1b,
        # batch 32: 2 segments, 1138 MB with the global decision, 980 MB planned per segment).
        if one_level.mirrored:
            candidates += [split.with_mirrored(one_level.mirrored, graph) for split in splits]
        candidates += [_per_segment_two_level(symbol, split, setup, options)
                       for split in splits if split.count <= MAX_PER_SEGMENT_PLANS]
    bind_inputs = ({name: shape for name, shape, _ in setup.all_inputs},
                   {name: np.dtype(dtype) for name, _, dtype in setup.all_inputs}, setup.requests)

    def measure(candidate: SegmentPlan) -> Tuple[float, float, SegmentPlan]:
        mb, per_segment = segment_planned_mb(symbol, candidate, setup.context, *bind_inputs)
        # The segment MXNet plans largest owns the shared pool (bound first).
        candidate = candidate.with_working_bytes([int(m * 2 ** 20) for m in per_segment])
        inner = [n for s in candidate.segments for n in s.mirrored]
        overhead = candidate.recompute_fraction + recompute_overhead(graph, inner)
        logger.info("segment plan: %d segments, %s%s, %.0f MB static, overhead %.1f%%",
                    candidate.count, "two levels" if inner else "one level",
                    ", match ranges " + "/".join(str(s.match_range or "-") for s in candidate.segments)
                    if any(s.match_range for s in candidate.segments) else "", mb, 100 * overhead)
        return mb, overhead, candidate

    measured = [measure(candidate) for candidate in candidates]
    if budget.key == "min":
        measured += _tune_shared_pool(symbol, graph, chain, setup, options, measured, measure, bind_inputs)
    least = min(item[0] for item in measured)
    # Within 3% of the least memory, fewer segments: fewer executor calls per iteration, and
    # less of what the static figure leaves out (each executor's temporary space; resnet152_v1b,
    # batch 32, 'min': 3 segments 1029 MB static and 2236 MB profiler peak, 2 segments 1042 MB
    # and 2074 MB).
    mb, overhead, chosen = min((item for item in measured if item[0] <= least * SEGMENT_COUNT_TOLERANCE),
                               key=lambda item: (item[2].count, item[1], item[0]))
    wins = (chosen.count > 1 and mb <= SEGMENT_WIN_FRACTION * one_level.planned_mb
            and (budget.key == "min" or overhead <= SEGMENT_RECOMPUTE_LIMIT))
    if backend == "auto" and not wins:
        cache.put(key, {"mirrored": list(one_level.mirrored), "baseline_mb": one_level.baseline_mb,
                        "planned_mb": one_level.planned_mb, "overhead": one_level.overhead,
                        "backend": "mirror"})
        return replace(one_level, candidates=one_level.candidates + [
            {"label": f"segments x{c.count}", "planned_mb": m, "overhead": o,
             "mirrored_count": sum(len(s.mirrored) for s in c.segments)} for m, o, c in measured])
    if backend == "segments" and mb > one_level.planned_mb:
        logger.warning("the segment plan (%.0f MB) is above the one-level mirror plan (%.0f MB) for "
                       "this network; backend='segments' was asked for, so it is used "
                       "(backend='auto' keeps the lower plan)", mb, one_level.planned_mb)
    cache.put(key, {"mirrored": sorted(n for s in chosen.segments for n in s.mirrored),
                    "baseline_mb": one_level.baseline_mb, "planned_mb": mb, "overhead": overhead,
                    "backend": "segments", "segments": chosen.to_dict()})
    return _segments_result(symbol, one_level, chosen, mb, overhead, started, from_cache=False)


#: A plan with fewer segments is taken when its static figure is within this factor of the
#: least.
SEGMENT_COUNT_TOLERANCE = 1.03

#: Splits of at most this many segments also get a mirror plan made per segment under 'min'.
MAX_PER_SEGMENT_PLANS = 4

#: Neighbouring cut lists measured around the best per-segment plan of each segment count
#: under 'min' (:func:`alternative_cuts`).
NEIGHBOUR_CUTS = 8


def _tune_shared_pool(symbol: "mx.sym.Symbol", graph: Any, chain: Any, setup: PlanningSetup,
                      options: MirrorOptions, measured: List[Tuple[float, float, SegmentPlan]],
                      measure: Any, bind_inputs: Tuple[Any, Any, Any]
                      ) -> List[Tuple[float, float, SegmentPlan]]:
    """Under ``'min'``: plans that make the shared pool of the executors smaller.

    The best measured plan of each segment count with a mirror plan made per segment is
    tried with its cuts moved to the ``NEIGHBOUR_CUTS`` nearest positions crossed by no more bytes
    (:func:`alternative_cuts`: the pool depends on how the segments' blocks dovetail,
    which only measuring tells), and the least plan of each count, the originals among them,
    with a match range per segment (NOTE [ a match range per segment ] in core/segments.py).
    The work is bounded by those counts, not by time.
    """
    from .core.segments import alternative_cuts, cut_positions, segment_plan_for_cuts
    from .mx.segments import tune_match_ranges

    def two_level_per_segment(plan: SegmentPlan) -> bool:
        return (1 < plan.count <= MAX_PER_SEGMENT_PLANS and not plan.head_chunks
                and any(s.mirrored for s in plan.segments))

    eligible = [item for item in measured if two_level_per_segment(item[2])]
    if not eligible:
        return []
    found = []
    for _, _, best in _least_of_each_count(eligible):
        cuts = cut_positions(graph, best)
        per_cut = max(1, NEIGHBOUR_CUTS // len(cuts))
        for moved in alternative_cuts(graph, cuts, per_cut, chain)[:NEIGHBOUR_CUTS]:
            split = segment_plan_for_cuts(graph, moved, chain).with_replay_random(best.replay_random)
            found.append(measure(_per_segment_two_level(symbol, split, setup, options)))
    tuned = []
    for _, _, least in _least_of_each_count(eligible + found):
        plan = tune_match_ranges(symbol, least, setup.context, *bind_inputs)
        if any(s.match_range for s in plan.segments):
            tuned.append(measure(plan))
    return found + tuned


def _least_of_each_count(measured: List[Tuple[float, float, SegmentPlan]]
                         ) -> List[Tuple[float, float, SegmentPlan]]:
    """The measured plan of least static MB for each segment count, fewest segments first."""
    least: Dict[int, Tuple[float, float, SegmentPlan]] = {}
    for item in measured:
        count = item[2].count
        if count not in least or item[0] < least[count][0]:
            least[count] = item
    return [least[count] for count in sorted(least)]


def _per_segment_two_level(symbol: "mx.sym.Symbol", split: SegmentPlan, setup: PlanningSetup,
                           options: MirrorOptions) -> SegmentPlan:
    """``split`` with a least-memory mirror plan made for each segment symbol on its own."""
    from .mx.segments import boundary_name, source_name, split_symbol

    given = {name: (shape, dtype) for name, shape, dtype in setup.all_inputs}
    mirrored: set = set()
    pieces = list(zip(split.segments, split_symbol(symbol, split)))
    if split.head_chunks:
        pieces = pieces[:-1]  # a chunked head runs no executor
    for segment, piece in pieces:
        arguments = piece.list_arguments()
        inputs = [(n, given[source_name(n)][0], given[source_name(n)][1]) for n in arguments
                  if source_name(n) in given]
        for entry in segment.inputs:
            key = f"{entry[0]}:{entry[1]}"
            inputs.append((boundary_name(entry), tuple(split.boundary_shapes[key]), "float32"))
        requests = {n: setup.requests.get(source_name(n), "null") for n in arguments}
        requests.update({boundary_name(e): "write" for e in segment.inputs})
        # The pieces are bound as written (a replayed Dropout is the user's), so planned so.
        piece_plan = plan_mirror(piece, inputs, None, grad_req=requests,
                                 options=options.replace(memory_budget="min", backend="mirror",
                                                         segments=None, recompute_dropout=False))
        mirrored.update(piece_plan.mirrored)
    return split.with_mirrored(mirrored, setup.graph)


def _segments_result(symbol: "mx.sym.Symbol", one_level: MirrorPlan, chosen: SegmentPlan,
                     planned_mb: float, overhead: float, started: float, from_cache: bool) -> MirrorPlan:
    """The :class:`MirrorPlan` of a segment plan (the bound symbol is the user's, split at bind)."""
    mirrored = tuple(n for s in chosen.segments for n in s.nodes if n in s.mirrored)
    plan = MirrorPlan(symbol=symbol, baseline_mb=one_level.baseline_mb,
                      planned_mb=planned_mb, mirrored=mirrored, planner=one_level.planner,
                      overhead=overhead, budget=one_level.budget, context=one_level.context,
                      kept_count=one_level.kept_count + len(one_level.mirrored) - len(mirrored),
                      planning_seconds=time.perf_counter() - started, from_cache=from_cache,
                      inputs=one_level.inputs, backend="segments", segment_plan=chosen)
    logger.info("%s", plan.summary())
    return plan
