"""The candidate decisions ``auto`` considers, built once per plan (pure functions of the graph)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ...graph import Graph
from ...units import MB_SHIFT
from ..base import Decision
from ..dp import (LEAST_MEMORY_VARIANTS, WIDE_FRONTIER_VARIANTS, least_compute_decisions,
                  least_memory_decisions, least_memory_within_overhead, prefix_within_overhead)
from ..frontier import frontier_decisions
from ..memonger import search_thresholds, threshold_plan, user_stages
from ..selective import selective_decisions

__all__ = ["auto_stages", "unit_shift_for", "CandidateSets", "SWEEP_FRACTIONS",
           "MODELLED_LEAST_MEMORY_VARIANTS"]

#: Modelled memory levels (fractions of the unmirrored model) of the least-compute
#: sweep, run when the budget is a fixed limit.
SWEEP_FRACTIONS = (0.3, 0.45, 0.6, 0.75, 0.9)
#: Least-memory programs scored on the allocator model (the search starts from the best
#: candidate, so fewer variants are needed than when each is bound; these two were the
#: best starts on the bench networks).
MODELLED_LEAST_MEMORY_VARIANTS = ((1, 0.5), (2, 0.0))


def auto_stages(graph: Graph) -> Dict[str, str]:
    """Stage marks for ``graph``: the user's if any, else one stage per cut point."""
    marks = user_stages(graph)
    if marks:
        return marks
    return {name: "True" for name in graph.cut_points()}


def unit_shift_for(graph: Graph) -> int:
    """Threshold unit: MB as in the seed, KB for graphs under 256 MB of activations.

    With MB steps a small graph's thresholds all round to 0 and the search
    degenerates to "keep every stage".
    """
    total = sum(n.planned_bytes for n in graph.op_nodes)
    return MB_SHIFT if total >= (256 << MB_SHIFT) else 10


@dataclass
class CandidateSets:
    """The families of candidate decisions for one graph, each computed at most once.

    Parameters
    ----------
    graph : Graph
        The forward graph.
    ntrial : int
        Thresholds of the seed's grid.
    refine_steps : int
        Extra thresholds between the best grid threshold's neighbours.
    max_frontier : int
        Most tensors crossing a cut in the fallback families.
    """

    graph: Graph
    ntrial: int = 6
    refine_steps: int = 2
    max_frontier: int = 8
    stages: Dict[str, str] = field(init=False)
    _grid: Optional[List[Tuple[int, Decision]]] = field(default=None, init=False, repr=False)
    _fallback: Optional[List[Decision]] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.stages = auto_stages(self.graph)
        self.unit_shift = unit_shift_for(self.graph)
        self.unit = "MB" if self.unit_shift == MB_SHIFT else "KB"

    def grid(self) -> List[Tuple[int, Decision]]:
        """The seed's thresholds over the stages and their decisions (empty without stages)."""
        if self._grid is None:
            self._grid = [] if not self.stages else [
                (t, Decision(r.mirrored, f"threshold={t}{self.unit}"))
                for t, r in search_thresholds(self.graph, self.stages, self.ntrial,
                                              unit_shift=self.unit_shift)]
        return self._grid

    def refined(self, score: Callable[[Decision], float]) -> List[Decision]:
        """The grid's decisions, then ``refine_steps`` thresholds around its best by ``score``."""
        grid = self.grid()
        decisions = [d for _, d in grid]
        if not grid:
            return decisions
        values = {t: score(d) for t, d in grid}
        thresholds = sorted(values)
        best_threshold = min(thresholds, key=lambda t: (values[t], t))
        position = thresholds.index(best_threshold)
        low = thresholds[position - 1] if position > 0 else max(best_threshold // 2, 0)
        high = thresholds[position + 1] if position + 1 < len(thresholds) else best_threshold * 2 + 1
        for k in range(1, self.refine_steps + 1):
            threshold = low + (high - low) * k // (self.refine_steps + 1)
            if threshold not in values:
                result = threshold_plan(self.graph, threshold << self.unit_shift, self.stages)
                decisions.append(Decision(result.mirrored,
                                          f"threshold={threshold}{self.unit}(refined)"))
        return decisions

    def least_memory(self, variants: Sequence[Tuple[int, float]] = LEAST_MEMORY_VARIANTS,
                     ) -> List[Decision]:
        """The least-memory cut-set programs (NOTE [ the cut-set chain ] in dp.py)."""
        return least_memory_decisions(self.graph, variants)

    def sweep(self) -> List[Decision]:
        """The least-compute programs at :data:`SWEEP_FRACTIONS` of the modelled memory."""
        return least_compute_decisions(self.graph, SWEEP_FRACTIONS)

    def within_overhead(self, max_overhead: float) -> List[Decision]:
        """The least-compute programs at the least modelled memory within ``max_overhead``, and the
        longest prefix of the forward order within it."""
        return (least_memory_within_overhead(self.graph, max_overhead)
                + prefix_within_overhead(self.graph, max_overhead))

    def selective(self) -> List[Decision]:
        """MXNet's own ``DO_MIRROR`` rule: keep expensive outputs, recompute cheap ones."""
        return selective_decisions(self.graph)

    def wide_cuts(self) -> List[Decision]:
        """The least-memory programs with cuts where several tensors cross, and the seed's
        heuristic over such cuts (NOTE [ frontier cuts ] in frontier.py)."""
        return (least_memory_decisions(self.graph, WIDE_FRONTIER_VARIANTS)
                + frontier_decisions(self.graph, self.max_frontier, self.ntrial))

    def fallback(self) -> List[Decision]:
        """Decisions for graphs single-node cuts barely shrink (unrolled RNNs, long skips):
        :meth:`selective`, then :meth:`wide_cuts`."""
        if self._fallback is None:
            self._fallback = self.selective() + self.wide_cuts()
        return self._fallback
