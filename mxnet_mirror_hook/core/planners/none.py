"""The pass-through planner: never mirrors anything."""
from __future__ import annotations

from .registry import register_planner
from .base import Planner

__all__ = ["NonePlanner"]


@register_planner("none")
class NonePlanner(Planner):
    """Measures the unmirrored graph and keeps it."""

    name = "none"
