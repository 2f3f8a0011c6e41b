"""Binding a mirrored block's plan to its Parameters' own arrays: one executor or a segment chain."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..errors import GluonMirrorError
from ..plan import MirrorPlan
from .records import Slot

__all__ = ["bind_slot", "segment_chain"]


def bind_slot(block: "gluon.HybridBlock", plan: MirrorPlan, names: List[str],
              args: Sequence["mx.nd.NDArray"], requests: Dict[str, str], primary: bool) -> Slot:
    """Bind ``plan`` for inputs ``args`` (named ``names``) with the Parameters' arrays.

    Parameters
    ----------
    block : gluon.HybridBlock
        The mirrored block (its Parameters are the executor's arguments and auxiliary states).
    plan : MirrorPlan
        The plan to bind (one-level or executor segments).
    names, args
        The traced symbol's input names and this call's arrays (their shapes, dtypes, context).
    requests : dict of str to str
        grad_req of every argument.
    primary : bool
        The first executor of its context and signature writes the Parameters' gradients
        directly; a further one writes private arrays that the backward then adds in.
    """
    context = args[0].context
    symbol = plan.symbol
    params = {p.name: p for p in block.collect_params().values()}
    arrays, grads, fresh, private, written = {}, {}, [], [], []
    bind_requests = dict(requests)
    for name in symbol.list_arguments():
        if name in names:
            x = args[names.index(name)]
            arrays[name] = mx.nd.zeros(x.shape, ctx=context, dtype=x.dtype)
            if requests[name] != "null":
                grads[name] = mx.nd.zeros(x.shape, ctx=context, dtype=x.dtype)
            continue
        param = params[name]
        arrays[name] = param.data(context)
        if param.grad_req == "null":
            continue
        fresh.append(arrays[name])
        if primary:
            grads[name] = param.grad(context)
            if param.grad_req == "write":
                written.append(grads[name])
        else:
            target = param.grad(context)
            grads[name] = mx.nd.zeros(target.shape, ctx=context, dtype=target.dtype)
            private.append((target, grads[name], param.grad_req))
            bind_requests[name] = "write"
    aux = {name: params[name].data(context) for name in symbol.list_auxiliary_states()}
    try:
        if plan.backend == "segments":
            executor = segment_chain(plan, context, names, args, arrays, grads, bind_requests, aux)
        else:
            executor = symbol.bind(context, arrays, args_grad=grads, grad_req=bind_requests,
                                   aux_states=aux)
    except mx.base.MXNetError as error:
        raise GluonMirrorError(f"MXNet cannot bind the mirrored {type(block).__name__} ({error}); "
                               f"call unmirror(net) to train it plainly") from error
    return Slot(executor, fresh, list(aux.values()), private, written)


# NOTE [ executor segments behind a mirrored block ]
# With backend 'segments' (or 'auto' choosing them) a slot's "executor" is a
# SegmentChain (mx/segments): the traced symbol split at the plan's cuts, one
# executor per segment sharing one memory pool.  The chain offers what this package
# uses of an executor (arg_dict, grad_dict, grad_arrays, outputs, forward,
# backward), so the rest is unchanged: the forward in record runs every
# segment on the main thread keeping only the boundary tensors, the catcher copies
# the last segment's outputs, and `run_backward` calls chain.backward(head
# gradients) from the main thread, which runs the last segment's backward and then
# re-runs each earlier segment's forward and backward, last to first.  The chain is
# given the Parameters' own arrays (SegmentChain reuses shared arrays whose shape and
# dtype match), so its segments read the weights and write the gradients and
# BatchNorm statistics of the Parameters, as the one-level executor does:
#  * grad_req 'write': a Parameter read by one segment is written by it; one read by
#    several segments (weights an unrolled RNN shares over its steps) is bound 'add'
#    in each and zeroed by the chain before its backward; 'add' adds in every segment.
#    A second executor's private gradients go through the same path, then into the
#    Parameters' (`run_backward`).
#  * BatchNorm statistics are updated in the CPU backward only, once per iteration
#    (the re-run forward does not touch them; on the GPU the chain binds re-run
#    segments' BatchNorm with cudnn_off).  The aux arrays are the Parameters'.
#  * retain_graph: the second backward re-runs the whole chain's forward first.
#  * Inputs: the chain allocates its own input (and input-gradient) arrays.
# Networks drawing random numbers are refused by plan_with_segments ('segments') or
# kept one-level ('auto'): a re-run segment would draw new masks.
def segment_chain(plan: MirrorPlan, context: "mx.Context", names: List[str],
                  args: Sequence["mx.nd.NDArray"], arrays: Dict[str, "mx.nd.NDArray"],
                  grads: Dict[str, "mx.nd.NDArray"], requests: Dict[str, str],
                  aux: Dict[str, "mx.nd.NDArray"]) -> Any:
    """A :class:`~mxnet_mirror_hook.mx.segments.SegmentChain` of ``plan`` bound to the Parameters' arrays."""
    from ..mx.segments import SegmentChain

    if plan.segment_plan is None:
        raise GluonMirrorError(f"a {plan.backend!r} plan has no segments to bind; use backend='mirror'")
    params = {name: array for name, array in arrays.items() if name not in names}
    shared = {"arg": params, "grad": {name: grads[name] for name in params if name in grads},
              "aux": aux}
    chain = SegmentChain(plan.symbol, plan.segment_plan, context,
                         {name: tuple(x.shape) for name, x in zip(names, args)},
                         {name: np.dtype(x.dtype) for name, x in zip(names, args)},
                         requests, shared_arrays=shared)
    # The chain reuses a given array only when its shape and dtype match what it infers; a fresh
    # array would train a copy of the Parameter.
    given = [(chain.arg_dict, shared["arg"]), (chain.grad_dict, shared["grad"]), (chain.aux_dict, aux)]
    detached = [name for bound, wanted in given for name, array in wanted.items()
                if bound.get(name) is not array]
    if detached:
        raise GluonMirrorError(f"the executor segments could not be bound to the Parameters' own "
                               f"arrays ({detached[:3]}: shape or dtype differ from what the traced "
                               f"symbol infers); use backend='mirror' for this block")
    return chain
