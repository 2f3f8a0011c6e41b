"""Planners, registered by name (:mod:`.registry`).

Every planner has one entry point, :meth:`~.base.Planner.plan`, with the same
signature: the forward graph, a parsed budget, and a
:class:`~.base.Measurement` (what a planner may ask of the measuring side).
Importing this package registers the built-in planners: ``none``,
``memonger`` (the seed's search on user marks), ``frontier``, ``selective``,
``dp`` (cut-set dynamic programs) and ``auto`` (the default, which combines
them; :mod:`.auto`).
"""
from __future__ import annotations

from . import auto, dp, frontier, memonger, none, selective  # noqa: F401  (registration)
from .base import (Candidate, Decision, Measurement, MeasureFn, Planner, PlanOutcome,
                   as_measurement, select_candidate)
from .registry import _REGISTRY, get_planner, list_planners, register_planner  # noqa: F401

__all__ = ["Candidate", "Decision", "Measurement", "MeasureFn", "Planner", "PlanOutcome",
           "as_measurement", "select_candidate", "register_planner", "get_planner", "list_planners"]
