"""The whole memory footprint of training a network: every part in MB, with a total.

MXNet's static plan (``Total N MB allocated``, the figure the plugin plans against) holds
the intermediate activations only.  A training process also holds the parameters, their
gradients, the optimizer's state, auxiliary states, the inputs, temporary workspace and, on
a CPU with MKLDNN, MKLDNN's reorder buffers.  :class:`Footprint` names each part;
:func:`optimizer_state_bytes` says what ``mx.optimizer`` allocates per weight.  Pure Python
(no MXNet): the adapter (``mx/footprint.py``) reads the shapes and dtypes from a symbol.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .units import to_mb

__all__ = ["Footprint", "TensorSpec", "optimizer_state_bytes", "optimizer_state_tensors",
           "known_optimizers", "dtype_bytes", "tensor_bytes", "gradient_count"]

#: Bytes per element of the dtypes MXNet's NDArrays hold.
_DTYPE_BYTES = {"float16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1, "int32": 4,
                "int64": 8, "bool": 1, "bfloat16": 2}

#: (shape, dtype) of one tensor.
TensorSpec = Tuple[Tuple[int, ...], str]


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (a name such as ``'float16'``, or a numpy dtype / type)."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    try:
        return _DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPE_BYTES)}") from None


def _size(shape: Sequence[int]) -> int:
    count = 1
    for extent in shape:
        count *= int(extent)
    return count


def tensor_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of one dense tensor."""
    return _size(shape) * dtype_bytes(dtype)


def gradient_count(grad_req: str) -> int:
    """Gradient arrays a bind allocates for one argument: none for ``'null'``, else one.

    ``'add'`` accumulates into the same single array as ``'write'`` (MXNet keeps no second copy).
    """
    if grad_req not in ("null", "write", "add"):
        raise ValueError(f"grad_req must be 'null', 'write' or 'add', got {grad_req!r}")
    return 0 if grad_req == "null" else 1


# NOTE [ optimizer state as MXNet 1.9.1 allocates it ]
# Read from mxnet/optimizer/optimizer.py (create_state / create_state_multi_precision) and
# gluonnlp 0.10's BERTAdam.  The updater calls create_state_multi_precision once per weight
# that has a gradient (Module skips weights whose gradient is None, i.e. grad_req 'null').
# - "like": arrays of the weight's dtype (zeros(..., dtype=weight.dtype)).
# - "f32": zeros(weight.shape, ctx) without a dtype: MXNet's default float32 whatever the
#   weight's dtype (AdaGrad, RMSProp, AdaDelta, Ftrl, Test) -- a float64 network's RMSProp
#   state is half the size of its weights.
# - multi_precision=True with a float16 weight: a float32 master copy of the weight, and the
#   state created on that copy (so "like" states are float32 too).  Every optimizer does this,
#   either through the base class or its own override (SGD, NAG, LARS, LBSGD, BERTAdam).
# - Momentum optimizers (sgd, nag, lars, lbsgd, signum, dcasgd) allocate the momentum only
#   when momentum != 0; the defaults differ (signum 0.9, the others 0.0).
# - DCASGD also keeps a copy of the previous weight; GroupAdaGrad one float32 value per row.
# MXNet has no AdamW optimizer class in 1.9.1 (only the adamw_update operator); gluonnlp 0.10
# has BERTAdam only.
#: name -> (kind, arrays, momentum option default or None).  kind: 'like' or 'f32'.
_STATES: Dict[str, Tuple[str, int, Optional[float]]] = {
    "sgd": ("like", 1, 0.0), "ccsgd": ("like", 1, 0.0), "nag": ("like", 1, 0.0),
    "lars": ("like", 1, 0.0), "lbsgd": ("like", 1, 0.0), "signum": ("like", 1, 0.9),
    "sgld": ("like", 0, None),
    "adam": ("like", 2, None), "adamax": ("like", 2, None), "nadam": ("like", 2, None),
    "lamb": ("like", 2, None), "bertadam": ("like", 2, None), "ftml": ("like", 3, None),
    "adagrad": ("f32", 1, None), "adadelta": ("f32", 2, None), "ftrl": ("f32", 2, None),
    "rmsprop": ("f32", 1, None), "test": ("f32", 1, None),
    "dcasgd": ("like", 1, 0.0), "groupadagrad": ("f32", 1, None),
}


def known_optimizers() -> Tuple[str, ...]:
    """Optimizer names (lower case, as ``mx.optimizer.create`` takes them) the model knows."""
    return tuple(sorted(_STATES))


def optimizer_state_tensors(optimizer: str, shape: Sequence[int], dtype: str,
                            options: Optional[Mapping[str, Any]] = None) -> Tuple[TensorSpec, ...]:
    """The arrays ``optimizer`` allocates for one weight (NOTE [ optimizer state as MXNet 1.9.1
    allocates it ]), the float32 master copy of ``multi_precision`` included.

    Parameters
    ----------
    optimizer : str
        An optimizer name (case ignored), e.g. ``'sgd'``, ``'adam'``, ``'BERTAdam'``.
    shape : sequence of int
        The weight's shape.
    dtype : str
        The weight's dtype name.
    options : mapping, optional
        The optimizer's options (``momentum``, ``centered``, ``multi_precision``).

    Raises
    ------
    ValueError
        If the optimizer is not one the model knows.
    """
    name = optimizer.lower()
    if name not in _STATES:
        known = ", ".join(known_optimizers())
        raise ValueError(f"unknown optimizer {optimizer!r}: the footprint knows {known}")
    options = dict(options or {})
    shape = tuple(int(e) for e in shape)
    kind, arrays, momentum_default = _STATES[name]
    master: Tuple[TensorSpec, ...] = ()
    if options.get("multi_precision") and dtype == "float16":
        master, dtype = ((shape, "float32"),), "float32"
    if momentum_default is not None and float(options.get("momentum", momentum_default)) == 0.0:
        arrays = 0
    if name == "rmsprop" and options.get("centered"):
        arrays = 3
    state_shape = (shape[0], 1) if name == "groupadagrad" else shape
    state_dtype = dtype if kind == "like" else "float32"
    states = tuple((state_shape, state_dtype) for _ in range(arrays))
    if name == "dcasgd":  # the previous weight, whatever the momentum
        states += ((shape, dtype),)
    return master + states


def optimizer_state_bytes(optimizer: Optional[str], shape: Sequence[int], dtype: str,
                          options: Optional[Mapping[str, Any]] = None) -> int:
    """Bytes of :func:`optimizer_state_tensors` (0 without an optimizer)."""
    if optimizer is None:
        return 0
    return sum(tensor_bytes(s, d) for s, d in optimizer_state_tensors(optimizer, shape, dtype, options))


@dataclass(frozen=True)
class Footprint:
    """The memory of training one network on one device, part by part, in MB.

    Attributes
    ----------
    parameters : float
        The executor's learnable arguments (every argument that is not an input).
    gradients : float
        One array per argument whose ``grad_req`` is not ``'null'`` (inputs with
        ``inputs_need_grad`` included).
    optimizer_state : float
        What the optimizer allocates for the weights it updates (multi-precision master
        copies included).
    auxiliary : float
        Auxiliary states (BatchNorm's moving mean and variance).
    parameter_copies : float
        ``Module``'s own copy of the parameters and auxiliary states (``_arg_params``,
        ``_aux_params``); 0 for Gluon, whose parameters are the executor's arrays.
    inputs : float
        Data and labels: the executor's input arrays and, for ``Module``, the batch the data
        iterator hands it (copied into them).
    head_gradients : float
        Gluon: the gradient ``backward()`` creates for the outputs it is called on (ones of their
        shape); ``Module`` needs none for loss outputs.
    activations : float
        The plan's figure of intermediate activations (MXNet's static plan).
    workspace : float
        Temporary space operators request (``kTempSpace``): convolution's im2col buffer.
    mkldnn_copies : float
        On a CPU with MKLDNN, the temporary space its reorders add above ``workspace``.
    fused_space : float
        What a plan's fused operators keep outside MXNet's static plan: their buffers and the
        kept attention-dropout masks (``MirrorPlan.outside_plan_mb``; NOTE [ fused
        recomputation ] in core/fused.py).
    """

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer_state: float = 0.0
    auxiliary: float = 0.0
    parameter_copies: float = 0.0
    inputs: float = 0.0
    head_gradients: float = 0.0
    activations: float = 0.0
    workspace: float = 0.0
    mkldnn_copies: float = 0.0
    fused_space: float = 0.0

    @property
    def total(self) -> float:
        """Every part summed (MB)."""
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def beside_activations(self) -> float:
        """Everything but the activations (MB): what a plan cannot change."""
        return self.total - self.activations

    def to_dict(self) -> Dict[str, float]:
        """The parts and ``total``, in MB."""
        parts = asdict(self)
        parts["total"] = self.total
        return parts

    def summary(self) -> str:
        """One line: the total and its parts."""
        names = {"parameters": "params", "gradients": "grads", "optimizer_state": "optimizer",
                 "auxiliary": "aux", "parameter_copies": "param copies", "inputs": "inputs",
                 "head_gradients": "head grads", "activations": "activations",
                 "workspace": "workspace", "mkldnn_copies": "mkldnn", "fused_space": "fused"}
        parts = ", ".join(f"{label} {getattr(self, name):.0f}" for name, label in names.items()
                          if getattr(self, name) >= 0.5)
        return f"footprint {self.total:.0f} MB ({parts})"

    @classmethod
    def from_bytes(cls, **parts: float) -> "Footprint":
        """A footprint from parts given in bytes."""
        return cls(**{name: to_mb(value) for name, value in parts.items()})
