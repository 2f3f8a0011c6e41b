"""The forward graph the planners work on.

A :class:`Graph` is a topologically ordered list of :class:`Node` objects, built
either by hand (tests) or from an MXNet symbol by :mod:`mxnet_mirror_hook.mx.convert`.
What a variable is (data, label, parameter or auxiliary state) is stated by the
builder from the symbol's argument and auxiliary lists, never guessed from names.

# NOTE [ nodes are identified by key, not by name ]
# MXNet allows two operators with the same name (gluoncv's video networks and
# xception traced from Gluon have them), so a name cannot say which node a
# mirroring decision is about.  Every node of a Graph has a *key*, unique in the
# graph and derived from its position: the symbol's name where that name is
# unique, else ``name#k`` for the k-th repeat in topological order (the first
# keeps the name; a ``#k`` another node already has as its name is skipped):
# :func:`repeat_keys`.  ``Node.name`` holds the key, ``Node.symbol_name`` the
# symbol's name.  Everything that records a decision (planners' ``mirrored``
# sets, ``MirrorPlan.mirrored``, cache entries) holds keys; the adapter maps
# keys to positions in MXNet's JSON with the same rule over the JSON's node
# names (``mx.convert.json_node_keys``), which lists nodes in the Graph's order,
# and the allocator model maps them to its forward operators the same way over
# their names (both orders are nnvm's depth-first walk from the outputs).  The
# user's symbol is never renamed: ``save_checkpoint`` writes the user's names.
# A graph without repeated names has keys equal to its names, so nothing changes
# for it (plans, cache entries).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["NodeKind", "Node", "Graph", "NEVER_MIRRORED_OPS", "KEEP_ATTR", "draws_random",
           "replays_random", "repeat_keys"]


def repeat_keys(names: Sequence[str]) -> List[str]:
    """Unique keys for nodes named ``names`` in topological order (NOTE [ nodes are identified
    by key, not by name ]).

    A name's first node keeps it; its k-th repeat gets ``name#k`` (k = 1, 2, ...), skipping a
    key that is another node's name or was given already.

    Examples
    --------
    >>> repeat_keys(["data", "relu", "fc", "relu", "relu"])
    ['data', 'relu', 'fc', 'relu#1', 'relu#2']
    """
    taken = set(names)
    if len(taken) == len(names):
        return list(names)
    keys: List[str] = []
    given: set = set()
    repeats: Dict[str, int] = {}
    for name in names:
        if name not in given:
            key = name
        else:
            k = repeats.get(name, 0)
            while True:
                k += 1
                key = f"{name}#{k}"
                if key not in taken and key not in given:
                    break
            repeats[name] = k
        given.add(key)
        keys.append(key)
    return keys

#: Operators never recomputed.  MXNet itself never recomputes Dropout (a new
#: mask would change the gradients; ``need_mirror`` in
#: ``src/executor/graph_executor.cc``).  The BatchNorm variants listed update
#: their moving statistics in the forward call (or are not known not to), so
#: a recomputed copy would update them twice; plain ``BatchNorm`` is safe and
#: handled in :mod:`mxnet_mirror_hook.mx.apply`.
#: ``Embedding`` binds when recomputed but its kernel then fails in forward
#: (``Check failed: req[embedding::kOut] == kWriteTo``, MXNet 1.9.1, seen on a
#: bucketed LSTM language model); its output is small, so it is always kept.
#: ``pick`` (Gluon's SoftmaxCrossEntropyLoss) fails the same way in backward
#: when it is recomputed and its consumer is kept (``Check failed: req[0] ==
#: kWriteTo``, MXNet 1.9.1; the error surfaces at the next synchronisation).
#: ``LayerNorm`` recomputed by MXNet 1.9.1's mirror gives wrong gradients where its
#: input is a residual sum over a Dropout: gluonnlp 0.10's BERT (4 layers, dropout 0.1,
#: ``mirror(net)``) got 68 of 73 parameter gradients non-finite, 13 wrong under
#: ``max_overhead=0.05``, with the same loss; with LayerNorm kept, all equal
#: (tests/api/test_gluonnlp_bert_gradients.py).  Its outputs (and its mean and standard
#: deviation) are kept.
NEVER_MIRRORED_OPS = frozenset({"Dropout", "CuDNNBatchNorm", "BatchNorm_v1",
                                "_contrib_SyncBatchNorm", "SyncBatchNorm",
                                "Embedding", "_contrib_SparseEmbedding", "pick", "LayerNorm"})

#: A node attribute (value ``'True'``) that keeps a node's output: set by the recomputable
#: dropout rewrite (:mod:`mxnet_mirror_hook.mx.dropout`) on the nodes that draw and store a
#: mask, which must be computed once per iteration.
KEEP_ATTR = "__mirror_hook_keep__"

#: Operator name prefixes of MXNet's random samplers (``_random_uniform``, ``_sample_normal``...).
RANDOM_OP_PREFIXES = ("_random_", "_sample_", "random_", "sample_", "_npi_random", "_shuffle")


def draws_random(op: str, attrs: Dict[str, str]) -> bool:
    """Whether operator ``op`` draws random numbers in a training forward pass.

    Running such a node's forward again draws new numbers: Dropout with ``p > 0``,
    a fused RNN with dropout, randomized leaky ReLU, and the samplers.
    """
    if op == "Dropout":
        return float(attrs.get("p", "0.5")) > 0
    if op == "RNN":
        return float(attrs.get("p", "0")) > 0
    if op == "LeakyReLU":
        return attrs.get("act_type", "leaky") == "rrelu"
    return op.startswith(RANDOM_OP_PREFIXES)


#: Prefixes of the samplers whose draws re-seeding the context reproduces (checked: uniform,
#: normal_like), besides Dropout (NOTE [ replaying random draws in re-run segments ], mx/segments/chain.py).
REPLAYABLE_RANDOM_PREFIXES = ("_random_", "_sample_", "random_", "sample_")


def replays_random(op: str, attrs: Dict[str, str]) -> bool:
    """Whether re-seeding the context's generator makes operator ``op`` draw again exactly what
    it drew: MXNet's Dropout and samplers (checked on the CPU).  A fused RNN's dropout, rrelu and
    the NumPy-interface samplers are not known to."""
    if not draws_random(op, attrs):
        return True
    return op == "Dropout" or op.startswith(REPLAYABLE_RANDOM_PREFIXES)


#: Loss operators whose second input is a label, not something to differentiate.
LOSS_OPS = frozenset({"SoftmaxOutput", "LinearRegressionOutput", "LogisticRegressionOutput",
                      "MAERegressionOutput", "SVMOutput", "Softmax", "CTCLoss", "ctc_loss"})


class NodeKind(enum.Enum):
    """What a node of the forward graph is."""

    OP = "op"
    INPUT = "input"        # data or label: fed per batch, no gradient by default
    PARAM = "param"        # learned argument
    AUX = "aux"            # auxiliary state (BatchNorm moving statistics)


@dataclass
class Node:
    """One node of the forward graph.

    Parameters
    ----------
    name : str
        The node's key, unique in the graph: its name in the symbol, or ``name#k`` for the
        k-th repeat of a name (NOTE [ nodes are identified by key, not by name ]; a
        :class:`Graph` gives repeated names their keys).
    op : str
        Operator name (``"Convolution"``), or ``"null"`` for a variable.
    kind : NodeKind
        Operator, input, parameter or auxiliary state.
    inputs : list of (int, int)
        ``(node index, output index)`` of each input, in operator order.
    output_shapes : list of tuple of int
        Shape of each visible output.
    itemsize : int
        Bytes per element of the outputs (4 for float32, 2 for float16).
    attrs : dict of str to str
        Operator parameters and user attributes (``mirror_stage``...).
    pinned : bool
        Never recompute this node (set for operators that are unsafe to run
        twice on the target device, such as cuDNN BatchNorm).
    symbol_name : str
        The node's name in the symbol (not unique); ``name`` when not given.
    """

    name: str
    op: str
    kind: NodeKind
    inputs: List[Tuple[int, int]] = field(default_factory=list)
    output_shapes: List[Tuple[int, ...]] = field(default_factory=list)
    itemsize: int = 4
    attrs: Dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    symbol_name: str = ""

    def __post_init__(self) -> None:
        if not self.symbol_name:
            self.symbol_name = self.name

    @property
    def is_variable(self) -> bool:
        """True for data, label, parameter and auxiliary nodes."""
        return self.kind is not NodeKind.OP

    @property
    def numel(self) -> int:
        """Number of elements over all visible outputs."""
        return sum(math.prod(shape) for shape in self.output_shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of all visible outputs at the node's own dtype."""
        return self.numel * self.itemsize

    @property
    def planned_bytes(self) -> int:
        """Bytes as MXNet's static memory plan counts them (4 bytes per element)."""
        return self.numel * 4

    @property
    def can_mirror(self) -> bool:
        """Whether MXNet would recompute this node if asked to."""
        # Operators without inputs (zeros for an RNN's begin state, random draws) cost
        # nothing to keep, and MXNet cannot infer the shape of their recomputed copy
        # when it came from their consumers.
        return (self.kind is NodeKind.OP and self.op not in NEVER_MIRRORED_OPS
                and not self.pinned and bool(self.inputs) and self.attrs.get(KEEP_ATTR) != "True")

    @property
    def mirror_stage(self) -> Optional[str]:
        """The user's ``mirror_stage`` mark, if any."""
        return self.attrs.get("mirror_stage", self.attrs.get("__mirror_stage__"))


class Graph:
    """A forward graph in topological order.

    Parameters
    ----------
    nodes : sequence of Node
        Nodes in topological order: every input index is smaller than the
        node's own index.
    heads : sequence of (int, int)
        The graph outputs as ``(node index, output index)``.

    Nodes that repeat a name get a copy keyed ``name#k`` (NOTE [ nodes are identified by key,
    not by name ]); ``Node.symbol_name`` keeps the name.

    Raises
    ------
    ValueError
        If the order is not topological or an index is out of range.
    """

    def __init__(self, nodes: Sequence[Node], heads: Sequence[Tuple[int, int]]) -> None:
        keys = repeat_keys([node.name for node in nodes])
        self.nodes: List[Node] = [node if node.name == key else dataclasses.replace(node, name=key)
                                  for node, key in zip(nodes, keys)]
        self.heads: List[Tuple[int, int]] = [tuple(h) for h in heads]  # type: ignore[misc]
        self._index: Dict[str, int] = {}
        for position, node in enumerate(self.nodes):
            self._index[node.name] = position
            for source, _ in node.inputs:
                if not 0 <= source < position:
                    raise ValueError(
                        f"node {node.name!r} reads node {source}, which does not come before it; "
                        "nodes must be in topological order")
        for source, _ in self.heads:
            if not 0 <= source < len(self.nodes):
                raise ValueError(f"graph output refers to missing node {source}")
        self._consumers: Optional[List[List[int]]] = None
        self._late: Optional["Graph"] = None

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def index(self, key: str) -> int:
        """Position of the node whose key (:attr:`Node.name`) is ``key``."""
        return self._index[key]

    def node(self, key: str) -> Node:
        """The node whose key (:attr:`Node.name`) is ``key``."""
        return self.nodes[self._index[key]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def op_nodes(self) -> List[Node]:
        """Operator nodes in topological order."""
        return [n for n in self.nodes if n.kind is NodeKind.OP]

    @property
    def mirrorable_names(self) -> List[str]:
        """Keys (:attr:`Node.name`) of the nodes MXNet can recompute, in topological order."""
        return [n.name for n in self.nodes if n.can_mirror]

    def consumers(self) -> List[List[int]]:
        """For each node, the indices of the nodes that read it."""
        if self._consumers is None:
            consumers: List[List[int]] = [[] for _ in self.nodes]
            for position, node in enumerate(self.nodes):
                for source, _ in node.inputs:
                    if not consumers[source] or consumers[source][-1] != position:
                        consumers[source].append(position)
            self._consumers = consumers
        return self._consumers

    def label_input_indices(self) -> List[int]:
        """Indices of variables that enter a loss operator as its label.

        These are found by structure (the second input of a loss operator such
        as ``SoftmaxOutput``), not by name.
        """
        found = []
        for node in self.nodes:
            if node.op in LOSS_OPS:
                for source, _ in node.inputs[1:]:
                    if self.nodes[source].is_variable:
                        found.append(source)
        return sorted(set(found))

    # ------------------------------------------------------------ structure
    def activation_region(self) -> List[bool]:
        """Mask of operator nodes on some path from a data input to a graph output.

        Labels do not count as data inputs: they join at the loss.
        """
        labels = set(self.label_input_indices())
        from_data = [False] * len(self.nodes)
        for position, node in enumerate(self.nodes):
            if node.kind is NodeKind.INPUT and position not in labels:
                from_data[position] = True
            elif node.kind is NodeKind.OP:
                from_data[position] = any(from_data[s] for s, _ in node.inputs)
        to_output = [False] * len(self.nodes)
        for source, _ in self.heads:
            to_output[source] = True
        for position in range(len(self.nodes) - 1, -1, -1):
            if to_output[position]:
                for source, _ in self.nodes[position].inputs:
                    to_output[source] = True
        return [from_data[i] and to_output[i] and self.nodes[i].kind is NodeKind.OP
                for i in range(len(self.nodes))]

    def cut_points(self) -> List[str]:
        """Operator nodes that every path from the data inputs to the outputs passes.

        # NOTE [ cut points by a sweep over the topological order ]
        # Restrict the graph to operators that lie between the data inputs and
        # the outputs.  In that region, node v is a cut point iff no edge u -> w
        # jumps over it (pos(u) < pos(v) < pos(w)).  If such an edge existed,
        # the path data -> u -> w -> output would avoid v; conversely, if v is
        # not on every path, the avoiding path has to cross v's position by
        # one edge.  The test therefore does not depend on which topological
        # order the graph was given in, and costs O(nodes + edges).

        Returns
        -------
        list of str
            Names of the cut points in topological order.  In a plain chain
            every operator is one; in a residual network they are the block
            outputs.
        """
        region = self.activation_region()
        labels = set(self.label_input_indices())
        size = len(self.nodes)
        sources = [region[i] or (self.nodes[i].kind is NodeKind.INPUT and i not in labels)
                   for i in range(size)]
        # reach[i]: the furthest position that an edge leaving node i arrives at;
        # a graph output counts as an edge to a virtual sink after the last node.
        reach = [-1] * size
        for position, node in enumerate(self.nodes):
            if region[position]:
                for source, _ in node.inputs:
                    if sources[source]:
                        reach[source] = max(reach[source], position)
        for source, _ in self.heads:
            if region[source]:
                reach[source] = size
        cuts = []
        furthest = -1
        for position in range(size):
            if region[position] and furthest <= position:
                cuts.append(self.nodes[position].name)
            if sources[position]:
                furthest = max(furthest, reach[position])
        return cuts

    def as_late_as_possible(self) -> "Graph":
        """The same graph in a topological order that runs every node as late as possible.

        # NOTE [ linearising for cuts ]
        # MXNet's JSON lists nodes in a depth-first post-order from the outputs,
        # which can run work long before it is needed: an unrolled LSTM lists
        # the input projections of all 100 steps first, so every position in the
        # first part of the order has 100 tensors crossing it and no small cut
        # exists.  Ordering by "latest level" (the longest path to an output,
        # counted back from the deepest node), ties by the original position,
        # keeps each node next to its first consumer; every edge still goes
        # forward because a producer is always at least one level above its
        # consumers.  Chains and residual networks keep their order.
        #
        # Computed once per graph (segment planning asks for it per split).
        """
        if self._late is None:
            self._late = self._latest_order()
        return self._late

    def _latest_order(self) -> "Graph":
        size = len(self.nodes)
        height = [0] * size
        for position in range(size - 1, -1, -1):
            for source, _ in self.nodes[position].inputs:
                height[source] = max(height[source], height[position] + 1)
        top = max(height, default=0)
        order = sorted(range(size), key=lambda i: (top - height[i], i))
        if order == list(range(size)):
            return self
        new_index = {old: new for new, old in enumerate(order)}
        nodes = []
        for old in order:
            node = self.nodes[old]
            nodes.append(Node(node.name, node.op, node.kind,
                              [(new_index[s], o) for s, o in node.inputs], list(node.output_shapes),
                              node.itemsize, dict(node.attrs), node.pinned, node.symbol_name))
        return Graph(nodes, [(new_index[s], o) for s, o in self.heads])

    def planned_bytes_of(self, names: Iterable[str]) -> int:
        """Sum of :attr:`Node.planned_bytes` over ``names``."""
        return sum(self.node(name).planned_bytes for name in names)
