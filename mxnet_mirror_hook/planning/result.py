"""The result of planning: :class:`MirrorPlan` (re-exported by :mod:`mxnet_mirror_hook.plan`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..core.footprint import Footprint
from ..core.segments import SegmentPlan
from .footprint import FootprintSource

__all__ = ["MirrorPlan", "PLAN_LOGGER"]

# NOTE [ one logger for planning ]
# Planning logs under ``mxnet_mirror_hook.plan`` from every module of this package: users
# set that logger's level to see or silence plan summaries, and the runner's lines
# ("INFO mxnet_mirror_hook.plan: mirror plan [...]") are read by scripts.  The package
# split the code, not the name.
PLAN_LOGGER = "mxnet_mirror_hook.plan"


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
    fallback : str or None
        With ``backend='auto'``: what failed on the segment path when the one-level plan was
        used because of it (NOTE [ the segment path falls back ] in :mod:`.segments`).
    outside_plan_mb : float
        MB the plan's own operators allocate outside MXNet's static plan: the fused core
        attention's temporaries (one pass at a time) and kept dropout masks (NOTE [ what the core
        attention operator allocates ] in mx/attention.py); 0 for other plans.
    footprint_source : FootprintSource or None
        What :attr:`footprint` is computed from (set by ``plan_mirror``; None for a plan made
        otherwise).
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
    fallback: Optional[str] = None
    outside_plan_mb: float = 0.0
    footprint_source: Optional[FootprintSource] = field(default=None, repr=False, compare=False)

    @property
    def footprint(self) -> Optional[Footprint]:
        """The whole training footprint on the device (:class:`~mxnet_mirror_hook.core.footprint.Footprint`,
        MB): parameters, gradients, optimizer state, auxiliary states, inputs, workspace and this
        plan's activations (the segment plan's figure for executor segments, with MKLDNN's copies
        at the cuts on the CPU: NOTE [ MKLDNN copies at the cuts ] in planning/chain_footprint.py);
        computed on first use.  The optimizer is the one a surface passed, else SGD with momentum
        0.9, said by :attr:`optimizer_label` (NOTE [ the optimizer a footprint assumes ] in
        planning/footprint.py).  None when the plan was not made by ``plan_mirror``.
        """
        if self.footprint_source is None:
            return None
        from .chain_footprint import segment_footprint  # MKLDNN's copies at a chain's cuts

        found = segment_footprint(self.footprint_source, self.planned_mb, self.segment_plan)
        if self.outside_plan_mb:
            found = dataclasses.replace(found, fused_space=self.outside_plan_mb)
        return found

    @property
    def activation_mb(self) -> float:
        """:attr:`planned_mb` and :attr:`outside_plan_mb`: the activations' figure to compare plans by."""
        return self.planned_mb + self.outside_plan_mb

    @property
    def optimizer_label(self) -> Optional[str]:
        """The optimizer :attr:`footprint` counts, in words (``'... (assumed)'`` when none was given)."""
        return self.footprint_source.optimizer_label if self.footprint_source is not None else None

    def with_footprint(self, **changes: Any) -> "MirrorPlan":
        """This plan with its footprint source changed (``optimizer``, ``optimizer_params``,
        ``device``, ``surface``); the plan itself is the same."""
        if self.footprint_source is None:
            raise ValueError("this plan has no footprint source (it was not made by plan_mirror)")
        return dataclasses.replace(self, footprint_source=self.footprint_source.replace(**changes))

    @property
    def segment_count(self) -> int:
        """Number of executor segments (1 for the one-level mirror)."""
        return self.segment_plan.count if self.segment_plan is not None else 1

    @property
    def ratio(self) -> float:
        """:attr:`activation_mb` over ``baseline_mb``: MXNet's plan and what fused operators hold
        outside it, against the unmirrored plan (1.0 when nothing was saved)."""
        return self.activation_mb / self.baseline_mb if self.baseline_mb else 1.0

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
            "fallback": self.fallback, "outside_plan_mb": self.outside_plan_mb,
            "footprint": footprint.to_dict() if (footprint := self.footprint) is not None else None,
            "optimizer": self.optimizer_label,
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
                + (f"+{self.outside_plan_mb:.0f} MB outside MXNet's plan, " if self.outside_plan_mb else "")
                + self._footprint_words() +
                f"{len(self.mirrored)} recomputed / {self.kept_count} kept, est. overhead "
                f"{self.overhead:.1%}, {'cached' if self.from_cache else 'planned'} in "
                f"{self.planning_seconds:.2f} s"
                + (f" (segments failed: {self.fallback}; one-level plan used)" if self.fallback else ""))

    def _footprint_words(self) -> str:
        """``'whole footprint N MB with <optimizer>, '``, beside the activation figure ('' without
        a source)."""
        try:
            footprint = self.footprint
        except ValueError as error:  # an optimizer the model does not know: the line still logs
            return f"whole footprint unknown ({error}), "
        if footprint is None:
            return ""
        return f"whole footprint {footprint.total:.0f} MB with {self.optimizer_label}, "

    def __repr__(self) -> str:
        return f"<MirrorPlan {self.summary()}>"
