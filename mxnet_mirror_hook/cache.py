"""Plan cache: in memory (LRU) and on disk, keyed by everything a plan depends on.

An entry stores the decision (names of recomputed nodes) and the measured
figures, never a symbol: the symbol is rebuilt from the user's one, so a stale
entry cannot smuggle in a different network.

# NOTE [ cache robustness ]
# * Writes are atomic: a temporary file in the same directory, then
#   ``os.replace``.  Two processes planning the same key both write whole
#   files; the last one wins, and readers never see a torn file.
# * A corrupt entry (bad JSON), a foreign one (another format or key), or one
#   that names nodes the symbol lacks is ignored with a warning, and the plan
#   is made again and rewritten.
# * A directory that cannot be created or written degrades the cache to
#   memory only, with one warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["PlanKey", "PlanCache", "grad_req_digest", "default_cache_dir", "get_cache", "CACHE_FORMAT"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "mxnet_mirror_hook.plan/1"
ENV_CACHE_DIR = "MXNET_MIRROR_HOOK_CACHE_DIR"
ENV_MEMORY_ENTRIES = "MXNET_MIRROR_HOOK_CACHE_ENTRIES"
ENV_DISK_ENTRIES = "MXNET_MIRROR_HOOK_CACHE_MAX_FILES"
DEFAULT_MEMORY_ENTRIES = 128
DEFAULT_DISK_ENTRIES = 2000


def default_cache_dir() -> str:
    """``$MXNET_MIRROR_HOOK_CACHE_DIR``, else ``~/.cache/mxnet_mirror_hook``."""
    configured = os.environ.get(ENV_CACHE_DIR)
    if configured:
        return configured
    return os.path.join(os.path.expanduser("~"), ".cache", "mxnet_mirror_hook")


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on.

    Attributes
    ----------
    structure : str
        Hash of the symbol's structure (:func:`~.mx.convert.structure_hash`).
    inputs : tuple of (name, shape, dtype)
        Per-device input shapes and dtypes, sorted by name.
    grad_req : str
        Digest of which arguments get gradients (:func:`grad_req_digest`).
    planner : str
        Planner name.
    budget : str
        Budget in its canonical form.
    mxnet_version : str
        MXNet version (its memory planner may change).
    context : str
        ``'cpu'`` or ``'gpu'``.
    keep_ops : tuple of str
        Operator types the plan must not recompute.
    plugin_version : str
        mxnet-mirror-hook's version (its planners and rules may change).
    backend : str
        ``'mirror'``, or the segments request (``'segments'``, ``'auto'``,
        ``'segments:4'``); entries of other backends record ``backend`` and
        ``segments`` too.
    """

    structure: str
    inputs: Tuple[Tuple[str, Tuple[int, ...], str], ...]
    grad_req: str
    planner: str
    budget: str
    mxnet_version: str
    context: str
    keep_ops: Tuple[str, ...] = ()
    plugin_version: str = ""
    backend: str = "mirror"

    def as_json(self) -> Dict[str, Any]:
        """A JSON-safe form of the key."""
        extra = {} if self.backend == "mirror" else {"backend": self.backend}  # old digests unchanged
        return {**extra, "structure": self.structure,
                "inputs": [[name, list(shape), dtype] for name, shape, dtype in self.inputs],
                "grad_req": self.grad_req, "planner": self.planner, "budget": self.budget,
                "mxnet_version": self.mxnet_version, "context": self.context,
                "keep_ops": list(self.keep_ops), "plugin_version": self.plugin_version}

    @property
    def digest(self) -> str:
        """A short hex digest naming the entry on disk."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            text = json.dumps(self.as_json(), sort_keys=True)
            cached = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
            object.__setattr__(self, "_digest", cached)
        return cached


def grad_req_digest(requests: Dict[str, str]) -> str:
    """A short digest of per-argument gradient requests (they can number thousands)."""
    text = json.dumps(sorted(requests.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class PlanCache:
    """A two-level plan cache.

    Parameters
    ----------
    directory : str or None
        Where entries are stored; ``None`` keeps them in memory only.
    max_memory_entries : int, optional
        Entries kept in memory, least recently used dropped first (default
        ``$MXNET_MIRROR_HOOK_CACHE_ENTRIES`` or 128).
    max_disk_entries : int, optional
        Files kept on disk, oldest dropped first (default
        ``$MXNET_MIRROR_HOOK_CACHE_MAX_FILES`` or 2000; an entry is a few KB
        to a few hundred KB).
    """

    def __init__(self, directory: Optional[str], max_memory_entries: Optional[int] = None,
                 max_disk_entries: Optional[int] = None) -> None:
        self.directory = directory
        self.max_memory_entries = max(1, int(max_memory_entries if max_memory_entries is not None
                                             else os.environ.get(ENV_MEMORY_ENTRIES,
                                                                 DEFAULT_MEMORY_ENTRIES)))
        self.max_disk_entries = max(1, int(max_disk_entries if max_disk_entries is not None
                                           else os.environ.get(ENV_DISK_ENTRIES,
                                                               DEFAULT_DISK_ENTRIES)))
        self._memory: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        self._lock = threading.Lock()
        self._disk_ok = directory is not None
        if directory is not None:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as error:
                self._disable_disk(f"cannot create {directory!r}: {error}")

    # -------------------------------------------------------------- helpers
    def _disable_disk(self, why: str) -> None:
        if self._disk_ok:
            logger.warning("plan cache: %s; keeping plans in memory only (set %s or cache_dir= "
                           "to a writable directory to keep them across runs)", why, ENV_CACHE_DIR)
        self._disk_ok = False

    @property
    def on_disk(self) -> bool:
        """Whether entries are written to disk."""
        return self._disk_ok

    def path_for(self, key: PlanKey) -> Optional[str]:
        """The file of ``key``'s entry, or ``None`` without a directory."""
        if self.directory is None:
            return None
        return os.path.join(self.directory, f"plan-{key.digest}.json")

    def _remember(self, digest: str, entry: Dict[str, Any]) -> None:
        with self._lock:
            self._memory[digest] = entry
            self._memory.move_to_end(digest)
            while len(self._memory) > self.max_memory_entries:
                self._memory.popitem(last=False)

    # ------------------------------------------------------------------ API
    def get(self, key: PlanKey) -> Optional[Dict[str, Any]]:
        """The stored plan for ``key``, or ``None``.

        A corrupt or foreign disk entry is reported with a warning and treated
        as missing.
        """
        digest = key.digest
        with self._lock:
            entry = self._memory.get(digest)
            if entry is not None:
                self._memory.move_to_end(digest)
                return entry
        path = self.path_for(key)
        if path is None or not os.path.exists(path):
            return None
        try:
            with open(path, "r", encoding="utf-8") as handle:
                document = json.load(handle)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            logger.warning("plan cache: ignoring unreadable entry %s (%s); planning again", path, error)
            return None
        if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
            logger.warning("plan cache: ignoring %s: not a %s entry; planning again", path, CACHE_FORMAT)
            return None
        if document.get("key") != key.as_json():
            logger.warning("plan cache: ignoring %s: its key does not match; planning again", path)
            return None
        plan = document.get("plan")
        if not _valid_plan(plan):
            logger.warning("plan cache: ignoring %s: malformed plan; planning again", path)
            return None
        self._remember(digest, plan)
        try:
            os.utime(path)  # eviction drops the least recently used files
        except OSError:
            pass
        return plan

    def put(self, key: PlanKey, plan: Dict[str, Any]) -> None:
        """Store ``plan`` under ``key`` in memory and, when possible, on disk."""
        if not _valid_plan(plan):
            raise ValueError("refusing to cache a malformed plan")
        self._remember(key.digest, plan)
        path = self.path_for(key)
        if path is None or not self._disk_ok:
            return
        document = {"format": CACHE_FORMAT, "key": key.as_json(), "plan": plan}
        temporary = None
        try:
            handle, temporary = tempfile.mkstemp(prefix=".plan-", suffix=".tmp", dir=self.directory)
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(document, stream, indent=1, sort_keys=True)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
            temporary = None
        except OSError as error:
            self._disable_disk(f"cannot write to {self.directory!r}: {error}")
        finally:
            if temporary is not None:  # also on KeyboardInterrupt: never leave a partial file
                try:
                    os.unlink(temporary)
                except OSError:
                    pass
        self._trim_disk()

    def _trim_disk(self) -> None:
        """Drop the oldest entry files beyond ``max_disk_entries``."""
        if self.directory is None or not self._disk_ok:
            return
        try:
            names = [n for n in os.listdir(self.directory)
                     if n.startswith("plan-") and n.endswith(".json")]
            if len(names) <= self.max_disk_entries:
                return
            paths = [os.path.join(self.directory, n) for n in names]
            ages = []
            for path in paths:
                try:
                    ages.append((os.path.getmtime(path), path))
                except OSError:
                    continue
            ages.sort()
            for _, path in ages[:len(ages) - self.max_disk_entries]:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        except OSError:
            pass

    def forget(self, key: PlanKey) -> None:
        """Drop ``key`` from memory and disk (used when an entry proves unusable)."""
        with self._lock:
            self._memory.pop(key.digest, None)
        path = self.path_for(key)
        if path is not None and os.path.exists(path):
            try:
                os.unlink(path)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._memory)


def _valid_plan(plan: Any) -> bool:
    if not isinstance(plan, dict):
        return False
    mirrored = plan.get("mirrored")
    if not isinstance(mirrored, list) or not all(isinstance(n, str) for n in mirrored):
        return False
    for field in ("baseline_mb", "planned_mb", "overhead"):
        if not isinstance(plan.get(field), (int, float)) or isinstance(plan.get(field), bool):
            return False
    return True


_CACHES: Dict[Optional[str], PlanCache] = {}
_CACHES_LOCK = threading.Lock()


def get_cache(cache_dir: Union[None, str, bool, os.PathLike] = None) -> PlanCache:
    """The process-wide cache for ``cache_dir``.

    Parameters
    ----------
    cache_dir : str, None or False
        ``None``: :func:`default_cache_dir`; ``False``: memory only.
    """
    if cache_dir is False:
        directory: Optional[str] = None
    elif cache_dir is None or cache_dir is True:
        directory = default_cache_dir()
    elif isinstance(cache_dir, (str, os.PathLike)):
        directory = os.path.abspath(os.fspath(cache_dir))
    else:
        raise TypeError(f"cache_dir must be a path, None or False, got {cache_dir!r}")
    with _CACHES_LOCK:
        cache = _CACHES.get(directory)
        if cache is None:
            cache = _CACHES[directory] = PlanCache(directory)
        return cache
