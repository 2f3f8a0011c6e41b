"""The planning core: pure Python, never imports MXNet (a test holds this).

It holds the forward graph (:mod:`.graph`), the recomputation cost model
(:mod:`.cost`), memory budgets (:mod:`.budget`), units (:mod:`.units`) and the
planners (:mod:`.planners`), which only ever see a :class:`~.graph.Graph` and a
:class:`~.planners.Measurement`.

Three memory models, each for one job (MXNet's bind has the last word on every
plan: its measured MB decides and is what users see):

* :mod:`.liveness` -- which forward outputs the backward pass reads (MXNet 1.9's
  gradient rules, NOTE [ what backward keeps ]).  The model of the cut-set
  dynamic programs (:mod:`.planners.dp`): cheap, within ~15% of MXNet on the
  unmirrored plan, blind to the allocator's fragmentation.
* :mod:`.timeline` -- live bytes step by step through one iteration on the
  liveness rules, with recomputed segments replayed: what ``mxnet-mirror
  report`` draws.  A picture, not used for choosing.
* :mod:`.allocator` -- an exact replay of nnvm's greedy allocator on MXNet's
  executed graph captured from one bind (NOTE [ replaying MXNet's memory plan
  ]): MXNet's figure to the MB in milliseconds.  ``auto`` ranks its candidates
  and searches on it for ``'min'`` and the default budget.

The planners' unit tests use a fourth, coarser stand-in for MXNet's measurement
(``tests/graphs.py``: kept outputs plus the largest replayed segment, after
Chen et al.), so that they run without MXNet.
"""
from .budget import Budget, parse_budget
from .graph import Graph, Node, NodeKind
from .planners import Candidate, Decision, get_planner, list_planners, register_planner

__all__ = ["Graph", "Node", "NodeKind", "Budget", "parse_budget", "Decision", "Candidate",
           "get_planner", "list_planners", "register_planner"]
