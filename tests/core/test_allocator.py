"""The model of nnvm's memory planner on hand-built executed graphs (no MXNet).

Figures are worked out by hand from nnvm's rules (src/nnvm/plan_memory.cc):
an output takes the smallest free block of at least its size within 16x, else
the largest smaller one, which grows; in-place outputs share their input's
block when nothing else reads it; variables and gradients are not planned.
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import pytest

from mxnet_mirror_hook.core import allocator
from mxnet_mirror_hook.core.allocator import (AllocatorModel, ExecutedGraph, ExecutedNode,
                                              search_allocator_plan)

MB = 1 << 20
VAR = (-1, 0)


def node(op: str, name: str, inputs: Sequence[Tuple[int, int]], *sizes_mb: float,
         deps: Sequence[int] = ()) -> ExecutedNode:
    return ExecutedNode(op, name, tuple(inputs), tuple(int(s * MB) for s in sizes_mb), tuple(deps))


def conv_relu_chain() -> ExecutedGraph:
    """conv(10 MB) -> relu -> conv(10 MB) -> loss, with MXNet's backward nodes in its order.

    Forward 0..3; backward: loss 4, conv1 5 (reads relu0's output 1 and ograd), relu0 6
    (reads its output), conv0 7 (reads the data variable).
    """
    nodes = [
        node("Convolution", "conv0", [VAR, VAR], 10),                     # 0
        node("Activation", "relu0", [(0, 0)], 10),                        # 1
        node("Convolution", "conv1", [(1, 0), VAR], 10),                  # 2
        node("SoftmaxOutput", "loss", [(2, 0), VAR], 10),                 # 3
        node("_backward_SoftmaxOutput", "loss_backward", [(3, 0), VAR], 10, 0.001, deps=[3]),  # 4
        node("_backward_Convolution", "conv1_backward", [(4, 0), (1, 0), VAR], 10, 1, deps=[2]),  # 5
        node("_backward_Activation", "relu0_backward", [(5, 0), (1, 0)], 10, deps=[1]),  # 6
        node("_backward_Convolution", "conv0_backward", [(6, 0), VAR, VAR], 10, 1, deps=[0]),  # 7
    ]
    outputs = ((3, 0), (5, 1), (7, 1))  # the head, then the two weight gradients
    return ExecutedGraph(nodes, 4, outputs, 1)


def test_unmirrored_plan_reuses_freed_blocks_and_shares_in_place():
    # conv0 -> block A (10); relu0 in place of conv0 (A: relu0 is conv0's only reader);
    # conv1 -> B; loss in place of conv1 (B); loss_backward -> C (and a tiny block);
    # conv1_backward's data gradient -> D: A (relu0) and C are still read; relu0_backward
    # in place of D; conv0_backward's data gradient: none free of its size... A frees after
    # relu0_backward, so it takes A. Blocks: A, B, C, D (10 MB each) + the tiny one.
    model = AllocatorModel(conv_relu_chain())
    assert model.replays_capture()
    assert model.planned_bytes() == 40 * MB + int(0.001 * MB)


def test_gradients_and_variables_are_not_planned():
    graph = conv_relu_chain()
    model = AllocatorModel(graph)
    # Make the weight gradients huge: they are bound arrays, so nothing changes.
    nodes = list(graph.nodes)
    nodes[5] = node("_backward_Convolution", "conv1_backward", [(4, 0), (1, 0), VAR], 10, 500, deps=[2])
    bigger = AllocatorModel(ExecutedGraph(nodes, 4, graph.outputs, 1))
    assert bigger.planned_bytes() == model.planned_bytes()


def test_smaller_free_block_grows_and_far_larger_one_is_not_taken():
    def planned(first_mb: float, second_mb: float) -> int:
        nodes = [node("Convolution", "a", [VAR], first_mb),
                 node("Convolution", "b", [(0, 0)], second_mb),   # a freed after b runs
                 node("Convolution", "c", [(1, 0)], second_mb)]   # b read: c may take a's block
        return AllocatorModel(ExecutedGraph(nodes, 3, ((2, 0),), 1)).planned_bytes()

    # c (8 MB) takes a's freed 4 MB block and grows it: 8 (a->c) + 8 (b).
    assert planned(4, 8) == 16 * MB
    # a's block (1 MB) is below 8 MB / 16: c gets a new block.
    assert planned(0.25, 8) == int(0.25 * MB) + 16 * MB
    # c (1 MB) takes a's larger 10 MB block (within 16x): no new block.
    assert planned(10, 1) == 11 * MB


def test_in_place_needs_the_input_to_have_no_other_reader():
    def planned(second_reader: bool) -> int:
        nodes = [node("Convolution", "a", [VAR], 10),
                 node("Activation", "relu", [(0, 0)], 10)]
        if second_reader:
            nodes.append(node("elemwise_add", "add", [(1, 0), (0, 0)], 10))
        else:
            nodes.append(node("Convolution", "conv", [(1, 0)], 10))
        return AllocatorModel(ExecutedGraph(nodes, 3, ((2, 0),), 1)).planned_bytes()

    # Without a second reader: relu shares a's block; conv needs a new one (relu still read).
    assert planned(False) == 20 * MB
    # a is read again by add: relu gets its own block; add shares relu's (its only reader).
    assert planned(True) == 20 * MB + 0


def test_mirroring_replays_copies_right_before_their_backward_reader():
    model = AllocatorModel(conv_relu_chain())
    schedule = model.schedule({"conv0", "relu0"})
    ops = [op for op, _, _ in schedule]
    # Copies (ids 8 = conv0, 9 = relu0) run after conv1's backward needs relu0: conv1's
    # backward belongs to a kept node, so it reads the ORIGINAL relu0; only relu0's own
    # backward reads the copy.
    ids = [v for _, _, v in schedule]
    assert ids.index(8) < ids.index(9) < ids.index(6)
    assert ids.index(5) < ids.index(8)
    relu_backward_inputs = dict((v, inputs) for _, inputs, v in schedule)[6]
    assert (9, 0) in relu_backward_inputs and (1, 0) not in relu_backward_inputs
    assert ops.count("Convolution") == 3 and ops.count("Activation") == 2


def test_dropout_is_never_mirrored():
    nodes = [node("Convolution", "conv", [VAR], 10),
             node("Dropout", "drop", [(0, 0)], 10, 10),
             node("SoftmaxOutput", "loss", [(1, 0), VAR], 10),
             node("_backward_SoftmaxOutput", "loss_backward", [(2, 0), VAR], 10, deps=[2]),
             node("_backward_Dropout", "drop_backward", [(3, 0), (1, 1)], 10, deps=[1]),
             node("_backward_Convolution", "conv_backward", [(4, 0), VAR], 10, 1, deps=[0])]
    model = AllocatorModel(ExecutedGraph(nodes, 3, ((2, 0), (5, 1)), 1))
    assert model.schedule({"drop"}) == model.schedule(())
    assert len(model.schedule({"conv"})) == len(nodes) + 1


def test_mirroring_changes_the_plan_as_the_rules_say():
    model = AllocatorModel(conv_relu_chain())
    # Recomputing relu0 alone: conv1's backward (kept node) still reads the original relu0,
    # so nothing is freed earlier and the copy is extra.
    assert model.planned_bytes({"relu0"}) >= model.planned_bytes()


def test_round_trip_through_dict_keeps_the_plan():
    graph = conv_relu_chain()
    graph.measured_mb = 40.0
    copy = ExecutedGraph.from_dict(graph.to_dict())
    assert copy == graph
    assert AllocatorModel(copy).planned_bytes({"conv0"}) == AllocatorModel(graph).planned_bytes({"conv0"})


def test_agreement_check_uses_a_relative_tolerance():
    model = AllocatorModel(conv_relu_chain())
    assert model.agrees_with(40.0)
    assert not model.agrees_with(60.0)


def _two_stage_graph() -> ExecutedGraph:
    """Three conv layers of different sizes, each with its backward node."""
    sizes = [8, 4, 2]
    nodes: List[ExecutedNode] = []
    last = VAR
    for i, size in enumerate(sizes):
        nodes.append(node("Convolution", f"c{i}", [last, VAR], size))
        last = (i, 0)
    forward = len(nodes)
    nodes.append(node("SoftmaxOutput", "loss", [last, VAR], 2))
    forward += 1
    nodes.append(node("_backward_SoftmaxOutput", "loss_backward", [(3, 0), VAR], 2, deps=[3]))
    grad = (4, 0)
    outputs = [(3, 0)]
    for i in reversed(range(len(sizes))):
        source = (i - 1, 0) if i else VAR
        nodes.append(node("_backward_Convolution", f"c{i}_backward", [grad, source, VAR],
                          sizes[i - 1] if i else 8, 0.5, deps=[i]))
        grad = (len(nodes) - 1, 0)
        outputs.append((len(nodes) - 1, 1))
    return ExecutedGraph(nodes, forward, tuple(outputs), 1)


def test_search_never_returns_a_worse_plan_and_respects_its_constraint():
    graph = _two_stage_graph()
    model = AllocatorModel(graph)
    assert model.replays_capture()
    start = frozenset({"c0", "c1", "c2"})
    movable = ["c0", "c1", "c2", "loss"]
    result = search_allocator_plan(model, start, movable, time_limit=60, max_evaluations=200)
    assert result.planned_bytes <= model.planned_bytes(start) == result.start_bytes
    assert result.planned_bytes == model.planned_bytes(result.mirrored)
    constrained = search_allocator_plan(model, start, movable, time_limit=60, max_evaluations=200,
                                        accept=lambda mirrored: "c0" in mirrored)
    assert "c0" in constrained.mirrored


def test_search_stops_by_evaluation_count_not_by_the_clock():
    model = AllocatorModel(_two_stage_graph())
    quick = search_allocator_plan(model, {"c1"}, ["c0", "c1", "c2"], max_evaluations=50, seed=3)
    assert not quick.timed_out
    # A safety limit already passed stops the walk and says so: the only time-dependent exit.
    stopped = search_allocator_plan(model, {"c1"}, ["c0", "c1", "c2"], time_limit=-1.0,
                                    max_evaluations=50, seed=3)
    assert stopped.timed_out and stopped.evaluations == 1


def test_search_is_deterministic_for_a_seed_and_evaluation_count():
    model = AllocatorModel(_two_stage_graph())
    runs = [search_allocator_plan(model, {"c1"}, ["c0", "c1", "c2"], time_limit=60,
                                  max_evaluations=50, seed=3) for _ in range(2)]
    assert runs[0].mirrored == runs[1].mirrored and runs[0].history == runs[1].history


@pytest.mark.parametrize("mirrored", [(), ("c0",), ("c0", "c1"), ("c0", "c1", "c2", "loss")])
def test_every_mirror_set_gives_a_complete_topological_order(mirrored):
    model = AllocatorModel(_two_stage_graph())
    schedule = model.schedule(mirrored)
    done = set()
    for _, inputs, v in schedule:
        assert all(s < 0 or s in done for s, _ in inputs)
        done.add(v)
    assert len(schedule) == len(model.graph.nodes) + len(mirrored)


def test_a_bounded_replay_is_exact_under_its_limit_and_above_it_otherwise():
    model = AllocatorModel(_two_stage_graph())
    for mirrored in (set(), {"c0"}, {"c1"}, {"c0", "c1", "c2"}):
        exact = model.planned_bytes(mirrored)
        assert model.planned_bytes(mirrored, limit=exact) == exact
        assert model.planned_bytes(mirrored, limit=exact + 1) == exact
        if exact > 0:
            assert model.planned_bytes(mirrored, limit=exact - 1) > exact - 1


def random_executed_graph(rng: random.Random, forward: int) -> ExecutedGraph:
    """A random forward DAG of ``forward`` operators (in-place, identity, two-input and
    two-output operators among them) with MXNet-shaped backward nodes: each forward node's
    backward reads the output gradient, its inputs and outputs, and depends on its owner."""
    ops = ["Convolution", "Activation", "elemwise_add", "Reshape", "BatchNorm", "Dropout", "_copy",
           "SoftmaxOutput", "SliceChannel"]
    nodes: List[ExecutedNode] = []
    for index in range(forward):
        op = rng.choice(ops) if index else "Convolution"
        arity = 2 if op == "elemwise_add" and index > 1 else 1
        inputs = [(rng.randrange(max(0, index - 4), index), 0) if index else VAR for _ in range(arity)]
        inputs = [(s, rng.randrange(len(nodes[s].output_bytes))) if s >= 0 else (s, k) for s, k in inputs]
        outputs = 2 if op in ("SliceChannel", "BatchNorm") else 1
        size = rng.choice([1, 2, 4, 8, 4, 0.5])
        sizes = [size] * outputs if op != "Reshape" and op != "_copy" and op != "Activation" else None
        if sizes is None:  # same-size unary operators, so that in-place sharing can happen
            s, k = inputs[0]
            sizes = [nodes[s].output_bytes[k] / MB if s >= 0 else size]
        nodes.append(node(op, f"n{index}", inputs + [VAR], *sizes))
    gradient_of = {}
    for index in reversed(range(forward)):
        f = nodes[index]
        head = [gradient_of.get(index, VAR)]
        reads = head + [i for i in f.inputs if i[0] >= 0] + [(index, 0)]
        grads = [f.output_bytes[0] / MB] * len(f.inputs)
        nodes.append(node(f"_backward_{f.op}", f"{f.name}_backward", reads, *grads, deps=[index]))
        for position, (s, _) in enumerate(f.inputs):
            if s >= 0:
                gradient_of[s] = (len(nodes) - 1, position)
    last = len(nodes) - 1
    outputs = ((forward - 1, 0),) + tuple((v, k) for v in range(forward, len(nodes))
                                          for k in range(len(nodes[v].output_bytes))
                                          if nodes[v].inputs[-1] == VAR or v == last)[:6]
    return ExecutedGraph(nodes, forward, outputs, 1)


@pytest.mark.skipif(allocator._replay is None, reason="the compiled replay was not built (no C compiler)")
@pytest.mark.parametrize("seed", range(12))
def test_the_compiled_replay_gives_the_python_walks_bytes(seed):
    rng = random.Random(seed)
    model = AllocatorModel(random_executed_graph(rng, rng.randrange(3, 40)))
    assert model._compiled is not None
    names = [model.graph.nodes[i].name for i in range(model.graph.num_forward)]
    for _ in range(25):
        mirrored = {n for n in names if rng.random() < rng.choice([0.1, 0.5, 0.9])}
        exact = model._planned_bytes_python(mirrored)
        assert model.planned_bytes(mirrored) == exact
        limit = rng.randrange(0, exact + 2) if exact else 0
        assert model.planned_bytes(mirrored, limit=limit) == model._planned_bytes_python(mirrored, limit)


@pytest.mark.skipif(allocator._replay is None, reason="the compiled replay was not built (no C compiler)")
def test_the_compiled_replay_refuses_an_id_that_is_not_a_forward_node_clearly():
    model = AllocatorModel(_two_stage_graph())
    with pytest.raises(ValueError, match="not a forward node"):
        allocator._replay.planned_bytes_of_names(model._compiled, ["c0"], {"c0": 10 ** 6}, -1)


def wide_executed_graph(width: int) -> ExecutedGraph:
    """An operator of ``width`` outputs (a SliceChannel of unequal parts), each read by its own
    activation, all joined again by a Concat of ``width`` inputs, with MXNet-shaped backward
    nodes: the split's backward reads ``width`` gradients and the concat's writes ``width``."""
    parts = [(1, 0.5, 2, 1)[k % 4] for k in range(width)]
    nodes = [node("Convolution", "embed", [VAR, VAR], sum(parts)),
             node("SliceChannel", "split", [(0, 0)], *parts)]
    nodes += [node("Activation", f"act{k}", [(1, k)], parts[k]) for k in range(width)]
    concat, loss = width + 2, width + 3
    nodes.append(node("Concat", "concat", [(2 + k, 0) for k in range(width)], sum(parts)))
    nodes.append(node("SoftmaxOutput", "loss", [(concat, 0), VAR], sum(parts)))
    forward = len(nodes)
    nodes.append(node("_backward_SoftmaxOutput", "loss_backward", [(loss, 0), VAR], sum(parts), deps=[loss]))
    nodes.append(node("_backward_Concat", "concat_backward", [(forward, 0)], *parts, deps=[concat]))
    for k in range(width):
        nodes.append(node("_backward_Activation", f"act{k}_backward", [(forward + 1, k), (2 + k, 0)],
                          parts[k], deps=[2 + k]))
    nodes.append(node("_backward_SliceChannel", "split_backward",
                      [(forward + 2 + k, 0) for k in range(width)], sum(parts), deps=[1]))
    nodes.append(node("_backward_Convolution", "embed_backward", [(len(nodes) - 1, 0), VAR, VAR],
                      sum(parts), 1, deps=[0]))
    return ExecutedGraph(nodes, forward, ((loss, 0), (len(nodes) - 1, 1)), 1)


@pytest.mark.skipif(allocator._replay is None, reason="the compiled replay was not built (no C compiler)")
@pytest.mark.parametrize("width", [64, 65, 100, 300])
def test_the_compiled_replay_takes_operators_of_hundreds_of_outputs_with_the_python_walks_bytes(width):
    model = AllocatorModel(wide_executed_graph(width))
    assert model._compiled is not None and model.replays_capture()
    names = [model.graph.nodes[i].name for i in range(model.graph.num_forward)]
    rng = random.Random(width)
    mirror_sets = [set(), {"split"}, {"embed", "split"}, set(names)]
    mirror_sets += [{n for n in names if rng.random() < 0.5} for _ in range(10)]
    for mirrored in mirror_sets:
        exact = model._planned_bytes_python(mirrored)
        assert model.planned_bytes(mirrored) == exact > 0
        limit = rng.randrange(0, exact + 2)
        assert model.planned_bytes(mirrored, limit=limit) == model._planned_bytes_python(mirrored, limit)


def test_a_graph_the_compiled_replay_cannot_take_is_walked_in_python_with_a_debug_line(monkeypatch, caplog):
    graph = wide_executed_graph(100)
    # An in-place table the C walk does not know (output 0 sharing input 1 only).
    monkeypatch.setitem(allocator.INPLACE_OPTIONS, "Concat", ((1, 0),))
    with caplog.at_level("DEBUG", logger=allocator.__name__):
        model = AllocatorModel(graph)
    assert model._compiled is None
    assert any("in Python" in record.getMessage() for record in caplog.records)
    for mirrored in ((), ("split",), ("embed", "split")):
        assert model.planned_bytes(mirrored) == model._planned_bytes_python(mirrored) > 0


@pytest.mark.skipif(allocator._replay is None, reason="the compiled replay was not built (no C compiler)")
def test_replay_arrays_that_refer_to_missing_nodes_are_refused_and_walked_in_python(monkeypatch, caplog):
    model = AllocatorModel(_two_stage_graph())
    arrays = list(model._compiled_arrays())
    arrays[1] = allocator.array("q", [len(model.graph.nodes) + 5] * len(arrays[1]))  # input nodes
    with pytest.raises(ValueError, match="missing nodes"):
        allocator._replay.prepare(model.graph.num_forward, model.graph.match_range, tuple(arrays))
    monkeypatch.setattr(AllocatorModel, "_compiled_arrays", lambda self: tuple(arrays))
    with caplog.at_level("DEBUG", logger=allocator.__name__):
        fallback = AllocatorModel(_two_stage_graph())
    assert fallback._compiled is None and any("in Python" in r.getMessage() for r in caplog.records)
    assert fallback.planned_bytes({"c0"}) == model.planned_bytes({"c0"})


class _ReplayEverySet:
    """An evaluator that replays every mirror set the search asks about (what the search did
    before it remembered figures), counting the replays."""

    replays = 0

    def __init__(self, model: AllocatorModel) -> None:
        self._model = model

    def __call__(self, mirrored, limit=None):
        type(self).replays += 1
        return self._model.planned_bytes(mirrored, limit=limit)


@pytest.mark.parametrize("seed", range(8))
def test_a_search_that_remembers_figures_walks_the_same_path_as_one_replaying_every_set(seed, monkeypatch):
    """NOTE [ a search remembers its figures ]: same plan, bytes, evaluation count and history,
    with fewer replays."""
    rng = random.Random(seed)
    model = AllocatorModel(random_executed_graph(rng, rng.randint(8, 30)))
    movable = list(model.forward_keys)
    start = set(rng.sample(movable, len(movable) // 3))
    replays = []
    real = model.planned_bytes

    def counted(mirrored=(), limit=None):
        replays.append(1)
        return real(mirrored, limit)

    monkeypatch.setattr(model, "planned_bytes", counted)
    remembered = search_allocator_plan(model, start, movable, max_evaluations=2000, seed=seed)
    remembered_replays = len(replays)
    monkeypatch.setattr(allocator, "_RememberedBytes", _ReplayEverySet)
    _ReplayEverySet.replays = 0
    every = search_allocator_plan(model, start, movable, max_evaluations=2000, seed=seed)
    assert (remembered.mirrored, remembered.planned_bytes, remembered.evaluations, remembered.history) == (
        every.mirrored, every.planned_bytes, every.evaluations, every.history)
    assert _ReplayEverySet.replays >= every.evaluations
    assert remembered_replays < _ReplayEverySet.replays
