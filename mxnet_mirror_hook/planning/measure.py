"""The planners' measurement callback: a decision bound by MXNet, its planned MB."""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence

import mxnet as mx

from .. import env
from ..core.allocator import ExecutedGraph
from ..core.planners.base import NullProgress
from ..errors import MeasurementError
from ..mx.apply import MirrorTemplate
from ..mx.measure import executed_graph, measures_in_process, planned_mb_many, start_executed_graph
from .result import PLAN_LOGGER

__all__ = ["BindMeasure"]

logger = logging.getLogger(PLAN_LOGGER)


class BindMeasure:
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
        self._ahead: Optional["Future[ExecutedGraph]"] = None

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

    def capture_ahead(self) -> None:
        """Start capturing the executed graph :meth:`executed_graph` will return (NOTE
        [ captures asked for ahead ] in mx/measure.py); nothing for a symbol bound here."""
        text = self.template.build_json(frozenset())
        if self._ahead is None and not measures_in_process(text):
            self._ahead = start_executed_graph(text, self.context, self.shapes, self.types, self.requests)

    def executed_graph(self) -> Optional[ExecutedGraph]:
        text = self.template.build_json(frozenset())
        if measures_in_process(text):
            logger.info("binding in this process (Custom operators or %s=inprocess): no allocator "
                        "model, every plan is bound", env.MEASURE)
            return None
        self.progress.phase("capturing MXNet's executed graph")
        ahead, self._ahead = self._ahead, None
        try:
            graph = (ahead.result() if ahead is not None else
                     executed_graph(text, self.context, self.shapes, self.types, self.requests))
        except MeasurementError as error:
            logger.warning("no allocator model for this symbol (%s); every plan is bound", error)
            return None
        if graph.measured_mb is not None:
            self._known[frozenset()] = graph.measured_mb
        return graph
