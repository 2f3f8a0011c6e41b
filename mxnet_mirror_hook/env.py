"""The one place that reads environment variables (every one is documented in docs/environment.md).

Pure Python: importing it imports nothing heavy.  Each accessor reads the
variable when called, so a test or a script may set it at any time before
the value is needed.

Our variables:

==================================  ===============  ===============================================
variable                            default          what it does
==================================  ===============  ===============================================
``MXNET_MIRROR_HOOK_CACHE_DIR``     ``~/.cache/...`` plan cache directory (``cache_dir=None``)
``MXNET_MIRROR_HOOK_CACHE_ENTRIES`` 128              plans kept in memory (LRU)
``MXNET_MIRROR_HOOK_CACHE_MAX_FILES`` 2000           plan files kept on disk
``MXNET_MIRROR_HOOK_MEASURE``       ``worker``       ``inprocess`` binds candidates in this process
``MXNET_MIRROR_HOOK_WORKERS``       min(2, cores)    measuring worker processes
``MXNET_MIRROR_HOOK_WORKER_MAX_MB`` 1536             a worker restarts above this resident size
``MXNET_MIRROR_HOOK_LOCK_TIMEOUT``  300              seconds a rank waits for another's plan
``MXNET_MIRROR_HOOK_PROGRESS``      on               ``0``: never draw the planning progress bar
==================================  ===============  ===============================================

MXNet's own variables that the plugin reads or sets are named here too
(:data:`MXNET_VARIABLES`), so that one file says what touches the environment.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Mapping, Optional, TypeVar

__all__ = ["CACHE_DIR", "CACHE_ENTRIES", "CACHE_MAX_FILES", "MEASURE", "WORKERS", "WORKER_MAX_MB",
           "MEM_PLAN_VERBOSE", "MATCH_RANGE", "AUTO_SEARCH_MATCH_RANGE", "DO_MIRROR",
           "LOCK_TIMEOUT", "PROGRESS", "MXNET_VARIABLES", "progress_allowed", "read", "lock_timeout",
           "measure_mode", "read_int",
           "read_float", "cache_dir", "measure_in_process", "worker_count", "worker_max_mb",
           "cache_entries", "cache_max_files", "scoped", "quiet_bind", "match_range",
           "auto_search_match_range"]

CACHE_DIR = "MXNET_MIRROR_HOOK_CACHE_DIR"
CACHE_ENTRIES = "MXNET_MIRROR_HOOK_CACHE_ENTRIES"
CACHE_MAX_FILES = "MXNET_MIRROR_HOOK_CACHE_MAX_FILES"
MEASURE = "MXNET_MIRROR_HOOK_MEASURE"
WORKERS = "MXNET_MIRROR_HOOK_WORKERS"
WORKER_MAX_MB = "MXNET_MIRROR_HOOK_WORKER_MAX_MB"
LOCK_TIMEOUT = "MXNET_MIRROR_HOOK_LOCK_TIMEOUT"
PROGRESS = "MXNET_MIRROR_HOOK_PROGRESS"

#: MXNet's memory-plan log switch (read once per process, at the first bind); set for the
#: capture worker only.
MEM_PLAN_VERBOSE = "MXNET_MEM_PLAN_VERBOSE_LOGGING"
#: nnvm's allocator match range (read: the allocator model follows it).
MATCH_RANGE = "NNVM_EXEC_MATCH_RANGE"
#: nnvm's match-range search (read: the allocator model cannot follow it).
AUTO_SEARCH_MATCH_RANGE = "NNVM_AUTO_SEARCH_MATCH_RANGE"
#: MXNet's built-in mirroring heuristic (set only to measure it for comparison).
DO_MIRROR = "MXNET_BACKWARD_DO_MIRROR"
#: MXNet's "Subgraph backend MKLDNN is activated" line, printed at every bind (set to 0 for
#: the plugin's own measuring binds unless the user set it).
SUBGRAPH_VERBOSE = "MXNET_SUBGRAPH_VERBOSE"
#: MXNet's MKLDNN switch (read: without MKLDNN, CPU convolutions refuse recomputed copies
#: nothing reads; NOTE [ copies nothing reads ]).
MKLDNN_ENABLED = "MXNET_MKLDNN_ENABLED"
MXNET_VARIABLES = (MEM_PLAN_VERBOSE, MATCH_RANGE, AUTO_SEARCH_MATCH_RANGE, DO_MIRROR, SUBGRAPH_VERBOSE,
                   MKLDNN_ENABLED)

T = TypeVar("T")


def read(name: str, default: Optional[str] = None) -> Optional[str]:
    """The variable's value, or ``default`` when unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _typed(name: str, default: T, convert: Callable[[str], T]) -> T:
    value = read(name)
    if value is None:
        return default
    try:
        return convert(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a "
                         f"{convert.__name__}; unset it or give a number") from None


def read_int(name: str, default: int) -> int:
    """The variable as an int (``default`` when unset); a clear error when it is not one."""
    return _typed(name, default, int)


def read_float(name: str, default: float) -> float:
    """The variable as a float (``default`` when unset); a clear error when it is not one."""
    return _typed(name, default, float)


def cache_dir() -> str:
    """``$MXNET_MIRROR_HOOK_CACHE_DIR``, else ``~/.cache/mxnet_mirror_hook``."""
    return read(CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "mxnet_mirror_hook")


def cache_entries() -> int:
    """Plans kept in the in-memory cache."""
    return read_int(CACHE_ENTRIES, 128)


def cache_max_files() -> int:
    """Plan files kept on disk."""
    return read_int(CACHE_MAX_FILES, 2000)


def measure_mode() -> str:
    """``$MXNET_MIRROR_HOOK_MEASURE`` in lower case (``''`` when unset)."""
    return (read(MEASURE) or "").lower()


def measure_in_process() -> bool:
    """Whether ``$MXNET_MIRROR_HOOK_MEASURE`` asks planners to bind in this process."""
    return measure_mode() == "inprocess"


def worker_count() -> int:
    """Measuring worker processes."""
    return max(1, read_int(WORKERS, min(2, os.cpu_count() or 1)))


def worker_max_mb() -> float:
    """Resident size above which a measuring worker is restarted."""
    return read_float(WORKER_MAX_MB, 1536.0)


def lock_timeout() -> float:
    """Seconds a process waits on another planning the same key in a shared cache directory."""
    return read_float(LOCK_TIMEOUT, 300.0)


def match_range(default: int) -> int:
    """nnvm's allocator match range, as MXNet reads it."""
    return read_int(MATCH_RANGE, default)


def auto_search_match_range() -> bool:
    """Whether nnvm searches its match range (the allocator model cannot follow that)."""
    return (read(AUTO_SEARCH_MATCH_RANGE, "0") or "0") != "0"


def mkldnn_switched_off() -> bool:
    """Whether ``MXNET_MKLDNN_ENABLED`` turns MKLDNN off in this process (MXNet's default: on)."""
    return read_int(MKLDNN_ENABLED, 1) == 0


def quiet_bind() -> Dict[str, str]:
    """Variables to set around the plugin's measuring binds (none the user set is overridden)."""
    return {} if read(SUBGRAPH_VERBOSE) is not None else {SUBGRAPH_VERBOSE: "0"}


@contextlib.contextmanager
def scoped(variables: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def progress_allowed() -> bool:
    """Whether ``$MXNET_MIRROR_HOOK_PROGRESS`` lets the planning progress bar be drawn (anything
    but ``0``, ``off``, ``false`` or ``no``)."""
    return (read(PROGRESS) or "").strip().lower() not in ("0", "off", "false", "no")
