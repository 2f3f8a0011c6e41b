"""``mxnet-mirror report --measured``: measured memory along one training iteration, plain against
the plan, over the predicted footprint's parts (as PyTorch's memory viewer shows its users)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from ..core.footprint import Footprint
from ..mx.profile import END, PHASES, MemoryTimeline

__all__ = ["MeasuredReport", "measure_report", "draw_measured_report", "write_measured_report",
           "split_inputs", "aligned_positions", "BAND_PARTS", "PHASE_WIDTHS"]

logger = logging.getLogger(__name__)

#: The footprint's parts beside the activations, bottom to top as the bands are stacked (about
#: the order a Module allocates them: bind, init_params, the batch, temporary space, update).
BAND_PARTS: Tuple[Tuple[str, str, str], ...] = (
    ("parameters", "parameters", "#c6dbef"),
    ("gradients", "gradients", "#9ecae1"),
    ("auxiliary", "auxiliary states", "#6baed6"),
    ("inputs", "inputs (executor + batch)", "#c7e9c0"),
    ("parameter_copies", "Module's parameter copies", "#dadaeb"),
    ("head_gradients", "head gradients", "#fdd0a2"),
    ("workspace", "temporary workspace", "#fcbba1"),
    ("mkldnn_copies", "MKLDNN reorder buffers", "#fc9272"),
    ("optimizer_state", "optimizer state", "#fee391"),
)
# NOTE [ an axis of phases ]
# The two runs differ in time (recomputation; the first bind of a process also loads
# libraries) and in storage events (a mirrored backward allocates what it recomputes), so
# neither time nor event count lines them up.  PyTorch's memory timeline counts events, not
# time; here each phase gets a fixed share of the axis (forward and backward, where the two
# runs differ, the widest) and its events spread evenly within it, so "at the start of
# backward" is one x for both runs.  Widths are relative, in PHASES order.
PHASE_WIDTHS = (1.0, 1.0, 3.0, 3.0, 1.0)
#: SGD with momentum: the optimizer of the profiled iteration and of its footprint.
OPTIMIZER, OPTIMIZER_PARAMS = "sgd", {"learning_rate": 0.01, "momentum": 0.9}


@dataclass(frozen=True)
class MeasuredReport:
    """Both profiled runs and their predicted footprints."""

    plain: MemoryTimeline
    mirrored: MemoryTimeline
    plain_footprint: Footprint
    mirrored_footprint: Footprint

    @property
    def ratio(self) -> float:
        """Mirrored peak over plain peak."""
        return self.mirrored.peak_mb / self.plain.peak_mb if self.plain.peak_mb else float("nan")


def measure_report(symbol: Any, data: Sequence[Tuple[str, Tuple[int, ...]]],
                   labels: Sequence[Tuple[str, Tuple[int, ...]]], plan: Any, options: Any) -> MeasuredReport:
    """Profile one iteration plain and one with ``plan`` (made with ``options``; each in a fresh
    subprocess) and predict both footprints (:func:`~mxnet_mirror_hook.mx.footprint.symbol_footprint`)."""
    from ..mx.footprint import symbol_footprint
    from ..mx.profile import profile_iteration

    plain = profile_iteration(symbol, data, labels, optimizer=OPTIMIZER, optimizer_params=OPTIMIZER_PARAMS)
    mirrored = profile_iteration(symbol, data, labels, options=options, optimizer=OPTIMIZER,
                                 optimizer_params=OPTIMIZER_PARAMS)
    shapes = dict(list(data) + list(labels))
    common: Dict[str, Any] = dict(input_names=list(shapes), optimizer=OPTIMIZER,
                                  optimizer_params=OPTIMIZER_PARAMS)
    plain_footprint = symbol_footprint(symbol, shapes, activations_mb=plain.planned_mb or plan.baseline_mb,
                                       **common)
    mirrored_footprint = symbol_footprint(symbol, shapes, activations_mb=plan.planned_mb,
                                          executors=getattr(plan, "segment_count", 1) or 1, **common)
    return MeasuredReport(plain, mirrored, plain_footprint, mirrored_footprint)


def aligned_positions(timelines: Sequence[MemoryTimeline]
                      ) -> Tuple[List[List[float]], List[Tuple[str, float]]]:
    """X positions of every timeline's events on one axis whose phases line up.

    Each phase (:data:`~mxnet_mirror_hook.mx.profile.PHASES`) takes its share of the axis
    (:data:`PHASE_WIDTHS`, NOTE [ an axis of phases ]), and a timeline's storage events in
    that phase spread evenly across it.  Returns the positions and the phases' ``(name,
    start)``, closed by ``('end', total width)``.
    """
    offsets = [float(sum(PHASE_WIDTHS[:k])) for k in range(len(PHASES) + 1)]
    positions = []
    for timeline in timelines:
        starts = [t for name, t in timeline.phases if name in PHASES]
        found = [max(0, sum(1 for s in starts if s <= t) - 1) for t in timeline.times_ms]
        counts: Dict[int, int] = {k: found.count(k) for k in range(len(PHASES))}
        seen: Dict[int, int] = {}
        xs = []
        for k in found:
            rank = seen.get(k, 0)
            seen[k] = rank + 1
            xs.append(offsets[k] + rank * PHASE_WIDTHS[k] / counts[k])
        positions.append(xs)
    return positions, list(zip(PHASES, offsets)) + [(END, offsets[-1])]


def _draw_bands(axis: Any, footprint: Footprint, width: float) -> float:
    """Stack the footprint's parts beside the activations as bands; their top (MB)."""
    bottom = 0.0
    for name, label, color in BAND_PARTS:
        value = getattr(footprint, name)
        if value < 0.005 * max(footprint.total, 1e-9):
            continue
        axis.fill_between([0, width], bottom, bottom + value, color=color, alpha=0.55, linewidth=0,
                          label=f"{label} {value:.0f} MB")
        bottom += value
    return bottom


def _draw_run(axis: Any, timeline: MemoryTimeline, xs: Sequence[float], width: float, color: str,
              footprint: Footprint, name: str) -> None:
    """One measured curve, its peak marked, and its predicted total as a dashed line."""
    last = timeline.mb[-1] if timeline.mb else 0.0
    axis.step([0.0] + list(xs) + [width], [0.0] + list(timeline.mb) + [last], where="post",
              color=color, linewidth=1.8,
              label=f"{name}: measured, peak {timeline.peak_mb:.0f} MB")
    if timeline.mb:
        at = xs[timeline.mb.index(timeline.peak_mb)]
        axis.plot([at], [timeline.peak_mb], "o", color=color, markersize=6)
    axis.axhline(footprint.total, color=color, linestyle="--", linewidth=1.1,
                 label=f"{name}: predicted footprint {footprint.total:.0f} MB "
                 f"(activations {footprint.activations:.0f})")


def draw_measured_report(report: MeasuredReport, title: str, path: str) -> None:
    """Draw the measured memory of both runs over the footprint's parts and save a PNG to ``path``.

    The x axis counts storage events, phases aligned (:func:`aligned_positions`); the bands are
    the plain footprint's parts beside the activations, the dashed lines each run's predicted
    total, the solid lines the storage profiler's running total.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (plain_x, mirrored_x), phases = aligned_positions([report.plain, report.mirrored])
    width = phases[-1][1]
    figure, axis = plt.subplots(figsize=(11, 6), dpi=110)
    _draw_bands(axis, report.plain_footprint, width)
    _draw_run(axis, report.plain, plain_x, width, "#555555", report.plain_footprint, "plain")
    _draw_run(axis, report.mirrored, mirrored_x, width, "#1f6fb4", report.mirrored_footprint, "mirrored")
    for name, start in phases[:-1]:
        axis.axvline(start, color="#444444", linestyle=":", linewidth=0.8)
        axis.text(start + width * 0.005, 0.985, name, ha="left", va="top", fontsize=9,
                  transform=axis.get_xaxis_transform())
    top = max(report.plain.peak_mb, report.mirrored.peak_mb, report.plain_footprint.total,
              report.mirrored_footprint.total)
    axis.set_xlim(0, width)
    axis.set_ylim(0, top * 1.12)
    axis.set_xticks([])
    axis.set_xlabel("one training iteration: storage events in order, each phase over its share of the axis")
    axis.set_ylabel("NDArray storage on cpu/0 (MB, MXNet's storage profiler)")
    axis.set_title(f"{title}: measured peak {report.plain.peak_mb:.0f} -> {report.mirrored.peak_mb:.0f} MB "
                   f"({report.ratio:.2f}x); activations planned {report.plain_footprint.activations:.0f} -> "
                   f"{report.mirrored_footprint.activations:.0f} MB", fontsize=11)
    axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8.5, frameon=False,
                title="bands: predicted footprint's parts (plain)")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    logger.info("wrote %s", path)


def split_inputs(shapes: Sequence[Tuple[str, Tuple[int, ...]]]
                 ) -> Tuple[List[Tuple[str, Tuple[int, ...]]], List[Tuple[str, Tuple[int, ...]]]]:
    """``(data, labels)`` of the command line's ``--shape`` list: names ending in ``label`` are
    labels (MXNet's convention, ``softmax_label``), the rest data."""
    labels = [(n, tuple(s)) for n, s in shapes if n.endswith("label")]
    return [(n, tuple(s)) for n, s in shapes if not n.endswith("label")], labels


def write_measured_report(symbol: Any, shapes: Sequence[Tuple[str, Tuple[int, ...]]], plan: Any,
                          options: Any, title: str, path: str) -> MeasuredReport:
    """Profile both runs (:func:`measure_report`) and draw them to ``path``; the report."""
    data, labels = split_inputs(shapes)
    report = measure_report(symbol, data, labels, plan, options)
    draw_measured_report(report, title, path)
    return report
