"""The planning core: pure Python, never imports MXNet.

It holds the forward graph (:mod:`.graph`), the recomputation cost model
(:mod:`.cost`), memory budgets (:mod:`.budget`) and the planners
(:mod:`.planners`), which only ever see a :class:`~.graph.Graph` and a
measurement callback.
"""
from .graph import Graph, Node, NodeKind
from .budget import Budget, parse_budget
from .planners import Decision, Candidate, get_planner, list_planners, register_planner

__all__ = ["Graph", "Node", "NodeKind", "Budget", "parse_budget", "Decision", "Candidate",
           "get_planner", "list_planners", "register_planner"]
