"""``mxnet-mirror pareto``: memory against recomputation for every plan we and the seed make.

Each point is a measured candidate: MXNet's planned MB (a CPU bind) and the
cost model's estimated overhead, optionally the measured CPU overhead too.
Sources: ours (every candidate of ``auto`` with the least-compute sweep of the
dynamic programs), the plans ``max_overhead`` gives at a few limits (what a user
asking for "the least memory within x% more time" gets, fused operators and
selective segments included: their MB count what the fused operators hold outside
MXNet's plan), the seed's search on the symbol as given and with cut-point
stages, and MXNet's own ``MXNET_BACKWARD_DO_MIRROR=1``.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import mxnet as mx

from ..core.budget import parse_budget
from ..core.cost import recompute_overhead
from ..core.planners import Decision, get_planner
from ..core.planners.auto import SWEEP_FRACTIONS, AutoPlanner, auto_stages
from ..core.planners.base import CandidateEvaluator
from ..core.planners.dp import least_compute_decisions
from ..core.planners.memonger import threshold_decisions, user_stages
from ..core.planners.selective import selective_decisions
from ..mx.measure import DO_MIRROR_ENV, builtin_mirror_mb
from ..mx.timing import iteration_seconds
from ..options import MirrorOptions
from ..plan import prepare_planning

__all__ = ["ParetoPoint", "pareto_points", "max_overhead_points", "mark_front", "write_csv", "draw_pareto"]

logger = logging.getLogger(__name__)

@dataclass
class ParetoPoint:
    """One plan on the memory/compute plane."""

    source: str
    label: str
    planned_mb: float
    ratio: float
    estimated_overhead: float
    measured_overhead: Optional[float] = None
    mirrored_count: int = 0
    on_front: bool = False
    mirrored: frozenset = field(default=frozenset(), repr=False)
    symbol: Any = field(default=None, repr=False, compare=False)


def mark_front(points: Sequence[ParetoPoint]) -> None:
    """Set ``on_front`` on the points no other point beats on both memory and overhead."""
    for point in points:
        point.on_front = not any(
            other is not point and other.planned_mb <= point.planned_mb
            and other.estimated_overhead <= point.estimated_overhead
            and (other.planned_mb < point.planned_mb
                 or other.estimated_overhead < point.estimated_overhead)
            for other in points)


def pareto_points(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any = None, *,
                  measure_time: bool = False, repeats: int = 3,
                  include_seed: bool = True, ctx: Any = None,
                  keep_ops: Optional[Iterable[str]] = None, limits: Sequence[float] = (),
                  recompute_dropout: bool = False) -> List[ParetoPoint]:
    """Measure our candidates, the seed's and MXNet's built-in mirroring.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol.
    data_shapes, label_shapes
        As for :func:`~mxnet_mirror_hook.plan_mirror`.
    measure_time : bool
        Also time one training iteration of every point on our front, the
        seed's best and ``MXNET_BACKWARD_DO_MIRROR=1`` against the plain symbol
        (CPU, side by side; slow for big inputs).
    repeats : int
        Timed iterations per symbol when ``measure_time``.
    include_seed : bool
        Add the seed's plans and MXNet's built-in mirroring.
    ctx : mx.Context or str, optional
        Where plans are measured (CPU by default).
    keep_ops : iterable of str, optional
        Operator types never to recompute.
    limits : sequence of float
        Plan with ``max_overhead`` at each (source ``'max_overhead'``; one planning call each,
        cache off); timed too when ``measure_time``.
    recompute_dropout : bool
        Passed to those plans.

    Returns
    -------
    list of ParetoPoint
        Sorted by source, then memory; ``on_front`` marks our Pareto-optimal ones.
    """
    setup = prepare_planning(symbol, data_shapes, label_shapes, ctx=ctx,
                             keep_ops=MirrorOptions(keep_ops=tuple(keep_ops or ())).keep_ops)
    graph = setup.graph
    # Everything 'auto' binds for the least memory when it binds every candidate,
    # what it binds after searching against the allocator model, and the
    # least-compute sweep it runs under a fixed limit.
    budget = parse_budget("min")
    outcomes = [AutoPlanner(use_model=False).plan(graph, budget, setup.measure),
                get_planner("auto").plan(graph, budget, setup.measure)]
    baseline = outcomes[0].baseline_mb
    candidates = {c.decision.mirrored: c for o in outcomes for c in o.candidates}
    points = [_point("ours", c.decision, c.planned_mb, baseline, c.overhead)
              for c in candidates.values()]
    known = set(candidates)
    sweep = [d for d in least_compute_decisions(graph, SWEEP_FRACTIONS) if d.mirrored not in known]
    for decision, candidate in zip(sweep, CandidateEvaluator(graph, setup.measure).evaluate_many(sweep)):
        if candidate is not None:
            points.append(_point("ours", decision, candidate.planned_mb, baseline, candidate.overhead))
    if include_seed:
        seed = CandidateEvaluator(graph, setup.measure)
        for source, stages in (("seed, raw symbol", user_stages(graph)),
                               ("seed, cut-point stages", auto_stages(graph))):
            decisions = threshold_decisions(graph, stages)
            seen = set()
            for decision, candidate in zip(decisions, seed.evaluate_many(decisions)):
                if candidate is not None and decision.mirrored not in seen:
                    seen.add(decision.mirrored)
                    points.append(_point(source, decision, candidate.planned_mb, baseline,
                                         candidate.overhead))
        do_mirror_mb = builtin_mirror_mb(setup.template.build(frozenset()), setup.context,
                                         setup.measure.shapes, setup.measure.types, setup.requests)
        # MXNet's rule recomputes what our "selective, BatchNorm kept" decision names.
        rule = selective_decisions(graph)[1]
        points.append(ParetoPoint("MXNET_BACKWARD_DO_MIRROR=1", "MXNet's need_mirror rule",
                                  do_mirror_mb, do_mirror_mb / baseline,
                                  recompute_overhead(graph, rule.mirrored), None,
                                  len(rule.mirrored), False, frozenset()))
    points += max_overhead_points(symbol, data_shapes, label_shapes, limits, ctx, keep_ops, recompute_dropout)
    ours = [p for p in points if p.source == "ours"]
    mark_front(ours)
    if measure_time:
        _measure_times(setup, points, repeats)
    points.sort(key=lambda p: (p.source != "ours", p.source, p.planned_mb, p.estimated_overhead))
    return points


def max_overhead_points(symbol: "mx.sym.Symbol", data_shapes: Any, label_shapes: Any, limits: Sequence[float],
                  ctx: Any, keep_ops: Optional[Iterable[str]], recompute_dropout: bool) -> List[ParetoPoint]:
    """The plans ``max_overhead`` gives at each of ``limits`` (a limit no plan meets is left out)."""
    from ..errors import BudgetUnreachableError
    from ..plan import plan_mirror

    points = []
    for limit in limits:
        options = MirrorOptions(max_overhead=limit, cache_dir=False, cost_ctx=ctx,
                                keep_ops=tuple(keep_ops or ()), recompute_dropout=recompute_dropout)
        try:
            plan = plan_mirror(symbol, data_shapes, label_shapes, options=options)
        except BudgetUnreachableError as error:
            logger.info("max_overhead=%g: %s", limit, str(error).splitlines()[0])
            continue
        fused = ", fused operators" if plan.outside_plan_mb else ""
        label = f"max_overhead={limit:g} ({plan.backend}{fused})"
        points.append(ParetoPoint("max_overhead", label, plan.activation_mb, plan.ratio, plan.overhead,
                                  None, len(plan.mirrored), False, frozenset(plan.mirrored), plan.symbol))
    return points


def _point(source: str, decision: Decision, planned_mb: float, baseline_mb: float,
           overhead: float) -> ParetoPoint:
    return ParetoPoint(source, decision.label, planned_mb, planned_mb / baseline_mb, overhead,
                       None, len(decision.mirrored), False, decision.mirrored)


def _measure_times(setup, points: List[ParetoPoint], repeats: int) -> None:
    """Time the interesting points against the plain symbol (one run, side by side)."""
    chosen = [p for p in points if p.source == "ours" and p.on_front and p.mirrored]
    for source in ("seed, raw symbol", "seed, cut-point stages"):
        seeds = [p for p in points if p.source == source and p.mirrored]
        if seeds:
            chosen.append(min(seeds, key=lambda p: p.planned_mb))
    chosen += [p for p in points if p.source == "max_overhead"]
    do_mirror = [p for p in points if p.source == "MXNET_BACKWARD_DO_MIRROR=1"]
    template = setup.template
    plain = template.build(frozenset())
    symbols = [p.symbol if p.symbol is not None else template.build(p.mirrored) for p in chosen]
    symbols += [plain for _ in do_mirror]
    envs: List[Mapping[str, str]] = [{}] + [{} for _ in chosen] + [DO_MIRROR_ENV for _ in do_mirror]
    shapes = setup.measure.shapes
    seconds = iteration_seconds([plain] + symbols, shapes, grad_req=setup.requests,
                                repeats=repeats, bind_env=envs)
    for point, value in zip(chosen + do_mirror, seconds[1:]):
        point.measured_overhead = value / seconds[0] - 1.0
    for point in points:
        if point.source == "ours" and not point.mirrored:
            point.measured_overhead = 0.0


COLUMNS = [f.name for f in fields(ParetoPoint) if f.name not in ("mirrored", "symbol")]


def write_csv(points: Sequence[ParetoPoint], path: str) -> None:
    """One row per point; overheads as fractions, empty when not measured."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for point in points:
            writer.writerow(["" if getattr(point, name) is None else
                             (f"{getattr(point, name):.4f}" if isinstance(getattr(point, name), float)
                              else getattr(point, name)) for name in COLUMNS])


_STYLE = {"ours": ("o", "#1f6fb4"), "seed, raw symbol": ("x", "#c0392b"),
          "seed, cut-point stages": ("^", "#e67e22"), "MXNET_BACKWARD_DO_MIRROR=1": ("s", "#27ae60"),
          "max_overhead": ("D", "#8e44ad")}


def draw_pareto(points: Sequence[ParetoPoint], title: str, path: str) -> None:
    """Planned MB against estimated (and, where measured, measured) overhead; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = any(p.measured_overhead is not None and p.mirrored_count for p in points)
    figure, axes = plt.subplots(1, 2 if measured else 1, figsize=(13 if measured else 8, 5.5),
                                dpi=110, squeeze=False)
    panels = [("estimated_overhead", "estimated overhead (% of a plain iteration)")]
    if measured:
        panels.append(("measured_overhead", "measured CPU overhead (% of a plain iteration)"))
    for axis, (attribute, xlabel) in zip(axes[0], panels):
        for source, (marker, color) in _STYLE.items():
            chosen = [p for p in points if p.source == source and getattr(p, attribute) is not None]
            if chosen:
                axis.scatter([100 * getattr(p, attribute) for p in chosen],
                             [p.planned_mb for p in chosen], marker=marker, color=color,
                             label=source, s=36, alpha=0.85)
        front = sorted((p for p in points if p.on_front and getattr(p, attribute) is not None),
                       key=lambda p: getattr(p, attribute))
        if len(front) > 1:
            axis.plot([100 * getattr(p, attribute) for p in front], [p.planned_mb for p in front],
                      color=_STYLE["ours"][1], linewidth=1, alpha=0.6, label="ours: Pareto front")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("MXNet planned memory (MB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    logger.info("wrote %s", path)
