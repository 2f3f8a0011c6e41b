"""The environment variables a segment is bound and measured under: the gradient-sum cap and
its match range."""
from __future__ import annotations

from typing import Dict, Optional

from ... import env
from ...core.segments.plan import DEFAULT_GRAD_SUM_CAP

__all__ = ["GRAD_SUM_CAP_ENV", "DEFAULT_GRAD_SUM_CAP", "cap_variables", "match_range_variables"]


# NOTE [ the gradient-sum cap is read once per process ]
# MXNET_EXEC_INPLACE_GRAD_SUM_CAP (gradients of a tensor with at least this many
# consumers are summed in place instead of by one ElementWiseSum) lowers the plan
# of short RNN segments a lot (bench LSTM, 20 segments: 102 MB at the default 8,
# 55 MB at 2).  MXNet 1.9.1 reads it into a function-level ``static`` the first
# time any gradient graph is built in the process (AggregateGradient in
# src/nnvm/gradient.cc), so setting it around the chain's binds only takes effect
# when they are the first in-process binds (planning binds run in worker
# processes), and then it also holds for every later bind of the process.  The
# segment figures are measured in a capture worker started with the cap
# (``get_capture_worker(variables)``), i.e. as the chain plans when the cap took
# effect; with per-reader variables (NOTE [ one variable per reader ]) weights no
# longer sum inside a segment and the cap matters less (bench LSTM, 14 segments:
# 24.6 MB with and without it).  The benchmark sets it before MXNet builds any graph.
GRAD_SUM_CAP_ENV = "MXNET_EXEC_INPLACE_GRAD_SUM_CAP"


def cap_variables(grad_sum_cap: Optional[int]) -> Dict[str, str]:
    """The environment segments are bound and measured under for the gradient-sum cap (None:
    MXNet's default; NOTE [ the gradient-sum cap is read once per process ])."""
    return {GRAD_SUM_CAP_ENV: str(grad_sum_cap)} if grad_sum_cap else {}


def match_range_variables(match_range: int) -> Dict[str, str]:
    """The environment a segment is bound under for its match range (0: none set)."""
    return {env.MATCH_RANGE: str(int(match_range))} if match_range else {}

