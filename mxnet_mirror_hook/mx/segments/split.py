"""Symbol surgery: the segment symbols of a plan, cut out of the full symbol's JSON."""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx

from ...core.segments.plan import Entry, SegmentPlan, SegmentSpec
from ..convert import MIRROR_ATTR, json_node_keys

__all__ = ["boundary_name", "reader_name", "source_name", "segment_documents", "split_symbol"]


def boundary_name(entry: Entry) -> str:
    """Name of the variable that stands for a boundary tensor in the segments reading it."""
    return f"{entry[0]}_output{entry[1]}_segment_boundary"


_READER = re.compile(r"_segment_reader\d+$")


def reader_name(name: str, reader: int) -> str:
    """Name of the ``reader``-th copy of argument ``name`` in a segment (NOTE [ one variable per
    reader ])."""
    return f"{name}_segment_reader{reader}"


def source_name(name: str) -> str:
    """The argument a segment variable stands for (itself unless :func:`reader_name` made it)."""
    return _READER.sub("", name)


# NOTE [ splitting by JSON ]
# Symbol composition only substitutes free variables, so an internal output
# cannot be replaced by a variable through the symbol API.  Instead each
# segment is a new node list: its operators (original order, which is
# topological), the variables they read, and one new variable per boundary
# tensor it reads (placed first); inputs are re-indexed, ``arg_nodes`` and
# ``heads`` rebuilt, and ``mx.sym.load_json`` parses the result.  Operators
# listed in the segment's ``mirrored`` set get ``force_mirroring`` (two levels).
#
# NOTE [ BatchNorm in re-run segments ]
# Every segment but the last runs its forward twice per iteration.  MXNet's
# own BatchNorm kernels update the moving statistics in backward (checked
# bit for bit on the CPU), cuDNN's in forward, which would update them twice.
# With ``rerun_cudnn_off`` (set by SegmentChain on GPU contexts) BatchNorm
# nodes of the re-run segments get ``cudnn_off=True``, as one-level mirrored
# BatchNorm nodes do (NOTE [ BatchNorm recomputed ] in apply.py).  Untested on
# hardware here (tests/api/test_gpu.py runs where a GPU is lent).
# With ``rerun_cudnn_off`` and ``plan.replay_random``, every Dropout (in all
# segments: the first forward must draw as the re-run does) gets
# ``cudnn_off=True`` too: MXNet's own GPU Dropout draws from the context's
# parallel generator, which ``mx.random.seed(seed, ctx)`` re-seeds; cuDNN's
# dropout keeps its own state (NOTE [ replaying random draws in re-run
# segments ]).
def segment_documents(document: Mapping[str, Any], plan: SegmentPlan,
                      rerun_cudnn_off: bool = False,
                      auxiliary: frozenset = frozenset()) -> List[Dict[str, Any]]:
    """JSON documents of the segment symbols (JSON surgery, NOTE [ splitting by JSON ];
    NOTE [ BatchNorm in re-run segments ] for ``rerun_cudnn_off``; ``auxiliary``: the
    symbol's auxiliary states)."""
    keys = json_node_keys(document["nodes"])  # NOTE [ nodes are identified by key, not by name ]
    index = {key: i for i, key in enumerate(keys)}
    documents = []
    for segment in plan.segments:
        new_nodes, new_index = _segment_nodes(document["nodes"], keys, index, segment, plan,
                                              rerun_cudnn_off)
        heads = [[new_index[index[name]], out, 0] for name, out in segment.outputs]
        _slice_replayed_steps(new_nodes, heads)
        _one_variable_per_reader(new_nodes, heads, auxiliary)
        result = {"nodes": new_nodes,
                  "arg_nodes": [i for i, n in enumerate(new_nodes) if n["op"] == "null"],
                  "heads": heads}
        if "attrs" in document:
            result["attrs"] = document["attrs"]
        documents.append(result)
    return documents


def _segment_nodes(nodes: Sequence[Dict[str, Any]], keys: Sequence[str], index: Mapping[str, int],
                   segment: SegmentSpec, plan: SegmentPlan,
                   rerun_cudnn_off: bool) -> Tuple[List[Dict[str, Any]], Dict[Any, int]]:
    """The node list of one segment (boundary variables first, then its operators and variables
    in the original order, re-indexed), and where each original node (or boundary) went.

    Operators are named by their key in the segment: segment symbols are internal, and an
    output named after a repeated operator name could not be told apart in MXNet's report."""
    members = set(segment.nodes) | set(segment.variables)
    boundary = {(index[name], out): boundary_name((name, out)) for name, out in segment.inputs}
    new_nodes: List[Dict[str, Any]] = []
    new_index: Dict[Any, int] = {}
    for key, name in boundary.items():
        new_index[key] = len(new_nodes)
        new_nodes.append({"op": "null", "name": name, "inputs": []})
    for i, node in enumerate(nodes):
        if keys[i] not in members:
            continue
        copy = dict(node)
        inputs = []
        for source, out, *rest in node.get("inputs", []):
            if (source, out) in boundary:
                inputs.append([new_index[(source, out)], 0, 0])
            elif source not in new_index:
                raise ValueError(f"segment {segment.index}: node {node['name']!r} reads "
                                 f"{nodes[source]['name']!r}, which the segment neither "
                                 "computes nor receives; the plan does not fit this symbol")
            else:
                inputs.append([new_index[source], out] + (rest or [0]))
        copy["inputs"] = inputs
        if node["op"] != "null":
            copy["name"] = keys[i]
            attrs = _segment_attrs(node, keys[i], segment, plan, rerun_cudnn_off)
            if attrs:
                copy["attrs"] = attrs
            else:
                copy.pop("attrs", None)
        new_index[i] = len(new_nodes)
        new_nodes.append(copy)
    return new_nodes, new_index


def _segment_attrs(node: Mapping[str, Any], key: str, segment: SegmentSpec, plan: SegmentPlan,
                   rerun_cudnn_off: bool) -> Dict[str, str]:
    """An operator's attributes in its segment: ``force_mirroring`` as the segment mirrors it,
    ``cudnn_off`` where NOTE [ BatchNorm in re-run segments ] asks for it."""
    attrs = dict(node.get("attrs") or {})
    attrs.pop(MIRROR_ATTR, None)
    if key in segment.mirrored:
        attrs[MIRROR_ATTR] = "True"
        if node["op"] == "BatchNorm":
            attrs["cudnn_off"] = "True"  # NOTE [ BatchNorm recomputed ] in apply.py
    rerun = segment.index < plan.count - 1
    if rerun_cudnn_off and rerun and node["op"] == "BatchNorm":
        attrs["cudnn_off"] = "True"  # NOTE [ BatchNorm in re-run segments ]
    if rerun_cudnn_off and plan.replay_random and node["op"] == "Dropout":
        attrs["cudnn_off"] = "True"  # seeded generator, not cuDNN's own state
    return attrs


# NOTE [ slicing the replayed embedding ]
# An unrolled language model splits ``Embedding(data)`` into its steps
# (``SliceChannel`` with ``squeeze_axis``).  Both are replayed by every
# segment (NOTE [ executor segments ]), so each segment embedded the whole
# sequence and, in backward, built the gradient of the whole embedding
# (zeros for the steps it does not own): about 3 x batch x steps x embed
# floats per segment (~19 MB of a 59 MB segment of the 2x512 bench language
# model).  Here a segment reading steps lo..hi embeds ``slice_axis(data, lo,
# hi + 1)`` and splits that.  The values are the same (a gather); the
# embedding weight's gradient adds the same rows in the same order, minus
# the zero rows.
def _slice_replayed_steps(nodes: List[Dict[str, Any]], heads: List[List[int]]) -> None:
    """Embed only the steps a segment reads (in place on a segment's node list; NOTE [ slicing
    the replayed embedding ])."""
    position = 0
    while position < len(nodes):
        found = _partly_read_steps(nodes, heads, position)
        position += 1
        if found is not None:
            _embed_only(nodes, heads, position - 1, *found)
            position += 1


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1")


def _readers_of(nodes: List[Dict[str, Any]], heads: List[List[int]], index: int) -> List[List[int]]:
    """Every input reference (and head) that reads node ``index``."""
    found = [ref for node in nodes for ref in node.get("inputs", []) if ref[0] == index]
    return found + [ref for ref in heads if ref[0] == index]


def _partly_read_steps(nodes: List[Dict[str, Any]], heads: List[List[int]], split_index: int
                       ) -> Optional[Tuple[int, int, int, int]]:
    """``(embed_index, axis, low, high)`` when node ``split_index`` splits (squeezed) the
    embedding of a data variable that nothing else reads, and the segment reads only steps
    ``low..high`` of it, not all; else None."""
    node = nodes[split_index]
    attrs = node.get("attrs") or {}
    if node["op"] != "SliceChannel" or not _flag(attrs.get("squeeze_axis", "False")):
        return None
    embed_index, embed_out = node["inputs"][0][:2]
    embed = nodes[embed_index]
    axis = int(attrs.get("axis", 1))
    if embed["op"] != "Embedding" or embed_out != 0 or axis < 0:
        return None
    data_index = embed["inputs"][0][0]
    if nodes[data_index]["op"] != "null" or len(_readers_of(nodes, heads, embed_index)) != 1:
        return None
    used = sorted({ref[1] for ref in _readers_of(nodes, heads, split_index)})
    count = int(attrs["num_outputs"])
    if not used or (used[0] == 0 and used[-1] == count - 1):
        return None
    return embed_index, axis, used[0], used[-1]


def _embed_only(nodes: List[Dict[str, Any]], heads: List[List[int]], split_index: int,
                embed_index: int, axis: int, low: int, high: int) -> None:
    """Insert ``slice_axis(data, low, high + 1)`` just before the Embedding (topological order,
    shifting indices) and split only those steps."""
    node, embed = nodes[split_index], nodes[embed_index]
    data_index = embed["inputs"][0][0]
    for other in nodes:
        for ref in other.get("inputs", []):
            if ref[0] >= embed_index:
                ref[0] += 1
    for ref in heads:
        if ref[0] >= embed_index:
            ref[0] += 1
    name = f"{nodes[data_index]['name']}_steps_{low}_{high}_of_{node['name']}"
    nodes.insert(embed_index, {"op": "slice_axis", "inputs": [[data_index, 0, 0]], "name": name,
                               "attrs": {"axis": str(axis), "begin": str(low), "end": str(high + 1)}})
    embed["inputs"][0] = [embed_index, 0, 0]
    node["attrs"] = dict(node.get("attrs") or {}, num_outputs=str(high - low + 1))
    for ref in _readers_of(nodes, heads, split_index + 1):
        ref[1] -= low


# NOTE [ one variable per reader ]
# MXNet sums the gradients of a variable read by several operators inside
# the executor (``sum_grad`` nodes, src/nnvm/gradient.cc) and only then
# writes or adds the sum to the gradient array: a running sum and the next
# term live in the pool.  In an unrolled LSTM segment that is two arrays
# per weight (2 x 4 MB for each of four 2048 x 512 weights: 20 of the 36 MB
# of a five-step segment of the bench language model).  A segment already
# adds its gradients to the chain's (a weight read by several segments is
# bound with 'add'), so here every reader of such an argument gets a
# variable of its own (``reader_name``), all bound to the same value and
# gradient arrays with 'add' (``SegmentChain._segment_req`` counts readers):
# each operator's backward adds its term into the gradient array (kAddTo)
# and the pool holds no sums.  The terms are added in backward order one by
# one instead of summed first, so the sum is rounded differently (as across
# segments already).  Auxiliary states are left alone (read, not
# differentiated).  MKLDNN's FullyConnected backward adds through a
# temporary of the weight's size (its temp space, not MXNet's pool).
def _one_variable_per_reader(nodes: List[Dict[str, Any]], heads: List[List[int]],
                             auxiliary: frozenset) -> None:
    """Give each reader of an argument read several times its own variable (in place; NOTE [ one
    variable per reader ])."""
    counts: Dict[int, int] = {}
    for node in nodes:
        for ref in node.get("inputs", []):
            counts[ref[0]] = counts.get(ref[0], 0) + 1
    shared = {i for i, node in enumerate(nodes)
              if node["op"] == "null" and counts.get(i, 0) > 1 and node["name"] not in auxiliary
              and not node["name"].endswith("_segment_boundary")}
    if not shared:
        return
    # Rebuild the list: every reader after the first gets its variable inserted just before
    # it (the list stays topologically ordered); old indices are mapped for the heads.
    rebuilt: List[Dict[str, Any]] = []
    moved: Dict[int, int] = {}
    used = {i: 0 for i in shared}
    for old, node in enumerate(nodes):
        if old in shared:
            moved[old] = len(rebuilt)
            rebuilt.append(dict(node, name=reader_name(node["name"], 0)))
            continue
        inputs = []
        for ref in node.get("inputs", []):
            source = ref[0]
            if source in shared and used[source] > 0:
                rebuilt.append(dict(nodes[source], name=reader_name(nodes[source]["name"], used[source])))
                inputs.append([len(rebuilt) - 1] + list(ref[1:]))
            else:
                inputs.append([moved[source]] + list(ref[1:]))
            if source in shared:
                used[source] += 1
        moved[old] = len(rebuilt)
        rebuilt.append(dict(node, inputs=inputs) if "inputs" in node else node)
    nodes[:] = rebuilt
    for ref in heads:
        ref[0] = moved[ref[0]]


def split_symbol(symbol: "mx.sym.Symbol", plan: SegmentPlan,
                 rerun_cudnn_off: bool = False) -> List["mx.sym.Symbol"]:
    """The segment symbols of ``symbol`` under ``plan`` (see :func:`segment_documents`)."""
    document = json.loads(symbol.tojson())
    auxiliary = frozenset(symbol.list_auxiliary_states())
    return [mx.sym.load_json(json.dumps(d))
            for d in segment_documents(document, plan, rerun_cudnn_off, auxiliary)]

