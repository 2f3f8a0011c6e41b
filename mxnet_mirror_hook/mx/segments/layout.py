"""The chain's own arrays from MXNet's inference: the bindings of each variable, the gradient
requests they give, and the :class:`~mxnet_mirror_hook.core.segments.layout.ChainLayout` both the
chain and the static figure use."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from ...core.segments.layout import ChainLayout, HeadArrays
from ...core.segments.plan import Entry, SegmentPlan, as_entry
from ...core.segments.tensors import TensorSpec
from ...errors import ShapeError
from .gather import GatherLayout, find_gathers
from ..convert import json_node_keys
from .split import boundary_name, source_name

__all__ = ["reader_bindings", "shareable_gradients", "summed_request", "tensor_spec", "argument_types",
           "infer_arguments", "chain_tensors", "head_parts", "chain_layout", "ungraded_boundaries",
           "NO_GRADIENT_INPUTS"]

#: Operator inputs that get no gradient: indices, lengths, values only their shape is read of
#: (NOTE [ boundaries that get no gradient ]).
NO_GRADIENT_INPUTS: Dict[str, Tuple[int, ...]] = {
    "Embedding": (0,), "take": (1,), "pick": (1,), "batch_take": (1,), "gather_nd": (1,), "one_hot": (0,),
    "softmax": (1,), "log_softmax": (1,), "masked_softmax": (1,), "SequenceMask": (1,),
    "SequenceLast": (1,), "SequenceReverse": (1,), "_contrib_arange_like": (0,), "zeros_like": (0,),
    "ones_like": (0,), "shape_array": (0,), "size_array": (0,), "BlockGrad": (0,), "stop_gradient": (0,),
}


# NOTE [ boundaries that get no gradient ]
# A segment reads the tensors earlier segments made through variables, bound with a gradient
# request so that its backward hands their gradients back.  Some of those tensors have no
# gradient: integer lengths and indices, or anything read only where an operator takes no
# gradient (an Embedding's indices, a softmax's lengths, a value ``zeros_like`` reads the shape
# of).  Requesting one is not harmless in MXNet 1.9.1: an Embedding whose indices are asked a
# gradient fails in backward ("Embedding layer doesn't support calculate data gradient"), and a
# ``softmax(..., use_length=True)`` whose length is asked a gradient ('write') changes the
# gradient of its DATA (gluonnlp's masked self-attention: the query and key weights got a zero
# gradient, reproduced without the plugin in 20 lines).  The plain graph asks neither.  So such a
# boundary variable is bound with 'null' (its producer's backward then gets a zero head gradient
# for it, what the plain graph's gradient pass gives): an integer boundary always, a float one
# when every reader takes it at an input of NO_GRADIENT_INPUTS.
def ungraded_boundaries(symbol: "mx.sym.Symbol", boundaries: Mapping[str, Any]) -> frozenset:
    """Variables of ``symbol`` among ``boundaries`` (name -> dtype) to bind without a gradient
    (NOTE [ boundaries that get no gradient ])."""
    document = json.loads(symbol.tojson())
    nodes = document["nodes"]
    readers: Dict[str, List[Tuple[str, int]]] = {}
    for node in nodes:
        for slot, entry in enumerate(node["inputs"]):
            source = nodes[entry[0]]
            if source["op"] == "null":
                readers.setdefault(source["name"], []).append((node["op"], slot))
    ungraded = set()
    for name, dtype in boundaries.items():
        integer = np.issubdtype(np.dtype(dtype), np.integer)
        reads = readers.get(name, [])
        if integer or (reads and all(slot in NO_GRADIENT_INPUTS.get(op, ()) for op, slot in reads)):
            ungraded.add(name)
    return frozenset(ungraded)


def reader_bindings(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"]) -> Dict[str, int]:
    """Bindings of each argument and boundary over a chain's segments (NOTE [ one variable
    per reader ]: a segment may bind one several times); a chunked head reads its segment's
    variables and inputs once."""
    readers: Dict[str, int] = {}
    for index, segment in enumerate(plan.segments):
        if plan.head_chunks and index == plan.count - 1:
            names = list(segment.variables) + [boundary_name(e) for e in segment.inputs]
        else:
            names = [source_name(n) for n in symbols[index].list_arguments()]
        for name in names:
            readers[name] = readers.get(name, 0) + 1
    return readers


def shareable_gradients(plan: SegmentPlan, gathers: Mapping[int, Any],
                        gathered: Mapping[Entry, Any], readers: Mapping[str, int]) -> List[Entry]:
    """Boundaries whose gradient array may be shared (NOTE [ boundary gradients share arrays ]
    in core/segments/layout.py): bound once, so written with 'write', and not gathered."""
    merged = {as_entry(e) for index in gathers for e in plan.segments[index].outputs}
    return [as_entry(e) for e in plan.boundaries
            if readers.get(boundary_name(e), 0) == 1 and as_entry(e) not in gathered
            and as_entry(e) not in merged]


def summed_request(request: str, readers: int) -> str:
    """The gradient request a segment binds for a variable the user asked ``request`` of:
    'null' stays, a variable bound by several readers (segments, or readers inside one: NOTE [
    one variable per reader ]) sums its gradients ('add'), and 'inplace' is 'write'."""
    if request == "null":
        return "null"
    return "add" if readers > 1 else ("write" if request == "inplace" else request)



def tensor_spec(shape: Sequence[int], dtype: Any) -> TensorSpec:
    """The :class:`TensorSpec` of an array of ``shape`` and NumPy-understood ``dtype``."""
    kind = np.dtype(dtype)
    return TensorSpec(tuple(int(d) for d in shape), kind.itemsize, kind.name)


def argument_types(input_shapes: Mapping[str, Any], type_dict: Optional[Mapping[str, Any]]
                   ) -> Dict[str, Any]:
    """The input types a chain binds with: float32 unless ``type_dict`` says otherwise."""
    types: Dict[str, Any] = {name: np.float32 for name in input_shapes}
    types.update(type_dict or {})
    return types


def infer_arguments(symbol: "mx.sym.Symbol", input_shapes: Mapping[str, Tuple[int, ...]],
                    types: Mapping[str, Any]) -> Tuple[list, list, list, list]:
    """Shapes and types of the arguments and auxiliary states of ``symbol`` (MXNet's inference
    from the inputs): ``(arg_shapes, arg_types, aux_shapes, aux_types)`` in MXNet's order."""
    arg_shapes, _, aux_shapes = symbol.infer_shape(**input_shapes)
    arg_types, _, aux_types = symbol.infer_type(**types)
    if arg_shapes is None:
        raise ShapeError("the input shapes do not determine every argument's shape; give the "
                         "shapes of all data and label inputs")
    return arg_shapes, arg_types, aux_shapes, aux_types


def chain_tensors(plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"],
                  arguments: Mapping[str, TensorSpec]) -> Tuple[Dict[Entry, TensorSpec], List[TensorSpec]]:
    """Every boundary's and the last segment's outputs' :class:`TensorSpec`, inferred segment by
    segment from the full symbol's ``arguments`` (each segment's element types are MXNet's)."""
    known = dict(arguments)
    boundaries: Dict[Entry, TensorSpec] = {}
    for index, (segment, sym) in enumerate(zip(plan.segments, symbols)):
        if index == plan.count - 1 and plan.head_chunks:
            return boundaries, []   # a chunked head allocates its own output
        specs = _segment_outputs(sym, known)
        if index == plan.count - 1:
            return boundaries, specs
        for entry, spec in zip(segment.outputs, specs):
            boundaries[entry] = known[boundary_name(entry)] = spec
    return boundaries, []


def _segment_outputs(sym: "mx.sym.Symbol", known: Mapping[str, TensorSpec]) -> List[TensorSpec]:
    """The outputs of a segment symbol whose arguments stand for ``known`` tensors."""
    names = sym.list_arguments()
    given = {n: known[source_name(n)] for n in names if source_name(n) in known}
    _, out_shapes, _ = sym.infer_shape(**{n: s.shape for n, s in given.items()})
    _, out_types, _ = sym.infer_type(**{n: s.dtype for n, s in given.items()})
    return [tensor_spec(shape, dtype) for shape, dtype in zip(out_shapes, out_types)]


def head_parts(document: Mapping[str, Any], plan: SegmentPlan
               ) -> Tuple[Dict[str, Any], Dict[str, Any], Entry, str, Optional[str], str]:
    """The chunked head of ``plan`` in the full symbol's JSON ``document``: its FullyConnected
    and SoftmaxOutput nodes, the classifier's input, weight, bias (None) and label names."""
    segment = plan.segments[-1]
    keys = json_node_keys(document["nodes"])  # NOTE [ nodes are identified by key, not by name ]
    nodes = dict(zip(keys, document["nodes"]))
    softmax = next(nodes[key] for key in segment.nodes if nodes[key]["op"] == "SoftmaxOutput")
    fc = next(nodes[key] for key in segment.nodes if nodes[key]["op"] == "FullyConnected")
    inputs = document["nodes"]
    data = (keys[fc["inputs"][0][0]], int(fc["inputs"][0][1]))
    weight = inputs[fc["inputs"][1][0]]["name"]
    bias = inputs[fc["inputs"][2][0]]["name"] if len(fc["inputs"]) > 2 else None
    label = next(n for n in segment.variables if n not in (weight, bias))
    return fc, softmax, data, weight, bias, label


def _head_arrays(document: Mapping[str, Any], plan: SegmentPlan, boundaries: Mapping[Entry, TensorSpec],
                 arguments: Mapping[str, TensorSpec], requests: Mapping[str, str],
                 readers: Mapping[str, int]) -> HeadArrays:
    """The :class:`HeadArrays` of ``plan``'s chunked head (requests as the chain binds them)."""
    _, _, data, weight, bias, _ = head_parts(document, plan)
    rows, hidden = boundaries[data].shape
    weight_req = summed_request(requests.get(weight, "null"), readers.get(weight, 0))
    bias_req = summed_request(requests.get(bias, "null"), readers.get(bias, 0)) if bias else "null"
    data_req = "add" if readers.get(boundary_name(data), 0) > 1 else "write"
    return HeadArrays(rows, hidden, arguments[weight].shape[0], plan.head_chunks, data_req, weight_req,
                      bias_req, boundaries[data].itemsize, boundaries[data].dtype)


def chain_layout(symbol: "mx.sym.Symbol", plan: SegmentPlan, symbols: Sequence["mx.sym.Symbol"],
                 arguments: Mapping[str, TensorSpec], requests: Mapping[str, str]
                 ) -> Tuple[ChainLayout, Dict[int, GatherLayout], Dict[Entry, List[Tuple[int, int, int]]]]:
    """The :class:`ChainLayout` of a chain of ``symbols`` (``split_symbol(symbol, plan)``) bound
    with ``arguments`` (the full symbol's) and the user's gradient ``requests``, with its
    gathering segments and where each gathered boundary goes (NOTE [ the chain's own arrays ])."""
    boundaries, outputs = chain_tensors(plan, symbols, arguments)
    shapes = {n: spec.shape for n, spec in arguments.items()}
    shapes.update({boundary_name(e): spec.shape for e, spec in boundaries.items()})
    gathers, gathered = find_gathers(plan, symbols, shapes)
    readers = reader_bindings(plan, symbols)
    shareable = frozenset(shareable_gradients(plan, gathers, gathered, readers))
    head = None
    if plan.head_chunks:
        head = _head_arrays(json.loads(symbol.tojson()), plan, boundaries, arguments, requests, readers)
    layout = ChainLayout(plan, boundaries, frozenset(gathers), {e: tuple(p) for e, p in gathered.items()},
                         shareable, tuple(outputs) if plan.count > 1 else (), head)
    return layout, gathers, gathered
