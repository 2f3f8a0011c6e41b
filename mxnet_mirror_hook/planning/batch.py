"""The largest batch whose whole footprint fits a device: :func:`max_batch`.

# NOTE [ searching for the largest batch ]
# The footprint grows with the batch (activations, inputs, MKLDNN's buffers) on top
# of a fixed part (parameters, gradients, optimizer state), nearly linearly, but
# MXNet's static plan and a planner's decisions are not exactly linear in it.  The
# exact search ('search') plans at real batches only and ends at a bracket: one batch
# that fits, the next one not (or ``limit``).  The first two probes place a line; each
# next batch is the last one the line through the bracket's ends (or, while one end is
# open, through the known end and the point farthest from it: MXNet's figures are whole
# MB) says fits, so on a near-linear footprint the bracket closes in two or three plans
# after the probes (resnet18_v1b 64x64 in 300 MB: plain, one-level and segments in 5, 5
# and 4 plans where stepping out from the guess and bisecting took 6, 7 and 7; 200 random
# whole-MB footprints in tests/api/test_max_batch_search.py: 5.4 plans on average).  On
# a bent footprint the same end would move one batch at a time; after it moved twice in a
# row the other end's weight is halved (the Illinois rule of false position), or, with
# one end open, the step doubled.  Each
# step is a plan (through the plan cache, and kept here by batch, so no batch is planned
# twice), and the steps are bounded by ``max_steps`` (a bracket not closed within it
# returns its lower end, marked not exact).  The answer is the bracket's lower end; on a
# footprint that grows with the batch it is the same whatever the order of the points.
# The segment kind's probes are the dear part ('min' executor segments search tens of
# splits, minutes per batch on deep networks): it plans the first probe only, measures
# that plan's split again at other batches (MXNet's static figure of each segment,
# seconds each), runs the same search on those measurements, and plans from where they
# say the bracket is (that batch and the next): resnet18_v1b above, 4 'min' segment searches
# instead of 7; resnet50_v1b 112x112 in 2 GB on the CPU, 5 instead of 11 (plans per kind 5,
# 5, 5 instead of 6, 10, 11; 211 s instead of 447 s on two loaded cores; same answers).
# Planner warnings of these internal plans are held back (NOTE [ warnings of internal
# probes ] in planning/probe_log.py).  The estimate ('slope') plans at the
# probes only and extrapolates every part of the footprint linearly from the two: cheap
# for planners that take long at large batches, marked ``estimated``; its segment plan is
# likewise made at the first probe only and measured again at the second.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from ..core.footprint import Footprint
from ..errors import BackendError
from .footprint import FootprintSource
from .probe_log import HeldWarnings
from .result import PLAN_LOGGER, MirrorPlan

__all__ = ["max_batch", "MaxBatch", "BatchFit", "VARIANTS", "shapes_at", "search_largest"]

logger = logging.getLogger(PLAN_LOGGER)

#: The plans compared: name -> (backend, memory_budget, planner).
VARIANTS: Dict[str, Tuple[str, Any, Optional[str]]] = {
    "plain": ("mirror", None, "none"), "one-level": ("mirror", "min", None),
    "segments": ("segments", "min", None)}

ShapesLike = Union[Mapping[str, Sequence[Optional[int]]], Callable[[int], Mapping[str, Sequence[int]]]]


def shapes_at(shapes: ShapesLike, batch: int) -> Dict[str, Tuple[int, ...]]:
    """The input shapes at ``batch``: ``None`` axes replaced by it, or ``shapes(batch)``."""
    if callable(shapes):
        return {name: tuple(int(d) for d in shape) for name, shape in shapes(batch).items()}
    found = {name: tuple(batch if d is None else int(d) for d in shape) for name, shape in shapes.items()}
    if not any(None in tuple(shape) for shape in shapes.values()):
        raise ValueError("shapes must mark the batch axis with None, e.g. {'data': (None, 3, 224, 224)}, "
                         "or be a function of the batch")
    return found


@dataclass
class BatchFit:
    """The largest batch of one plan kind.

    Attributes
    ----------
    variant : str
        ``'plain'``, ``'one-level'`` or ``'segments'``.
    batch : int
        The largest batch that fits (0: none).
    footprint : Footprint or None
        Its footprint (None when no batch fits).
    overhead : float
        The plan's estimated extra compute at that batch (fraction of an iteration).
    exact : bool
        Whether the next batch was planned and found not to fit.
    estimated : bool
        Whether the footprint is extrapolated from the probes (``method='slope'``).
    steps : int
        Plans made (batches evaluated).
    error : str or None
        Why this kind cannot train the network (``backend='segments'`` on a network drawing random
        numbers without ``recompute_dropout``); ``batch`` is then 0.
    """

    variant: str
    batch: int
    footprint: Optional[Footprint]
    overhead: float
    exact: bool
    estimated: bool
    steps: int
    plan: Optional[MirrorPlan] = field(default=None, repr=False)
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe: the batch, its footprint (MB, with parts), overhead and how it was found."""
        return {"batch": self.batch, "footprint_mb": self.footprint.total if self.footprint else None,
                "footprint": self.footprint.to_dict() if self.footprint else None,
                "overhead": self.overhead, "exact": self.exact, "estimated": self.estimated,
                "steps": self.steps, "error": self.error}


@dataclass
class MaxBatch:
    """:func:`max_batch`'s answer: one :class:`BatchFit` per plan kind."""

    device_mb: float
    optimizer: str
    fits: Dict[str, BatchFit]

    def ratio(self, variant: str) -> float:
        """``variant``'s batch over the plain batch (nan when plain fits none)."""
        plain = self.fits["plain"].batch if "plain" in self.fits else 0
        return self.fits[variant].batch / plain if plain else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        """One JSON-safe object: the device, the optimizer and, per plan kind, the batch and footprint."""
        return {"device_mb": self.device_mb, "optimizer": self.optimizer,
                **{name: fit.to_dict() for name, fit in self.fits.items()}}

    def summary(self) -> str:
        """One line per plan kind."""
        lines = [f"largest batch in {self.device_mb:.0f} MB with {self.optimizer}:"]
        for name, fit in self.fits.items():
            where = (f"footprint {fit.footprint.total:.0f} MB" if fit.footprint
                     else f"not available: {fit.error}" if fit.error else "nothing fits")
            mark = " (estimated)" if fit.estimated else ("" if fit.exact else " (search not closed)")
            lines.append(f"  {name:10s} batch {fit.batch:6d}  {where}, est. overhead "
                         f"{fit.overhead:.1%}{mark}")
        return "\n".join(lines)


Evaluate = Callable[[int], Tuple[Footprint, MirrorPlan]]


def _footprint_of(plan: MirrorPlan) -> Footprint:
    """The footprint of a plan made by ``plan_mirror`` (which gives it a footprint source)."""
    footprint = plan.footprint
    if footprint is None:
        raise ValueError("max_batch evaluates plans with a footprint source (made by plan_mirror)")
    return footprint


def search_largest(evaluate: Evaluate, device_mb: float, probes: Sequence[int], limit: int,
                   max_steps: int, seen: Optional[Dict[int, Tuple[Footprint, MirrorPlan]]] = None
                   ) -> Tuple[int, Dict[int, Tuple[Footprint, MirrorPlan]], bool]:
    """The largest batch in ``[1, limit]`` whose footprint fits (NOTE [ searching for the largest
    batch ]): ``(batch, evaluated, exact)`` with every evaluated batch's footprint and plan.

    ``seen`` holds batches evaluated already: they bound the bracket and place the line as the
    probes do (and count as steps).
    """
    seen = dict(seen or {})

    def fits(batch: int) -> bool:
        if batch not in seen:
            seen[batch] = evaluate(batch)
        return seen[batch][0].total <= device_mb

    lo, hi = 0, limit + 1
    for batch in list(seen) + list(probes):
        (lo, hi) = (max(lo, batch), hi) if fits(batch) else (lo, min(hi, batch))
    streak, moved_lo = 0, None
    while hi - lo > 1 and len(seen) < max_steps:
        line = {batch: found.total for batch, (found, _) in seen.items()}
        point = _next_point(line, lo, hi, device_mb, limit, moved_lo, streak)
        side = fits(point)
        (lo, hi) = (point, hi) if side else (lo, point)
        streak, moved_lo = (streak + 1 if side == moved_lo else 1), side
    return lo, seen, hi - lo == 1 or lo == limit


def _next_point(line: Dict[int, float], lo: int, hi: int, device_mb: float, limit: int,
                moved_lo: Optional[bool], streak: int) -> int:
    """The next batch to plan inside the bracket ``(lo, hi)``: the last batch the line says fits
    (:func:`_line_boundary`), or the bracket's middle (double ``lo`` while no batch was found too
    large) when the line says nothing."""
    guess = _line_boundary(line, lo, hi, device_mb, moved_lo, 2.0 ** max(0, streak - 1))
    if guess is None:
        guess = (lo + hi) // 2 if hi <= limit else max(lo + 1, 2 * lo)
    return max(lo + 1, min(hi - 1, limit, guess))


def _line_boundary(line: Dict[int, float], lo: int, hi: int, device_mb: float, moved_lo: Optional[bool],
                   push: float) -> Optional[int]:
    """The largest batch whose total is at most ``device_mb`` on the line through the bracket's ends
    (both planned), else through its known end and the point farthest from it (MXNet's figures are
    whole MB: neighbouring batches often have the same); None without a rising line.

    ``push`` > 1 after the same end moved twice in a row (the footprint bends): the other end's
    distance from ``device_mb`` is divided by it (the Illinois rule of false position), or with
    one end open the step from the known end is multiplied by it.
    """
    if lo in line and hi in line:
        below, above = device_mb - line[lo], line[hi] - device_mb
        if moved_lo is not None:
            (below, above) = (below, above / push) if moved_lo else (below / push, above)
        if below + above <= 0:
            return None
        return int(math.floor(lo + (hi - lo) * below / (below + above)))
    end = lo if lo in line else hi
    others = [batch for batch in line if batch != end]
    if end not in line or not others:
        return None
    far = max(others, key=lambda batch: abs(batch - end))
    slope = (line[end] - line[far]) / (end - far)
    if slope <= 0:
        return None
    return int(math.floor(end + push * (device_mb - line[end]) / slope))


def _linear_guess(seen: Dict[int, Tuple[Footprint, MirrorPlan]], probes: Sequence[int], device_mb: float,
                  limit: int) -> int:
    """The batch where the line through the two probes' totals meets ``device_mb``."""
    (b1, (f1, _)), (b2, (f2, _)) = sorted((b, seen[b]) for b in probes)[:2]
    slope = (f2.total - f1.total) / (b2 - b1) if b2 != b1 else 0.0
    if slope <= 0:
        return limit
    return max(1, min(limit, int(math.floor(b1 + (device_mb - f1.total) / slope))))


def extrapolate(first: Tuple[int, Footprint], second: Tuple[int, Footprint], batch: int) -> Footprint:
    """Every part of the footprint on the line through two batches' footprints, at ``batch``."""
    (b1, f1), (b2, f2) = first, second
    parts = {}
    for name, value in f1.to_dict().items():
        if name != "total":
            parts[name] = max(0.0, value + (getattr(f2, name) - value) * (batch - b1) / (b2 - b1))
    return Footprint(**parts)


def _traced(model: Any, shapes: Optional[ShapesLike], input_shape: Optional[Sequence[Optional[int]]]
            ) -> Tuple[Any, ShapesLike, str]:
    """``(symbol, shapes, surface)`` of a symbol with its shapes, or of a Gluon block with its input shape."""
    import mxnet as mx

    if isinstance(model, mx.sym.Symbol):
        if shapes is None:
            raise ValueError("a symbol needs shapes with the batch axis as None, e.g. "
                             "{'data': (None, 3, 224, 224), 'softmax_label': (None,)}")
        return model, shapes, "module"
    if isinstance(model, mx.gluon.HybridBlock):
        if input_shape is None:
            raise ValueError("a Gluon block needs input_shape with the batch axis as None, "
                             "e.g. (None, 3, 224, 224)")
        out = model(mx.sym.var("data"))
        symbol = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
        return symbol, {"data": tuple(input_shape)}, "gluon"
    raise TypeError(f"max_batch takes an mx.sym.Symbol or a gluon.HybridBlock, got {type(model).__name__}")


def _evaluator(symbol: Any, shapes: ShapesLike, variant: str, options: Any, surface: str,
               device: Optional[str], dtypes: Optional[Mapping[str, Any]], optimizer: Any,
               optimizer_params: Any, held: Optional[HeldWarnings] = None) -> Evaluate:
    """The footprint and plan of ``variant`` at a batch (with ``held``, its warnings held back:
    NOTE [ warnings of internal probes ])."""
    from ..plan import plan_mirror

    backend, budget, planner = VARIANTS[variant]
    chosen = options.replace(backend=backend, memory_budget=budget, planner=planner or options.planner,
                             device_memory=None, segments=None, max_overhead=None)

    def evaluate(batch: int) -> Tuple[Footprint, MirrorPlan]:
        if held is not None:
            held.attach()
        inputs = [(name, shape, (dtypes or {}).get(name, "float32"))
                  for name, shape in shapes_at(shapes, batch).items()]
        plan = plan_mirror(symbol, inputs, options=chosen, optimizer=optimizer,
                           optimizer_params=optimizer_params)
        plan = plan.with_footprint(surface=surface, **({"device": device} if device else {}))
        footprint = _footprint_of(plan)
        logger.debug("max_batch %s at %d: %s", variant, batch, footprint.summary())
        return footprint, plan

    def remeasure(plan: MirrorPlan, batch: int) -> Tuple[Footprint, MirrorPlan]:
        """``plan``'s segment split measured at ``batch`` (no new search)."""
        from .candidates import measure_segments
        from .setup import PlanRequest

        if held is not None:
            held.attach()
        inputs = [(name, shape, (dtypes or {}).get(name, "float32"))
                  for name, shape in shapes_at(shapes, batch).items()]
        setup = PlanRequest(inputs).prepare(symbol, chosen)
        split, made_for = plan.segment_plan, plan.footprint_source
        assert split is not None and made_for is not None  # a segment plan evaluate() made
        shapes_now = {}
        for key in split.boundary_shapes:
            name, output = key.rsplit(":", 1)
            shapes_now[key] = tuple(setup.graph.node(name).output_shapes[int(output)])
        measured = measure_segments(setup, dataclasses.replace(split, boundary_shapes=shapes_now))
        source = FootprintSource.of_setup(setup, optimizer, optimizer_params).replace(
            device=made_for.device, surface=surface)
        again = dataclasses.replace(plan, planned_mb=measured.mb, overhead=measured.overhead,
                                    inputs=setup.input_shapes, footprint_source=source)
        return _footprint_of(again), again

    if backend != "mirror":  # a segment split to measure again at another batch
        evaluate.remeasure = remeasure  # type: ignore[attr-defined]
    return evaluate


def max_batch(model: Any, shapes: Optional[ShapesLike] = None, device_memory: Union[str, int] = "16GB", *,
              input_shape: Optional[Sequence[Optional[int]]] = None,
              dtypes: Optional[Mapping[str, Any]] = None,
              optimizer: Any = None, optimizer_params: Optional[Mapping[str, Any]] = None,
              device: Optional[str] = None, variants: Sequence[str] = tuple(VARIANTS), method: str = "search",
              probes: Tuple[int, int] = (8, 16), limit: int = 1 << 16, max_steps: int = 16,
              options: Any = None, **overrides: Any) -> MaxBatch:
    """The largest batch whose whole footprint fits ``device_memory``: plain, one-level and segments.

    Parameters
    ----------
    model : mx.sym.Symbol or gluon.HybridBlock
        The training symbol (loss included), or a Gluon block (its outputs' head gradients counted).
    shapes : mapping or callable, optional
        For a symbol: every input's shape with ``None`` on the batch axis (``{'data': (None, 3, 224,
        224), 'softmax_label': (None,)}``), or a function of the batch returning the shapes.
    device_memory : str or int
        The device's memory (``'16GB'``, bytes).
    input_shape : sequence, optional
        For a Gluon block: its input's shape with ``None`` on the batch axis.
    dtypes : mapping, optional
        Input dtypes (float32 where not given).
    optimizer, optimizer_params : optional
        The optimizer whose state is counted (default: SGD with momentum 0.9, said to be assumed).
    device : str, optional
        ``'cpu'`` or ``'gpu'``: the device whose memory is counted (default: where plans are measured).
    variants : sequence of str
        Among ``'plain'``, ``'one-level'`` (``backend='mirror'``, ``'min'``) and ``'segments'``
        (``backend='segments'``, ``'min'``).
    method : str
        ``'search'`` (plans at real batches) or ``'slope'`` (plans at ``probes`` and extrapolates;
        NOTE [ searching for the largest batch ]).
    probes : (int, int)
        The first two batches planned.
    limit : int
        The largest batch considered.
    max_steps : int
        At most this many batches planned per variant.
    options, **overrides
        Mirror options (``recompute_dropout``, ``cache_dir``...) as for ``plan_mirror``.

    Returns
    -------
    MaxBatch
    """
    from ..options import MirrorOptions

    if method not in ("search", "slope"):
        raise ValueError(f"method must be 'search' or 'slope', got {method!r}")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose among {list(VARIANTS)}")
    options = MirrorOptions.coerce(options, **overrides)
    device_mb = MirrorOptions(device_memory=device_memory).device_memory_mb
    assert device_mb is not None  # device_memory is given
    symbol, shapes, surface = _traced(model, shapes, input_shape)
    fits: Dict[str, BatchFit] = {}
    label = None
    with HeldWarnings("max_batch's probes", logger) as held:
        for variant in variants:
            evaluate = _evaluator(symbol, shapes, variant, options, surface, device, dtypes, optimizer,
                                  optimizer_params, held)
            try:
                fits[variant] = _fit(variant, evaluate, device_mb, tuple(probes), limit, max_steps, method)
            except BackendError as error:  # this kind cannot train the network: say why, go on
                fits[variant] = BatchFit(variant, 0, None, 0.0, False, False, 0, error=str(error))
            plan = fits[variant].plan
            label = label or (plan.optimizer_label if plan is not None else None)
            logger.info("max_batch %s: batch %d (%d plans)", variant, fits[variant].batch,
                        fits[variant].steps)
    return MaxBatch(device_mb, label or "", fits)


def _remeasured(variant: str, evaluate: Evaluate, made_at: int, plan: MirrorPlan,
                batch: int) -> Optional[Tuple[Footprint, MirrorPlan]]:
    """``plan``'s segment split (made at ``made_at``) measured at ``batch``; None when ``plan`` has
    no split or the split does not carry over (said in a warning: the caller plans there)."""
    remeasure = getattr(evaluate, "remeasure", None)
    if remeasure is None or plan.segment_plan is None:
        return None
    try:
        return remeasure(plan, batch)
    except Exception as error:  # a split that does not carry over: plan the probe too
        logger.warning("max_batch %s: the segment plan made at batch %d could not be measured at "
                       "%d (%s); planning there too", variant, made_at, batch, error)
        return None


def _search(variant: str, evaluate: Evaluate, device_mb: float, probes: Sequence[int], limit: int,
            max_steps: int) -> Tuple[int, Dict[int, Tuple[Footprint, MirrorPlan]], bool]:
    """:func:`search_largest`; for the segment kind, planned at the first probe and then where the
    first probe's split, measured at other batches, says the bracket is (NOTE [ searching for the
    largest batch ])."""
    if getattr(evaluate, "remeasure", None) is None:
        return search_largest(evaluate, device_mb, probes, limit, max_steps)
    first = min(probes)
    seen = {first: evaluate(first)}
    guess = _split_boundary(variant, evaluate, device_mb, seen, probes, limit, max_steps)
    if guess is None:
        return search_largest(evaluate, device_mb, probes, limit, max_steps, seen)
    starts = [batch for batch in (guess, guess + 1) if 1 <= batch <= limit]
    return search_largest(evaluate, device_mb, starts, limit, max_steps, seen)


class _NoEstimate(Exception):
    """The first probe's split could not be measured at another batch."""


def _split_boundary(variant: str, evaluate: Evaluate, device_mb: float,
                    seen: Dict[int, Tuple[Footprint, MirrorPlan]], probes: Sequence[int], limit: int,
                    max_steps: int) -> Optional[int]:
    """The largest batch at which the split planned at the one batch in ``seen``, measured there,
    fits (the same search, on measurements instead of plans); None when it cannot be measured."""
    (made_at, (_, plan)), = seen.items()

    def measured(batch: int) -> Tuple[Footprint, MirrorPlan]:
        found = _remeasured(variant, evaluate, made_at, plan, batch)
        if found is None:
            raise _NoEstimate
        return found

    try:
        batch, _, _ = search_largest(measured, device_mb, probes, limit, max_steps, seen)
    except _NoEstimate:
        return None
    return batch


def _fit(variant: str, evaluate: Evaluate, device_mb: float, probes: Sequence[int], limit: int,
         max_steps: int, method: str) -> BatchFit:
    """One variant's :class:`BatchFit`."""
    if method == "search":
        batch, seen, exact = _search(variant, evaluate, device_mb, probes, limit, max_steps)
        found, plan = seen[batch] if batch else (None, None)
        if plan is None:  # nothing fits: the overhead of the smallest batch planned
            plan = seen[min(seen)][1]
        return BatchFit(variant, batch, found, plan.overhead, exact, False, len(seen), plan)
    first, second = sorted(probes)[:2]
    seen = {first: evaluate(first)}
    seen[second] = _remeasured(variant, evaluate, first, seen[first][1], second) or evaluate(second)
    batch = _linear_guess(seen, probes, device_mb, limit)
    ends = (first, seen[first][0]), (second, seen[second][0])
    found = extrapolate(*ends, batch)
    while batch > 0 and found.total > device_mb:  # the floor of the line can round over by a part
        batch -= 1
        found = extrapolate(*ends, batch)
    plan = seen[max(probes)][1]
    return BatchFit(variant, batch, found if batch else None, plan.overhead, False, True, len(seen), plan)
