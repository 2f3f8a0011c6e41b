"""mxnet-mirror-hook: train MXNet networks in less memory by recomputing forward nodes.

Public names are re-exported here explicitly; everything else is internal.  Names that
need MXNet are imported on first use (PEP 562), so that a measuring worker process can
import ``mxnet_mirror_hook.mx.worker`` without the ``mxnet`` package (NOTE [ binding
without the mxnet package ] in mx/capi.py); ``from mxnet_mirror_hook import X`` works as
before.
"""
from __future__ import annotations

import importlib as _importlib
from typing import Any as _Any

from ._version import __version__
from .errors import (BackendError, BudgetError, BudgetUnreachableError, DeviceMemoryError, GluonMirrorError,
                     MeasurementError, MirrorHookError, OptionError, ShapeError, UnknownPlannerError,
                     UnsupportedBlockError)

#: Public name -> module (relative to this package) that defines it.
_LAZY = {
    "parse_budget": ".core.budget", "list_planners": ".core.planners",
    "register_planner": ".core.planners", "MirrorOptions": ".options", "MirrorPlan": ".plan",
    "plan_mirror": ".plan", "MirroredModule": ".module", "MirroredBucketingModule": ".bucketing",
    "add_arguments": ".runner", "from_args": ".runner", "mirrored_modules": ".runner",
    "max_batch": ".planning.batch",
}


def __getattr__(name: str) -> _Any:
    if name == "memonger":
        return _importlib.import_module(".compat.memonger", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY) | {"memonger"})


__all__ = [
    "__version__", "MirrorOptions", "MirroredModule", "MirroredBucketingModule", "MirrorPlan",
    "add_arguments", "from_args", "mirrored_modules", "plan_mirror", "list_planners",
    "register_planner", "parse_budget", "MirrorHookError", "ShapeError", "BudgetError",
    "BudgetUnreachableError", "UnknownPlannerError", "MeasurementError",
    "BackendError", "OptionError", "GluonMirrorError", "UnsupportedBlockError", "memonger",
    "max_batch", "DeviceMemoryError",
]
