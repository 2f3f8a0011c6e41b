"""mxnet-mirror-hook: train MXNet networks in less memory by recomputing forward nodes.

Public names are re-exported here explicitly; everything else is internal.
"""
from __future__ import annotations

import sys as _sys

from ._version import __version__
from .errors import (BackendError, BudgetError, BudgetUnreachableError, MeasurementError,
                     MirrorHookError, ShapeError, UnknownPlannerError)
from .core.budget import parse_budget
from .core.planners import list_planners, register_planner
from .options import MirrorOptions
from .plan import MirrorPlan, plan_mirror
from .module import MirroredModule
from .bucketing import MirroredBucketingModule
from .runner import add_arguments, from_args, mirrored_modules
from .compat import memonger

# ``import mxnet_mirror_hook.memonger`` (the seed-compatible functions' old home) keeps working.
_sys.modules[__name__ + ".memonger"] = memonger

__all__ = [
    "__version__", "MirrorOptions", "MirroredModule", "MirroredBucketingModule", "MirrorPlan",
    "add_arguments", "from_args", "mirrored_modules", "plan_mirror", "list_planners",
    "register_planner", "parse_budget", "MirrorHookError", "ShapeError", "BudgetError",
    "BudgetUnreachableError", "UnknownPlannerError", "MeasurementError", "BackendError", "memonger",
]
