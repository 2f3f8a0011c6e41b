"""Custom operators of several kinds in one process: the backward dependencies MXNet's Python side reads.

# NOTE [ one process-wide set of backward dependencies ]
# MXNet 1.9.1's Python Custom operator keeps the indices a ``declare_backward_dependency`` returned
# in ONE process-wide set, ``mxnet.operator._registry.result_deps``, overwritten each time any
# Custom node is parsed (``load_json``, symbol creation).  A Custom operator's backward callback
# asks the storage type of each array whose index is in that set, and takes the others as dense
# without asking; the arrays a backward does not depend on are empty placeholders whose storage
# type is undefined, and asking one raises "unknown storage type: -1".  So with two kinds of
# fused operator in one symbol, whichever was parsed last decides, and an operator declaring
# indices 0-5 (the fused LayerNorm: two output gradients and four inputs) makes the core
# attention's backward (its output, index 2, is not a dependency) fail; the fused activation
# (indices 0-2) does the same to it.  :func:`use_common_dependencies` makes the set answer
# "is a dependency" only for indices every Custom node parsed so far declared (the intersection;
# the set being built by the latest parse is part of it): an index in it is an array every
# operator kept, so it is never an empty placeholder.  A process with one kind of Custom operator
# that always declares the same indices sees exactly MXNet's set; otherwise more arrays are
# taken as dense without asking, as MXNet already does for whatever the last parse did not
# declare (a Custom operator with sparse backward dependencies is as fragile as before).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Set

import mxnet as mx

__all__ = ["use_common_dependencies", "CommonDependencies"]


class CommonDependencies:
    """Stands for ``_registry.result_deps``: ``add`` goes to the set of the latest parse,
    ``in`` asks the intersection of all parses (NOTE [ one process-wide set of backward
    dependencies ])."""

    def __init__(self, first: Iterable[int] = ()) -> None:
        self._common: Optional[Set[int]] = None            # None: no parse completed
        self._latest: Optional[Set[int]] = set(first) or None  # None: nothing parsed yet

    def start(self, new: Iterable[int]) -> None:
        """A new parse: the previous parse's set joins the intersection."""
        if self._latest is not None:
            self._common = set(self._latest) if self._common is None else self._common & self._latest
        self._latest = set(new)

    def add(self, index: int) -> None:  # noqa: D102 (set's)
        if self._latest is None:
            self._latest = set()
        self._latest.add(index)

    def __contains__(self, index: object) -> bool:
        return (self._latest is not None and index in self._latest
                and (self._common is None or index in self._common))

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(i for i in (self._latest or ()) if i in self))


def use_common_dependencies() -> None:
    """Make MXNet's Python Custom operator registry answer with the intersection of all declared
    backward dependencies (NOTE [ one process-wide set of backward dependencies ]).  Idempotent."""
    registry = mx.operator._registry
    if isinstance(type(registry).__dict__.get("result_deps"), property):
        return
    deps = CommonDependencies(registry.__dict__.pop("result_deps", ()))

    def get(_self) -> CommonDependencies:
        return deps

    def set_(_self, value: Iterable[int]) -> None:
        deps.start(value)

    registry.__class__ = type("_CommonDependenciesRegistry", (type(registry),),
                              {"result_deps": property(get, set_)})
