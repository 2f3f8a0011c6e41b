"""Symbol + input shapes -> :class:`~mxnet_mirror_hook.core.graph.Graph`."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from ..core.graph import Graph, Node, NodeKind, repeat_keys
from ..errors import ShapeError
from .bind import mxnet_error_line

__all__ = ["InputSpec", "normalize_inputs", "symbol_to_graph", "structure_hash", "MIRROR_ATTR",
           "attr_true", "structural_graph", "rebuild_nodes",
           "json_node_keys", "load_rewritten"]

#: The attribute MXNet's gradient pass reads (``_set_attr(force_mirroring=...)`` writes it).
MIRROR_ATTR = "__force_mirroring__"


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of one data or label input."""

    name: str
    shape: Tuple[int, ...]
    dtype: str = "float32"


def _as_shape(name: str, shape: Any) -> Tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ShapeError(f"shape of input {name!r} must be a tuple of ints, got {shape!r}") from None
    if not dims:
        raise ShapeError(f"shape of input {name!r} is empty; give every dimension, batch first")
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ShapeError(
                f"shape of input {name!r} must hold positive ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def normalize_inputs(shapes: Any, kind: str = "data") -> List[InputSpec]:
    """Accept shapes as ``Module.bind`` does and return :class:`InputSpec` objects.

    Parameters
    ----------
    shapes : list of DataDesc, list of (name, shape), dict of name -> shape, or None
        Typically ``data_iter.provide_data``.
    kind : str
        ``"data"`` or ``"label"``, for error messages.

    Raises
    ------
    ShapeError
        For malformed entries or a name given twice.
    """
    if shapes is None:
        return []
    if isinstance(shapes, Mapping):
        items: Iterable[Any] = list(shapes.items())
    elif isinstance(shapes, (list, tuple)):
        items = shapes
    else:
        raise ShapeError(f"{kind}_shapes must be a list of (name, shape) or DataDesc, got {shapes!r}")
    specs: "OrderedDict[str, InputSpec]" = OrderedDict()
    for item in items:
        if isinstance(item, mx.io.DataDesc):
            name, shape = item.name, item.shape
            dtype = np.dtype(item.dtype).name
        else:
            try:
                name, shape = item[0], item[1]
            except (TypeError, IndexError, KeyError):
                raise ShapeError(
                    f"each entry of {kind}_shapes must be (name, shape) or a DataDesc, "
                    f"got {item!r}") from None
            dtype = np.dtype(item[2]).name if len(item) > 2 and item[2] is not None else "float32"
        if not isinstance(name, str):
            raise ShapeError(f"input names in {kind}_shapes must be str, got {name!r}")
        if name in specs:
            raise ShapeError(f"input {name!r} is given twice in {kind}_shapes")
        specs[name] = InputSpec(name, _as_shape(name, shape), dtype)
    return list(specs.values())


# NOTE [ quiet inference ]
# ``Symbol.infer_shape`` and ``infer_type`` wrap ``_infer_shape_impl`` /
# ``_infer_type_impl``: on an MXNetError they ``print`` "infer_shape error.
# Arguments: ..." to stdout before re-raising, and on an incomplete answer they
# warn.  We raise our own ShapeError with the same facts, so we call the
# implementations directly (same arguments, same results: ``(None, None, None)``
# when incomplete).  Should a later MXNet drop them, the public methods run with
# stdout captured and warnings silenced instead.


def _quiet(symbol: "mx.sym.Symbol", what: str, partial: bool, values: Dict[str, Any]) -> tuple:
    """``symbol.infer_<what>[_partial](**values)`` without MXNet's prints and warnings."""
    implementation = getattr(symbol, f"_infer_{what}_impl", None)
    if implementation is not None:
        return implementation(partial, **values)
    public = getattr(symbol, f"infer_{what}_partial" if partial else f"infer_{what}")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return public(**values)


def _infer(symbol: "mx.sym.Symbol", inputs: Sequence[InputSpec]) -> Tuple[list, list, list, list]:
    shapes = {spec.name: spec.shape for spec in inputs}
    types = {spec.name: np.dtype(spec.dtype) for spec in inputs}
    internals = symbol.get_internals()
    try:
        arg_shapes, out_shapes, aux_shapes = _quiet(internals, "shape", False, shapes)
    except mx.base.MXNetError as error:
        raise ShapeError(
            f"MXNet cannot infer shapes from {shapes}: {mxnet_error_line(error)}. Check that every "
            f"data and label shape has the rank and layout the symbol expects (batch first, "
            f"e.g. NCHW).") from None
    if arg_shapes is None or out_shapes is None or any(s is None for s in out_shapes):
        partial, _, _ = _quiet(symbol, "shape", True, shapes)
        unknown = [name for name, shape in zip(symbol.list_arguments(), partial or [])
                   if not shape or 0 in shape]
        raise ShapeError(
            f"cannot infer the shapes of {unknown[:6]}{' ...' if len(unknown) > 6 else ''} from "
            f"{shapes}; give the shape of every data and label input in data_shapes/label_shapes")
    try:
        _, out_types, _ = _quiet(internals, "type", False, types)
    except mx.base.MXNetError as error:
        raise ShapeError(f"MXNet cannot infer dtypes from {types}: {mxnet_error_line(error)}") from None
    if out_types is None:
        out_types = [np.float32] * len(out_shapes)
    return arg_shapes, out_shapes, aux_shapes, [t if t is not None else np.float32 for t in out_types]


def check_inputs(symbol: "mx.sym.Symbol", inputs: Sequence[InputSpec]) -> None:
    """Raise :class:`ShapeError` when an input is not an argument of ``symbol``."""
    arguments = symbol.list_arguments()
    unknown = [spec.name for spec in inputs if spec.name not in arguments]
    if unknown:
        raise ShapeError(
            f"inputs {unknown} are not arguments of the symbol; its arguments are {arguments}")


def _outputs_per_node(json_nodes: List[Dict[str, Any]],
                      output_names: List[str]) -> Optional[List[List[int]]]:
    """Group the internal outputs by producing node, from their names.

    Internal outputs are listed in the JSON's node order (both come from the
    same depth-first traversal); a variable's output is its name, an
    operator's are ``<node>_<output>``.  Returns ``None`` if the names do not
    follow that pattern.
    """
    per_node: List[List[int]] = []
    cursor = 0
    for position, node in enumerate(json_nodes):
        name = node["name"]
        if cursor >= len(output_names):
            return None
        if node["op"] == "null":
            if output_names[cursor] != name:
                return None
            per_node.append([cursor])
            cursor += 1
            continue
        prefix = name + "_"
        if not output_names[cursor].startswith(prefix):
            return None
        indices = [cursor]
        cursor += 1
        following = json_nodes[position + 1] if position + 1 < len(json_nodes) else None
        while cursor < len(output_names) and output_names[cursor].startswith(prefix):
            if following is not None and (
                    output_names[cursor] == following["name"] if following["op"] == "null"
                    else output_names[cursor].startswith(following["name"] + "_")):
                break
            indices.append(cursor)
            cursor += 1
        per_node.append(indices)
    return per_node if cursor == len(output_names) else None


def _outputs_per_node_slow(json_nodes: List[Dict[str, Any]], internals: "mx.sym.Symbol",
                           count: int) -> List[List[int]]:
    per_node: List[List[int]] = []
    cursor = 0
    for json_node in json_nodes:
        indices = []
        while cursor < count and internals[cursor].name == json_node["name"]:
            indices.append(cursor)
            cursor += 1
            if json_node["op"] == "null":
                break
        per_node.append(indices)
    if cursor != count:
        raise RuntimeError("internal outputs and JSON nodes disagree; please report this symbol")
    return per_node


def json_node_keys(json_nodes: Sequence[Dict[str, Any]]) -> List[str]:
    """The key of every node of a symbol's JSON, by position: the keys the :class:`Graph` built
    from it gives its nodes (NOTE [ nodes are identified by key, not by name ] in core/graph.py)."""
    return repeat_keys([node["name"] for node in json_nodes])


def _uniquely_named(symbol: "mx.sym.Symbol", document: Dict[str, Any], keys: Sequence[str],
                    ) -> Tuple["mx.sym.Symbol", List[Dict[str, Any]]]:
    """``symbol`` and its JSON nodes with every operator renamed to its key, when some names
    repeat (else both as they are).

    Internal outputs are named after their operator (``<name>_output``), so with repeated
    names they could not be told apart by name; the renamed copy is only read (outputs,
    shapes, dtypes), never bound or returned.  Variables keep their names (the inputs' shapes
    are given by name).
    """
    nodes = document["nodes"]
    if all(node["name"] == key for node, key in zip(nodes, keys)):
        return symbol, nodes
    renamed = [node if node["op"] == "null" or node["name"] == key else dict(node, name=key)
               for node, key in zip(nodes, keys)]
    return mx.sym.load_json(json.dumps(dict(document, nodes=renamed))), renamed


def symbol_to_graph(symbol: "mx.sym.Symbol", inputs: Sequence[InputSpec],
                    input_names: Optional[Iterable[str]] = None,
                    document: Optional[Dict[str, Any]] = None,
                    keep_ops: Iterable[str] = ()) -> Graph:
    """Build the forward graph of ``symbol`` at the given input shapes.

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol (with its loss).
    inputs : sequence of InputSpec
        Data and label shapes.
    input_names : iterable of str, optional
        Extra argument names that are per-batch inputs (labels whose shape
        MXNet infers); by default the label inputs of loss operators.
    document : dict, optional
        ``json.loads(symbol.tojson())``, when the caller has it already.
    keep_ops : iterable of str
        Operator types never to recompute (their nodes are ``pinned``).

    Returns
    -------
    Graph
        Nodes in the JSON's order; a repeated name gets a key (``name#k``).

    Raises
    ------
    ShapeError
        When shapes are missing, of the wrong rank, or contradict the symbol.
    """
    check_inputs(symbol, inputs)
    if document is None:
        document = json.loads(symbol.tojson())
    json_nodes = document["nodes"]
    readable, readable_nodes = _uniquely_named(symbol, document, json_node_keys(json_nodes))
    internals = readable.get_internals()
    output_names = internals.list_outputs()
    _, out_shapes, _, out_types = _infer(readable, inputs)

    per_node = _outputs_per_node(readable_nodes, output_names)
    if per_node is None:  # unusual output names: ask MXNet node by node (slower)
        per_node = _outputs_per_node_slow(readable_nodes, internals, len(output_names))

    keep = frozenset(keep_ops)
    given = {spec.name for spec in inputs}
    auxiliary = set(symbol.list_auxiliary_states())
    nodes: List[Node] = []
    for json_node, indices in zip(json_nodes, per_node):
        name, op = json_node["name"], json_node["op"]
        if op == "null":
            if name in auxiliary:
                kind = NodeKind.AUX
            elif name in given:
                kind = NodeKind.INPUT
            else:  # a parameter (labels MXNet infers are found below)
                kind = NodeKind.PARAM
        else:
            kind = NodeKind.OP
        attrs = dict(json_node.get("attrs", json_node.get("attr", json_node.get("param", {}))) or {})
        shapes = [tuple(out_shapes[i]) for i in indices]
        itemsize = np.dtype(out_types[indices[0]]).itemsize if indices else 4
        node_inputs = [(int(entry[0]), int(entry[1])) for entry in json_node.get("inputs", [])]
        nodes.append(Node(name, op, kind, node_inputs, shapes, itemsize, attrs,
                          pinned=op in keep))
    graph = Graph(nodes, [(int(h[0]), int(h[1])) for h in document["heads"]])
    extra = set(input_names) if input_names is not None else {
        graph.nodes[i].symbol_name for i in graph.label_input_indices()}
    for node in graph.nodes:
        if node.kind is NodeKind.PARAM and node.symbol_name in extra:
            node.kind = NodeKind.INPUT
    return graph


def structure_hash(symbol: "mx.sym.Symbol", document: Optional[Dict[str, Any]] = None) -> str:
    """A hash of the symbol's structure, ignoring mirroring attributes.

    Two symbols with the same operators, parameters, names and user attributes
    (``mirror_stage`` included) hash the same, whatever plan was applied.
    ``document`` is ``json.loads(symbol.tojson())`` when the caller has it.
    """
    import hashlib

    if document is None:
        document = json.loads(symbol.tojson())
    nodes = []
    for node in document["nodes"]:
        attrs = node.get("attrs")
        if attrs and MIRROR_ATTR in attrs:
            node = dict(node, attrs={k: v for k, v in attrs.items() if k != MIRROR_ATTR})
        nodes.append(node)
    canonical = json.dumps({"nodes": nodes, "heads": document["heads"],
                            "arg_nodes": document.get("arg_nodes")}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def rebuild_nodes(document: Dict[str, Any], removed: Iterable[int],
                  replace: Callable[[int, Dict[str, Any], Dict[int, int]], Optional[Dict[str, Any]]]
                  ) -> Tuple[List[Dict[str, Any]], List[List[int]]]:
    """The nodes of a symbol's JSON ``document`` without the positions ``removed``, each either
    ``replace(position, node, remap)`` (``remap``: old position -> new, for the nodes so far) or,
    when that is None, the node with its inputs remapped; and the heads remapped.  For rewrites
    that put one node where several were (their inputs must precede them, as in ``document``)."""
    gone = set(removed)
    out: List[Dict[str, Any]] = []
    remap: Dict[int, int] = {}
    for position, node in enumerate(document["nodes"]):
        if position in gone:
            continue
        new = replace(position, node, remap)
        out.append(new if new is not None else
                   {**node, "inputs": [[remap[e[0]], e[1], e[2]] for e in node["inputs"]]})
        remap[position] = len(out) - 1
    return out, [[remap[e[0]], e[1], e[2]] for e in document["heads"]]


def load_rewritten(symbol: "mx.sym.Symbol", nodes: List[Dict[str, Any]], heads: List[List[int]],
                   attrs: Mapping[str, Any], refusal: str) -> "mx.sym.Symbol":
    """The symbol of a rewritten JSON graph (``nodes`` in topological order, ``heads``), checked to
    keep ``symbol``'s arguments, outputs and auxiliary states.

    Raises
    ------
    ValueError
        ``refusal`` (what changed them and what to do), when the rewrite changed any of them.
    """
    document = {"nodes": nodes, "arg_nodes": [i for i, n in enumerate(nodes) if n["op"] == "null"],
                "heads": heads, "attrs": dict(attrs)}
    result = mx.sym.load_json(json.dumps(document))
    if (result.list_arguments() != symbol.list_arguments()
            or result.list_outputs() != symbol.list_outputs()
            or result.list_auxiliary_states() != symbol.list_auxiliary_states()):
        raise ValueError(refusal)
    return result


def attr_true(value: Any) -> bool:
    """Whether an operator parameter as MXNet's JSON spells it (``'True'``, ``'1'``...) is true."""
    return str(value) in ("True", "true", "1")


def structural_graph(document: Dict[str, Any]) -> Graph:
    """A shapeless :class:`Graph` of a symbol's JSON (operators, attributes, edges), for pattern
    finding; positions are the JSON's."""
    nodes = []
    for json_node in document["nodes"]:
        kind = NodeKind.PARAM if json_node["op"] == "null" else NodeKind.OP
        nodes.append(Node(json_node["name"], json_node["op"], kind,
                          [(entry[0], entry[1]) for entry in json_node["inputs"]],
                          attrs=dict(json_node.get("attrs") or {})))
    return Graph(nodes, [(entry[0], entry[1]) for entry in document["heads"]])
