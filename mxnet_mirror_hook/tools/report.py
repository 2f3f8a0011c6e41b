"""``mxnet-mirror report``: a picture of live memory along one iteration, baseline against plan."""
from __future__ import annotations

import logging
from typing import List, Sequence

from ..core.graph import Graph
from ..core.timeline import simulate_timeline
from ..core.units import MB
from ..plan import MirrorPlan

__all__ = ["draw_report"]

logger = logging.getLogger(__name__)


def draw_report(graph: Graph, plan: MirrorPlan, title: str, path: str) -> None:
    """Draw baseline and planned live memory and save a PNG to ``path``.

    The curves come from the liveness model (:mod:`~mxnet_mirror_hook.core.timeline`:
    only outputs some gradient reads live until backward); MXNet reports only
    its total, which is in the legend and the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = simulate_timeline(graph, frozenset())
    planned = simulate_timeline(graph, frozenset(plan.mirrored))
    figure, axis = plt.subplots(figsize=(11, 5.5), dpi=110)
    scale = MB
    # One time axis: the plan's steps.  A baseline step is drawn where the same
    # forward or backward step of the plan happens; it stays flat while the
    # plan replays a segment.
    total = max(len(planned) - 1, 1)
    position = {(p.phase, p.node): p.step / total * 100 for p in planned if p.phase != "recompute"}
    axis.step([position[(p.phase, p.node)] for p in baseline],
              [p.live_bytes / scale for p in baseline], where="post", color="#888888",
              linewidth=1.6, label=f"without mirroring (MXNet plan: {plan.baseline_mb:.0f} MB)")
    x = [p.step / total * 100 for p in planned]
    axis.step(x, [p.live_bytes / scale for p in planned], where="post", color="#1f6fb4",
              linewidth=1.6, label=f"with the plan (MXNet plan: {plan.planned_mb:.0f} MB)")
    recompute = [i for i, p in enumerate(planned) if p.phase == "recompute"]
    _shade_runs(axis, recompute, x, "#f2a541", "recomputed segments")
    boundary = next((x[i] for i, p in enumerate(planned) if p.phase != "forward"), 100.0)
    axis.axvline(boundary, color="#444444", linestyle=":", linewidth=1)
    axis.text(boundary / 2, 0.02, "forward", ha="center", va="bottom",
              transform=axis.get_xaxis_transform())
    axis.text((boundary + 100) / 2, 0.02, "backward", ha="center", va="bottom",
              transform=axis.get_xaxis_transform())
    axis.set_xlim(0, 100)
    axis.set_xlabel("progress through one training iteration (%)")
    axis.set_ylabel("live activations (MB, liveness model)")
    axis.set_ylim(bottom=0)
    axis.set_title(f"{title}: {plan.baseline_mb:.0f} -> {plan.planned_mb:.0f} MB "
                   f"({plan.ratio:.2f}x), {len(plan.mirrored)} nodes recomputed, "
                   f"est. overhead {plan.overhead:.0%}")
    axis.legend(loc="upper right", title="curves: liveness model (outputs backward reads); "
                "totals: MXNet's plan", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    logger.info("wrote %s", path)


def _shade_runs(axis, indices: List[int], x: Sequence[float], color: str, label: str) -> None:
    """Shade each run of consecutive indices (one label for all)."""
    if not indices:
        return
    runs, start = [], indices[0]
    for previous, current in zip(indices, indices[1:]):
        if current != previous + 1:
            runs.append((start, previous))
            start = current
    runs.append((start, indices[-1]))
    for number, (first, last) in enumerate(runs):
        axis.axvspan(x[first], x[min(last + 1, len(x) - 1)], color=color, alpha=0.35,
                     label=label if number == 0 else None, linewidth=0)
