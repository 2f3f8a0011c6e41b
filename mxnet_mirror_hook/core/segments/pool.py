"""The memory pool a chain of segment executors shares, and the variant of each segment that
makes it least (NOTE [ the shared pool's union ], NOTE [ a match range per segment ])."""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Any, List, Mapping, Sequence, Tuple

__all__ = ["shared_pool_bytes", "mixed_pool_bytes", "MATCH_RANGES", "POOL_CHOICE_LIMIT", "POOL_CHOICE_PASSES",
           "least_pool_choice"]


def shared_pool_bytes(blocks: Sequence[Sequence[int]]) -> int:
    """Bytes of the memory pool a chain of executors shares, bound in the given order.

    # NOTE [ the shared pool's union ]
    # MXNet binds an executor with ``shared_exec`` by giving each of its planned
    # storage blocks, largest first, the smallest block of the shared pool that
    # is at least as large and not yet given to this executor; a block that
    # finds none is allocated and appended to the pool (InitDataEntryMemory in
    # src/executor/graph_executor.cc).  So the pool of a chain is at least its
    # largest executor's plan and can be more: segments of different shapes
    # add blocks.  ``blocks`` are the executors' planned block sizes in bind
    # order (the allocator model's :meth:`planned_blocks`); the result is the
    # sum of the pool's blocks after the last bind.
    """
    pool: List[int] = []
    for planned in blocks:
        free = sorted(pool)
        for size in sorted(planned, reverse=True):
            position = bisect.bisect_left(free, size)
            if position < len(free):
                free.pop(position)
            else:
                pool.append(size)
    return sum(pool)


def mixed_pool_bytes(shared: Sequence[Sequence[int]], kept: Sequence[Sequence[int]]) -> int:
    """Bytes of the pools of a selective chain (NOTE [ selective segments ] in selective.py): the
    pool the re-run segments share (:func:`shared_pool_bytes`, ``shared`` in bind order) plus
    each kept segment's own pool, whose blocks hold its activations from its forward to its
    backward and so cannot be lent to any other executor."""
    return shared_pool_bytes(shared) + sum(sum(blocks) for blocks in kept)


#: ``NNVM_EXEC_MATCH_RANGE`` values a segment may be bound under when the pool is tuned
#: (NOTE [ a match range per segment ]); 16 is MXNet's default.
MATCH_RANGES = (2, 4, 8, 16, 32)

#: Combinations of per-segment variants :func:`least_pool_choice` tries exhaustively; beyond
#: it, a fixed number of coordinate-descent passes.
POOL_CHOICE_LIMIT = 4096
POOL_CHOICE_PASSES = 3


# NOTE [ a match range per segment ]
# The shared pool is the union of the executors' blocks (NOTE [ the shared
# pool's union ]): a segment whose blocks are many and small adds blocks
# even when its own plan is well below the largest one.  MXNet's planner
# lets a freed block serve a tensor within a factor NNVM_EXEC_MATCH_RANGE
# of its size (default 16; read at every bind, so it can differ per
# executor).  Under another range a segment plans other blocks, a few MB
# more or less on its own, but sometimes far better dovetailed with the
# others: resnet152_v1b, batch 32, two segments planned 'min' on their own,
# cut after layers3_bottleneckv1b1: pool 1069 MB with both at 16, 1045 MB
# with the first at 2; cut one block later: 980 MB, 969 MB with the first
# at 8 and the second at 2.  So under ``'min'`` each segment is measured under each of
# MATCH_RANGES and the combination with the least pool is bound (the chain
# sets the variable around each segment's bind).
#
# ``options[i]`` of :func:`least_pool_choice` maps variant keys to (MXNet's
# planned MB, the allocator model's blocks) of executor i (segment order).  The
# chain binds the largest planned MB first, ties by position
# (:meth:`SegmentPlan.bind_order`), so the order follows the chosen variants.
# Exhaustive up to POOL_CHOICE_LIMIT combinations; beyond, coordinate descent
# from each executor's least plan, POOL_CHOICE_PASSES passes (bounded by work,
# not time).
Variants = Sequence[Mapping[Any, Tuple[float, Sequence[int]]]]


def least_pool_choice(options: Variants) -> Tuple[int, List[Any]]:
    """The variant of each executor that makes the chain's shared pool least
    (NOTE [ a match range per segment ]).

    Parameters
    ----------
    options : sequence of mapping
        Per executor (segment order): variant key -> (MXNet's planned MB, the allocator model's
        blocks).

    Returns
    -------
    (bytes, keys) : the pool's bytes and the chosen key of each executor.
    """
    if not options:
        return 0, []
    if any(not o for o in options):
        raise ValueError("every executor needs at least one variant")
    keys = [sorted(o, key=repr) for o in options]
    combinations = math.prod(len(k) for k in keys)
    if combinations <= POOL_CHOICE_LIMIT:
        best = min(itertools.product(*keys), key=lambda c: (_pool_of(options, c), c.__repr__()))
        return _pool_of(options, best), list(best)
    return _coordinate_descent(options, keys)


def _pool_of(options: Variants, choice: Sequence[Any]) -> int:
    """Bytes of the shared pool when executor i is bound under ``choice[i]``, in bind order."""
    chosen = [options[i][k] for i, k in enumerate(choice)]
    order = sorted(range(len(chosen)), key=lambda i: (-chosen[i][0], i))
    return shared_pool_bytes([chosen[i][1] for i in order])


def _least_variant(keys: Sequence[Any], variants: Mapping[Any, Any]) -> Any:
    """The variant key whose blocks add up to the least bytes (ties: by the key's text)."""
    return min(keys, key=lambda key: (sum(variants[key][1]), repr(key)))


def _coordinate_descent(options: Variants, keys: Sequence[Sequence[Any]]) -> Tuple[int, List[Any]]:
    """From each executor's least plan, change one executor's variant at a time while the pool
    shrinks, POOL_CHOICE_PASSES passes at most."""
    choice = [_least_variant(k, o) for k, o in zip(keys, options)]
    current = _pool_of(options, choice)
    for _ in range(POOL_CHOICE_PASSES):
        improved = False
        for i, candidates in enumerate(keys):
            for key in candidates:
                trial = choice[:i] + [key] + choice[i + 1:]
                value = _pool_of(options, trial)
                if value < current:
                    choice, current, improved = trial, value, True
        if not improved:
            break
    return current, choice
