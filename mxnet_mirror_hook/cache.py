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
#
# NOTE [ ranks sharing a cache ]
# Eight ranks on one node (Horovod, the parameter server) bind the same symbol
# at the same shapes at the same moment; each planning on its own costs 8x the
# CPU and up to 8 x two measuring workers of RAM.  With a shared cache
# directory they plan once per key: ``PlanCache.planning(key)`` takes an
# exclusive ``fcntl.flock`` on ``lock-<digest>`` in the directory; the
# first rank gets it, plans and writes the entry before letting go; the others
# wait on the lock, then find the entry and use it.  A rank that waits longer
# than ``$MXNET_MIRROR_HOOK_LOCK_TIMEOUT`` seconds (default 300) plans by
# itself with a warning (the plan is the same; only the work is repeated).
# flock locks belong to an open file: they are dropped when the holder exits
# or dies, so a crashed rank never blocks the others, and two threads of one
# process exclude each other as two processes do.  Memory-only caches, a
# directory that cannot be written and platforms without fcntl (Windows) skip
# the lock.  The holder removes the lock file (if it is still its own) just
# before letting go, so the directory holds only entries.  A process that opens
# the file just before the removal locks a file no one else can open any more:
# it then finds the entry written before the removal and does not plan.  Only
# when the holder wrote no entry (its planning failed, the disk refused the
# write) can two processes end up planning the same key at once, which costs
# work, never correctness (entries are written atomically).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from . import env

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no cross-process planning lock)
    fcntl = None  # type: ignore[assignment]  # no such module here; the lock checks for None

__all__ = ["PlanKey", "PlanCache", "MirrorEntry", "BackendEntry", "grad_req_digest", "default_cache_dir",
           "get_cache", "CACHE_FORMAT", "lock_timeout"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "mxnet_mirror_hook.plan/1"
LOCK_POLL_SECONDS = 0.05


def lock_timeout() -> float:
    """``$MXNET_MIRROR_HOOK_LOCK_TIMEOUT`` in seconds (default 300; see NOTE [ ranks sharing a cache ])."""
    return max(0.0, env.lock_timeout())


def default_cache_dir() -> str:
    """``$MXNET_MIRROR_HOOK_CACHE_DIR``, else ``~/.cache/mxnet_mirror_hook``."""
    return env.cache_dir()


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
    recompute_dropout: bool = False

    def as_json(self) -> Dict[str, Any]:
        """A JSON-safe form of the key."""
        # A mirror key has no "backend" field: old digests unchanged.
        extra: Dict[str, Any] = {} if self.backend == "mirror" else {"backend": self.backend}
        if self.recompute_dropout:
            extra["recompute_dropout"] = True
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


def _figure(plan: Dict[str, Any], name: str) -> float:
    value = plan.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"plan cache entry: {name} is not a number")
    return float(value)


def _names(plan: Dict[str, Any]) -> Tuple[str, ...]:
    mirrored = plan.get("mirrored")
    if not isinstance(mirrored, list) or not all(isinstance(n, str) for n in mirrored):
        raise ValueError("plan cache entry: mirrored is not a list of node names")
    return tuple(mirrored)


@dataclass(frozen=True)
class MirrorEntry:
    """The entry of a one-level plan (a key of backend ``'mirror'``).

    Attributes
    ----------
    mirrored : tuple of str
        Recomputed nodes, in topological order.
    baseline_mb, planned_mb : float
        MXNet's planned memory without and with the decision.
    overhead : float
        Estimated extra compute (fraction of one plain iteration).
    label : str
        The chosen candidate's label (``'unmirrored'`` when decided without candidates).
    """

    mirrored: Tuple[str, ...]
    baseline_mb: float
    planned_mb: float
    overhead: float
    label: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form stored by :meth:`PlanCache.put`."""
        return {"mirrored": list(self.mirrored), "baseline_mb": self.baseline_mb,
                "planned_mb": self.planned_mb, "overhead": self.overhead, "label": self.label}

    @classmethod
    def from_dict(cls, plan: Dict[str, Any]) -> "MirrorEntry":
        """Read a stored entry; ``ValueError`` when it is not one."""
        return cls(mirrored=_names(plan), baseline_mb=_figure(plan, "baseline_mb"),
                   planned_mb=_figure(plan, "planned_mb"), overhead=_figure(plan, "overhead"),
                   label=str(plan.get("label", "")))


@dataclass(frozen=True)
class BackendEntry:
    """The entry of a segments request (a key of backend ``'auto'``, ``'segments'``, ``'segments:K'``).

    Attributes
    ----------
    backend : str
        ``'mirror'`` (the one-level plan, under its own key, is used) or ``'segments'``.
    mirrored : tuple of str
        Recomputed nodes (of the one-level plan, or inside the segments, sorted).
    baseline_mb, planned_mb, overhead : float
        As for :class:`MirrorEntry`.
    segments : dict or None
        The segment plan (``SegmentPlan.to_dict``) for ``'segments'``.
    fallback : str or None
        Why the segment path failed when ``'auto'`` fell back to the one-level plan.
    """

    backend: str
    mirrored: Tuple[str, ...]
    baseline_mb: float
    planned_mb: float
    overhead: float
    segments: Optional[Dict[str, Any]] = None
    fallback: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form stored by :meth:`PlanCache.put`."""
        plan: Dict[str, Any] = {"mirrored": list(self.mirrored), "baseline_mb": self.baseline_mb,
                                "planned_mb": self.planned_mb, "overhead": self.overhead,
                                "backend": self.backend}
        if self.segments is not None:
            plan["segments"] = self.segments
        if self.fallback is not None:
            plan["fallback"] = self.fallback
        return plan

    @classmethod
    def from_dict(cls, plan: Dict[str, Any]) -> "BackendEntry":
        """Read a stored entry; ``ValueError`` when it is not one."""
        backend, segments, fallback = plan.get("backend"), plan.get("segments"), plan.get("fallback")
        if backend not in ("mirror", "segments"):
            raise ValueError(f"plan cache entry: unknown backend {backend!r}")
        if (backend == "segments") != isinstance(segments, dict):
            raise ValueError("plan cache entry: a segments entry needs its segment plan")
        if fallback is not None and not isinstance(fallback, str):
            raise ValueError("plan cache entry: fallback is not a string")
        return cls(backend=backend, mirrored=_names(plan), baseline_mb=_figure(plan, "baseline_mb"),
                   planned_mb=_figure(plan, "planned_mb"), overhead=_figure(plan, "overhead"),
                   segments=segments, fallback=fallback)


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
                                             else env.cache_entries()))
        self.max_disk_entries = max(1, int(max_disk_entries if max_disk_entries is not None
                                           else env.cache_max_files()))
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
                           "to a writable directory to keep them across runs)", why, env.CACHE_DIR)
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

    def lock_path_for(self, key: PlanKey) -> Optional[str]:
        """The lock file of ``key`` (see NOTE [ ranks sharing a cache ]), or ``None`` without a directory."""
        if self.directory is None:
            return None
        return os.path.join(self.directory, f"lock-{key.digest}")

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
        if not isinstance(plan, dict) or not _valid_plan(plan):
            logger.warning("plan cache: ignoring %s: malformed plan; planning again", path)
            return None
        self._remember(digest, plan)
        try:
            os.utime(path)  # eviction drops the least recently used files
        except OSError:
            pass
        return plan

    @contextlib.contextmanager
    def planning(self, key: PlanKey, timeout: Optional[float] = None) -> Iterator[bool]:
        """Hold ``key``'s planning lock for the block (NOTE [ ranks sharing a cache ]).

        Call :meth:`get` again inside the block: a process that held the lock
        before may have written the entry meanwhile.  Plan and :meth:`put`
        inside the block so that waiting processes find the entry.

        Parameters
        ----------
        key : PlanKey
            The plan about to be made.
        timeout : float, optional
            Seconds to wait for another process (default
            :func:`lock_timeout`); after it, the block runs without the lock
            and a warning is logged.

        Yields
        ------
        bool
            Whether the lock is held (``False`` without a disk cache, without
            fcntl, or after the timeout).
        """
        path = self.lock_path_for(key)
        if path is None or not self._disk_ok or fcntl is None:
            yield False
            return
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            logger.debug("plan cache: no planning lock (%s); planning without it", error)
            yield False
            return
        try:
            held = self._acquire(descriptor, lock_timeout() if timeout is None else timeout)
            try:
                yield held
            finally:
                if held:
                    _remove_if_same(path, descriptor)
                    fcntl.flock(descriptor, fcntl.LOCK_UN)
        finally:
            os.close(descriptor)

    def _acquire(self, descriptor: int, timeout: float) -> bool:
        """Take the exclusive lock, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if waiting:
                    logger.info("plan cache: the other process finished; reading its plan")
                return True
            except BlockingIOError:
                pass
            except OSError as error:  # e.g. a file system without locks
                logger.debug("plan cache: cannot lock (%s); planning without the lock", error)
                return False
            if not waiting:
                waiting = True
                logger.info("plan cache: another process is planning this symbol in %s; waiting "
                            "for its plan (up to %g s, %s)", self.directory, timeout, env.LOCK_TIMEOUT)
            if time.monotonic() >= deadline:
                logger.warning("plan cache: waited %g s for another process planning the same "
                               "symbol in %s; planning here too (set %s to wait longer)",
                               timeout, self.directory, env.LOCK_TIMEOUT)
                return False
            time.sleep(LOCK_POLL_SECONDS)

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


def _remove_if_same(path: str, descriptor: int) -> None:
    """Unlink ``path`` if it still names the file open as ``descriptor``."""
    try:
        if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            os.unlink(path)
    except OSError:
        pass


def _valid_plan(plan: Any) -> bool:
    if not isinstance(plan, dict):
        return False
    try:
        _names(plan)
        for name in ("baseline_mb", "planned_mb", "overhead"):
            _figure(plan, name)
    except ValueError:
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
