"""One cached-plan sequence: get, lock, get again, compute, put (NOTE [ ranks sharing a cache ])."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple, Type, TypeVar, Union

from ..cache import BackendEntry, MirrorEntry, PlanCache, PlanKey
from .result import PLAN_LOGGER, MirrorPlan

__all__ = ["cached_plan"]

logger = logging.getLogger(PLAN_LOGGER)

Entry = TypeVar("Entry", MirrorEntry, BackendEntry)


def cached_plan(cache: PlanCache, key: PlanKey, kind: Type[Entry],
                use: Callable[[Entry], Optional[MirrorPlan]],
                make: Callable[[], Tuple[MirrorPlan, Entry]]) -> MirrorPlan:
    """The plan for ``key``: from ``cache`` when its entry is usable, else made and stored.

    One process plans a key while the others wait for its entry (the lock of
    :meth:`~mxnet_mirror_hook.cache.PlanCache.planning`); the entry is read again once the
    lock is held, since the process that held it before may have written it meanwhile.

    Parameters
    ----------
    cache : PlanCache
        Where entries live.
    key : PlanKey
        The plan's key.
    kind : type
        :class:`~mxnet_mirror_hook.cache.MirrorEntry` or
        :class:`~mxnet_mirror_hook.cache.BackendEntry`: how the stored entry is read.
    use : callable
        Entry -> plan, or ``None`` when the entry does not fit the symbol (it names
        nodes the symbol lacks, for instance): it is then dropped with a warning and the
        plan made again.
    make : callable
        () -> (plan, entry): plans, and gives the entry to store (stored here, after
        planning succeeded, so an interrupted plan leaves no entry).
    """
    stored = cache.get(key)
    if stored is None:
        with cache.planning(key):
            stored = cache.get(key)  # written meanwhile by the process that held the lock
            if stored is None:
                return _make_and_put(cache, key, make)
    plan = _use(stored, kind, use)
    if plan is not None:
        return plan
    logger.warning("plan cache: entry names nodes this symbol lacks or that may no longer be "
                   "recomputed; planning again")
    cache.forget(key)
    return _make_and_put(cache, key, make)


def _use(stored: Dict[str, Any], kind: Type[Entry],
         use: Callable[[Entry], Optional[MirrorPlan]]) -> Union[None, MirrorPlan]:
    try:
        entry = kind.from_dict(stored)
    except ValueError:
        return None
    return use(entry)


def _make_and_put(cache: PlanCache, key: PlanKey,
                  make: Callable[[], Tuple[MirrorPlan, Entry]]) -> MirrorPlan:
    plan, entry = make()
    cache.put(key, entry.to_dict())
    return plan
