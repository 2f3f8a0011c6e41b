"""The whole training footprint of a symbol (``core.footprint.Footprint``) from MXNet's shape and type
inference: parameters, gradients, optimizer state, auxiliary states, inputs, temporary workspace and
MKLDNN's reorder buffers, beside the plan's activation figure.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np

from .. import env
from ..core.units import MB
from ..core.footprint import (Footprint, TensorSpec, gradient_count, optimizer_state_bytes,
                              tensor_bytes)

__all__ = ["symbol_footprint", "optimizer_spec", "temp_space_bytes", "temp_space_copies", "NodeTensors",
           "node_tensors", "CPU_TEMP_COPY"]

logger = logging.getLogger(__name__)

#: MXNet's number of CPU temporary-space copies handed out round robin (``MXNET_CPU_TEMP_COPY``).
CPU_TEMP_COPY = "MXNET_CPU_TEMP_COPY"

OptimizerLike = Union[None, str, "mx.optimizer.Optimizer"]


def optimizer_spec(optimizer: OptimizerLike,
                   optimizer_params: Optional[Mapping[str, Any]] = None) -> Tuple[Optional[str], Dict]:
    """``(name, options)`` of an optimizer given by name (with its params) or as an instance."""
    if optimizer is None:
        return None, {}
    if isinstance(optimizer, str):
        return optimizer.lower(), dict(optimizer_params or {})
    options = {key: getattr(optimizer, key) for key in ("momentum", "centered", "multi_precision")
               if hasattr(optimizer, key)}
    return type(optimizer).__name__.lower(), options


@dataclass(frozen=True)
class NodeTensors:
    """One operator of a symbol with the shapes and dtypes of its visible inputs and outputs."""

    op: str
    name: str
    attrs: Mapping[str, str]
    inputs: Tuple[Optional[TensorSpec], ...]
    outputs: Tuple[TensorSpec, ...]


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype if dtype is not None else np.float32).name


def node_tensors(symbol: "mx.sym.Symbol", shapes: Mapping[str, tuple],
                 dtypes: Mapping[str, Any]) -> List[NodeTensors]:
    """Every operator node of ``symbol`` with its tensors' shapes and dtypes.

    The internals' outputs come in the JSON graph's node order, each node's visible outputs
    together, named ``<node>_<output>``; a node's run of names ends at the next node's name.
    """
    internals = symbol.get_internals()
    names = internals.list_outputs()
    _, out_shapes, _ = internals.infer_shape(**dict(shapes))
    _, out_types, _ = internals.infer_type(**dict(dtypes))
    specs = [(tuple(s), _dtype_name(t)) for s, t in zip(out_shapes, out_types)]
    nodes = json.loads(symbol.tojson())["nodes"]
    entries: List[List[TensorSpec]] = []
    position, found = 0, []
    for index, node in enumerate(nodes):
        if node["op"] == "null":
            entries.append([specs[position]])
            position += 1
            continue
        following = nodes[index + 1]["name"] if index + 1 < len(nodes) else None
        outputs = []
        while (position < len(names) and names[position].startswith(node["name"] + "_")
               and names[position] != following):
            outputs.append(specs[position])
            position += 1
        entries.append(outputs)
        inputs = tuple(entries[src][slot] if slot < len(entries[src]) else None
                       for src, slot, *_ in node["inputs"])
        found.append(NodeTensors(node["op"], node["name"], node.get("attrs", {}), inputs, tuple(outputs)))
    return found


def _tuple_attr(text: Optional[str]) -> Tuple[int, ...]:
    return tuple(int(v) for v in (text or "()").strip("()[] ").replace(" ", "").split(",") if v)


# NOTE [ temporary space beyond the static plan ]
# Measured with the storage profiler (per-operator timeline, MXNET_EXEC_BULK_EXEC_TRAIN=0),
# resnet50_v1b batch 8 on the CPU: the only allocations outside the static plan, the
# arguments, gradients and optimizer state are one temporary-space resource per executor
# (ResourceRequest::kTempSpace; MXNet hands a bound executor one of MXNET_CPU_TEMP_COPY
# copies, default 4, and every operator of that executor shares it).  A temp space grows to
# the largest request and is never shrunk:
# - Without MKLDNN it is the native convolution's im2col column buffer, one image at a time:
#   C_in * prod(kernel) * prod(output spatial) elements of the data's dtype (a deconvolution:
#   C_out * prod(kernel) * prod(input spatial)), requested even for 1x1 kernels.  resnet50:
#   conv1, 3*49*112*112 floats = 7.03 MB, whatever the batch.
# - With MKLDNN (float32 only), operators reorder between MKLDNN's blocked layouts and the
#   default layout through TmpMemMgr, which takes its buffer from the same temp space and
#   sizes it at TWICE the largest request it has seen (curr_size = mem_size * 2).  A request
#   is about the largest tensor the operator touches plus its weight: resnet50 batch 8 grows
#   it to 49.0 MB at BatchNorm's backward (2 x 24.5 MB, the 112x112x64 activation) and
#   49.07 MB at conv1's forward (2 x (24.5 MB output + 37 KB weight)).  A FullyConnected
#   requests its data only (its output and weight stay in the default layout): the LSTM
#   language model's classifier over (3200, 512) grows it to 12.5 MB although its output is
#   128 MB; one reading a 4-d activation in MKLDNN layout requests two (its data and the
#   data's gradient): small convnets without pooling before the classifier, 4.0 MB for a 1 MB
#   input.  The model takes the largest request of any one operator; TmpMemMgr in fact sizes
#   the buffer by everything requested since the last operator that set it up, so patterns
#   where two large reorders fall together (measured: an add of a BatchNorm output and a raw
#   convolution output, small_resnet's identical-size blocks) come out higher, by up to one
#   largest tensor times two (+2 MB on small_resnet's 15.5 MB peak).  Requests TmpMemMgr
#   cannot place are allocated by MKLDNN itself, outside MXNet's storage (not profiled).
# Weights are not kept in MKLDNN layout in training (only inference reorders them in place),
# so there is no persistent per-weight copy.  A chain of executors (segments) uses up to
# min(executors, MXNET_CPU_TEMP_COPY) copies, each grown by its own executors' operators;
# counted here as that many copies of the largest (an upper bound).  With MKLDNN a chain's
# requests double: measured resnet50_v1b batch 8, 4 segments, four temp spaces of 98.25 MB
# (4 x 24.5 MB, grown at Convolution and _copy: a segment's boundary arrays arrive in
# MKLDNN layout and are reordered beside the output), peak 1291 MB; without MKLDNN the same
# chain peaks with one 7 MB im2col buffer (868 MB; the 4 counted here are 21 MB too many).
# A Gluon block's cached
# graph requests temp space for its forward, its backward and its bulked imperative segments
# separately, round robin over all MXNET_CPU_TEMP_COPY copies, and TmpMemMgr's size is one
# per thread, so every copy grows to the full size: measured resnet50_v1b batch 8 with
# MKLDNN, four temp spaces of 49.07 MB after two steps (hybridize with static_alloc).

#: Operators whose float32 CPU kernels run through MKLDNN in MXNet 1.9.1 and reorder through
#: TmpMemMgr.
_MKLDNN_OPS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "BatchNorm", "Activation",
                         "Pooling", "LRN", "LeakyReLU", "softmax", "log_softmax"})
_WEIGHTED = frozenset({"Convolution", "Deconvolution"})


def _im2col_bytes(node: NodeTensors) -> int:
    """The column buffer of a native (non-MKLDNN) convolution or deconvolution, one image."""
    kernel = _tuple_attr(node.attrs.get("kernel"))
    data, out = node.inputs[0], node.outputs[0]
    if data is None or len(data[0]) < 3:
        return 0
    size = 1
    for extent in kernel:
        size *= extent
    if node.op == "Convolution":
        spatial = out[0][2:]
        channels = data[0][1]
    else:
        spatial = data[0][2:]
        channels = out[0][1]
    return tensor_bytes((channels * size,) + tuple(spatial), data[1])


def _mkldnn_request(node: NodeTensors) -> int:
    """One MKLDNN operator's TmpMemMgr request: its largest tensor, plus a convolution's weight;
    a FullyConnected's data (its N-d data and that data's gradient when it flattens)."""
    tensors = [t for t in node.inputs[:1] + node.outputs[:1] if t is not None]
    largest = max((tensor_bytes(*t) for t in tensors), default=0)
    data = node.inputs[0] if node.inputs else None
    if node.op == "FullyConnected":
        if data is None:
            return 0
        flattens = len(data[0]) > 2 and node.attrs.get("flatten", "True") in ("True", "true", "1")
        return (2 if flattens else 1) * tensor_bytes(*data)
    weight = node.inputs[1] if node.op in _WEIGHTED and len(node.inputs) > 1 else None
    return largest + (tensor_bytes(*weight) if weight is not None else 0)


def temp_space_copies(surface: str = "module", executors: int = 1, context: str = "cpu") -> int:
    """Temporary-space copies that grow to the full size (NOTE [ temporary space beyond the
    static plan ]): one per executor up to ``MXNET_CPU_TEMP_COPY`` (default 4) for ``Module``,
    all of them for a Gluon block; one on a GPU (``MXNET_GPU_TEMP_COPY`` defaults to 1)."""
    if context != "cpu":
        return 1
    available = max(1, env.read_int(CPU_TEMP_COPY, 4))
    return available if surface == "gluon" else max(1, min(int(executors), available))


def temp_space_bytes(nodes: Sequence[NodeTensors], context: str = "cpu",
                     mkldnn: Optional[bool] = None, chain: bool = False) -> Tuple[int, int]:
    """``(workspace, mkldnn_extra)`` bytes of one executor's temporary space (NOTE [ temporary
    space beyond the static plan ]): the native kernels' largest request, and what MKLDNN's
    doubled reorder buffer adds above it (0 off the CPU or without MKLDNN); in a ``chain`` of
    executors MKLDNN's requests are doubled (boundary arrays arrive in MKLDNN layout)."""
    if mkldnn is None:
        mkldnn = context == "cpu" and not env.mkldnn_switched_off()
    workspace, reorder = 0, 0
    for node in nodes:
        float32 = bool(node.outputs) and node.outputs[0][1] == "float32"
        on_mkldnn = mkldnn and float32 and node.op in _MKLDNN_OPS
        if on_mkldnn:
            reorder = max(reorder, (4 if chain else 2) * _mkldnn_request(node))
        elif node.op in ("Convolution", "Deconvolution"):
            workspace = max(workspace, _im2col_bytes(node))
    return workspace, max(0, reorder - workspace)


def _grad_reqs(arguments: Sequence[str], inputs: Sequence[str], grad_req: Union[str, Mapping[str, str]],
               fixed_param_names: Sequence[str], inputs_need_grad: bool) -> Dict[str, str]:
    """Every argument's ``grad_req`` as ``Module.bind`` sets it: inputs 'null' unless
    ``inputs_need_grad``, fixed parameters 'null', the rest as given."""
    reqs = {}
    for name in arguments:
        req = grad_req.get(name, "null") if isinstance(grad_req, Mapping) else grad_req
        if name in fixed_param_names or (name in inputs and not inputs_need_grad):
            req = "null"
        reqs[name] = req
    return reqs


# NOTE [ what Module and Gluon hold beside the executor ]
# Measured (storage profiler, per-phase markers): Module.init_params keeps its own copy of
# every parameter and auxiliary state (Module._arg_params/_aux_params, the arrays
# get_params returns), and the DataBatch a Module trains on is copied into the executor's
# own input arrays, so inputs are held twice.  A Gluon block's parameters are the arrays
# its cached graph runs on, and its inputs are the user's arrays: one copy each.  The
# executor's outputs live in the static plan.  Gluon's ``out.backward()`` creates the head
# gradient, ones of the outputs' shape (the LSTM language model's 3200 x 10000 softmax:
# 122 MB), which Module does not need for loss outputs; counted as the symbol's outputs (a
# loss computed outside the block has its own, usually (batch,), head gradient instead).
# On a GPU, Module's copies and the batch a data iterator yields are host (CPU) arrays: not
# device memory, not counted there.
# Temporary space on a GPU (cuDNN's workspace, at most each Convolution's `workspace`
# attribute, 1024 MB by default) is not measured here; the im2col figure stands in for it.
def symbol_footprint(symbol: "mx.sym.Symbol", shapes: Mapping[str, tuple], *,
                     activations_mb: float, dtypes: Optional[Mapping[str, Any]] = None,
                     input_names: Optional[Sequence[str]] = None,
                     grad_req: Union[str, Mapping[str, str]] = "write",
                     fixed_param_names: Sequence[str] = (), inputs_need_grad: bool = False,
                     optimizer: OptimizerLike = None, optimizer_params: Optional[Mapping[str, Any]] = None,
                     context: str = "cpu", mkldnn: Optional[bool] = None, surface: str = "module",
                     executors: int = 1) -> Footprint:
    """The whole footprint of training ``symbol`` on one device.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol (the user's; a mirrored symbol has the same arguments).
    shapes : mapping of str to tuple
        Shapes of the inputs (data and labels) on one device.
    activations_mb : float
        The plan's activation figure (MXNet's static plan of the symbol that runs).
    dtypes : mapping of str to dtype, optional
        Input dtypes (float32 where not given); parameters' dtypes follow from inference.
    input_names : sequence of str, optional
        The data and label names (default: the keys of ``shapes``); every other argument is
        a parameter.
    grad_req : str or mapping
        As for ``Module.bind`` (a mapping: per argument, absent ones 'null').
    fixed_param_names : sequence of str
        Parameters without gradient (and without optimizer state).
    inputs_need_grad : bool
        Whether the inputs get gradient arrays.
    optimizer : str or mx.optimizer.Optimizer, optional
        The optimizer (None: no state, as for inference or a not yet chosen optimizer).
    optimizer_params : mapping, optional
        Its options when given by name (``momentum``, ``centered``, ``multi_precision``).
    context : str
        ``'cpu'`` or ``'gpu'``: the device whose memory is counted (MKLDNN's buffers, Module's
        parameter copies and the batch's host copy are CPU memory, counted on the CPU only).
    mkldnn : bool, optional
        Whether MKLDNN runs (default: on the CPU unless ``MXNET_MKLDNN_ENABLED=0``).
    surface : str
        ``'module'`` (its parameter copies and a second copy of the inputs, NOTE [ what Module
        and Gluon hold beside the executor ]) or ``'gluon'`` (the head gradient of the outputs).
    executors : int
        Executors that run one after another (a segment chain): temporary-space copies.
    """
    if surface not in ("module", "gluon"):
        raise ValueError(f"surface must be 'module' or 'gluon', got {surface!r}")
    inputs = list(input_names) if input_names is not None else list(shapes)
    dtypes = {name: np.dtype(dtypes[name]) if dtypes and name in dtypes else np.float32
              for name in inputs}
    arguments = symbol.list_arguments()
    arg_shapes, out_shapes, aux_shapes = symbol.infer_shape(**dict(shapes))
    arg_types, out_types, aux_types = symbol.infer_type(**dtypes)
    args = {n: (tuple(s), _dtype_name(t)) for n, s, t in zip(arguments, arg_shapes, arg_types)}
    reqs = _grad_reqs(arguments, inputs, grad_req, fixed_param_names, inputs_need_grad)
    name, options = optimizer_spec(optimizer, optimizer_params)
    params = [n for n in arguments if n not in inputs]
    parts = {
        "parameters": sum(tensor_bytes(*args[n]) for n in params),
        "gradients": sum(gradient_count(reqs[n]) * tensor_bytes(*args[n]) for n in arguments),
        "optimizer_state": sum(optimizer_state_bytes(name, *args[n], options) for n in params
                               if reqs[n] != "null"),
        "auxiliary": sum(tensor_bytes(tuple(s), _dtype_name(t)) for s, t in zip(aux_shapes, aux_types)),
        "inputs": sum(tensor_bytes(*args[n]) for n in inputs if n in args),
    }
    if surface == "module" and context == "cpu":  # on a GPU both copies are host memory
        parts["parameter_copies"] = parts["parameters"] + parts["auxiliary"]
        parts["inputs"] *= 2
    if surface == "gluon":
        parts["head_gradients"] = sum(tensor_bytes(tuple(s), _dtype_name(t))
                                      for s, t in zip(out_shapes, out_types))
    workspace, reorder = temp_space_bytes(node_tensors(symbol, shapes, dtypes), context, mkldnn,
                                          chain=executors > 1)
    copies = temp_space_copies(surface, executors, context)
    parts.update(workspace=workspace * copies, mkldnn_copies=reorder * copies)
    found = Footprint.from_bytes(**parts, activations=float(activations_mb) * MB)
    logger.debug("%s", found.summary())
    return found
