"""Module's executor group with a segment chain per device, and the swap that makes
``Module.bind`` build it (NOTE [ swapping Module's executor group ])."""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Iterator, Optional

import mxnet as mx

from ...core.segments.plan import SegmentPlan
from .chain import SegmentChain

__all__ = ["SegmentedExecutorGroup", "executor_group_for"]


class SegmentedExecutorGroup(mx.module.executor_group.DataParallelExecutorGroup):
    """``DataParallelExecutorGroup`` whose per-device executor is a :class:`SegmentChain`.

    Everything else (data slicing, parameter and gradient lists for the
    optimizer and kvstore, outputs, metrics) is the base class's: a chain
    offers the executor attributes it reads.

    Parameters
    ----------
    *args, **kwargs
        As for ``DataParallelExecutorGroup``.
    segment_plan : SegmentPlan
        The split (the same on every device: one chain per device).
    """

    def __init__(self, *args: Any, segment_plan: SegmentPlan, **kwargs: Any) -> None:
        self.segment_plan = segment_plan
        super().__init__(*args, **kwargs)

    def _bind_ith_exec(self, i: int, data_shapes: Any, label_shapes: Any,
                       shared_group: Any) -> SegmentChain:
        input_shapes = dict(data_shapes)
        input_types = {x.name: x.dtype for x in data_shapes}
        if label_shapes is not None:
            input_shapes.update(dict(label_shapes))
            input_types.update({x.name: x.dtype for x in label_shapes})
        shared_arrays, shared_exec = None, None
        if shared_group is not None:
            # Another bucket: the same parameter, gradient and auxiliary arrays (as simple_bind's
            # shared_arg_names does) and its memory pool.
            other = shared_group.execs[i]
            params = set(self.param_names)
            shared_arrays = {
                "arg": {n: a for n, a in other.arg_dict.items() if n in params},
                "grad": {n: a for n, a in other.grad_dict.items() if n in params and a is not None},
                "aux": dict(other.aux_dict)}
            shared_exec = other.pool_owner if isinstance(other, SegmentChain) else other
        return SegmentChain(self.symbol, self.segment_plan, self.contexts[i], input_shapes,
                            input_types, self.grad_req, shared_arrays, shared_exec)

    def install_monitor(self, mon: Any) -> None:
        """Install a monitor on every segment executor."""
        for chain in self.execs:
            mon.install(chain)


_SWAP_LOCK = threading.RLock()


@contextlib.contextmanager
def executor_group_for(segment_plan: Optional[SegmentPlan]) -> Iterator[None]:
    """While ``Module.bind`` runs, make it build a :class:`SegmentedExecutorGroup` for
    ``segment_plan`` (nothing changes for None).

    # NOTE [ swapping Module's executor group ]
    # ``Module.bind`` constructs ``DataParallelExecutorGroup`` by the name it
    # imported into ``mxnet.module.module``; replacing that name for the call is
    # the one way to give it another group without copying ``bind``.  The
    # replacement is a subclass (one segment chain per device), so everything
    # Module does with the group afterwards is unchanged.  The swap is
    # process-wide, so binds that swap are serialized by a lock.
    """
    if segment_plan is None:
        yield
        return
    import mxnet.module.module as module_module

    with _SWAP_LOCK:
        original = module_module.DataParallelExecutorGroup
        module_module.DataParallelExecutorGroup = functools.partial(SegmentedExecutorGroup,
                                                                    segment_plan=segment_plan)
        try:
            yield
        finally:
            module_module.DataParallelExecutorGroup = original
