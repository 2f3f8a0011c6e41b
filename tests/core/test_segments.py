"""Segment plans on hand-built graphs (no MXNet)."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook.core.graph import Graph, Node, NodeKind
from mxnet_mirror_hook.core.segments import crossings as segment_crossings
from mxnet_mirror_hook.core.segments import pool as segment_pool
from mxnet_mirror_hook.core.segments import (HEAD_GRAD_COPIES, SegmentPlan, alternative_cuts,
                                             best_segment_plan, choose_cuts, cut_positions,
                                             gradient_slots, least_pool_choice, plan_segments,
                                             segment_plan_for_cuts, shared_pool_bytes)
from tests.graphs import GraphBuilder, chain, residual

MB = 1 << 20


def _owned_ops(graph: Graph):
    return {n.name for n in graph.nodes if n.kind is NodeKind.OP}


def test_every_operator_of_a_chain_is_in_exactly_one_segment_and_boundaries_link_them():
    graph = chain(12)
    plan = plan_segments(graph, 4)
    assert plan.count == 4
    seen = [name for s in plan.segments for name in s.nodes]
    assert sorted(seen) == sorted(_owned_ops(graph))
    for before, after in zip(plan.segments, plan.segments[1:]):
        assert len(before.outputs) == 1            # a chain crosses each cut with one tensor
        assert after.inputs == before.outputs
    assert plan.segments[0].inputs == ()
    assert plan.segments[-1].outputs == (("loss", 0),)
    assert plan.boundary_bytes == 3 * MB          # three 1 MB boundaries
    assert plan.estimated_bytes == HEAD_GRAD_COPIES * plan.boundary_bytes + max(
        s.working_bytes for s in plan.segments)


def test_residual_cuts_fall_between_blocks_and_each_segment_reads_its_own_weights():
    graph = residual(6)
    plan = plan_segments(graph, 3)
    for segment in plan.segments:
        for name in segment.variables:
            if name.endswith("_w"):
                block = name.split("_")[0]
                assert any(n.startswith(block) for n in segment.nodes)
    assert plan.shared_variables() == []
    # A boundary inside a residual block would need two tensors: the cuts carry one.
    assert all(len(s.outputs) == 1 for s in plan.segments)


def _unrolled_rnn(steps: int, layer_first: bool) -> Graph:
    """A 2-layer RNN unrolled over ``steps`` with weights shared by every step, a zero initial
    state (an operator without inputs), and every step's top output into one concat + loss.
    ``layer_first`` lists all of layer 0 before layer 1 (as MXNet's JSON does)."""
    b = GraphBuilder()
    data = b.input("data", (1, 256))
    w0, w1 = b.param("w0", (256, 256)), b.param("w1", (256, 256))
    zero = b.op("zeros", "_zeros", [], (1, 256))
    bias = b.op("bias", "_ones", [], (1, 256))   # read by every step of layer 1
    xs = [b.op(f"x{t}", "slice_axis", [data], (1, 256)) for t in range(steps)]
    top = []
    if layer_first:
        h0 = [zero]
        for t in range(steps):
            h0.append(b.op(f"l0_t{t}", "FullyConnected", [xs[t], h0[-1], w0], (1, 256)))
        h1 = zero
        for t in range(steps):
            h1 = b.op(f"l1_t{t}", "FullyConnected", [h0[t + 1], h1, w1, bias], (1, 256))
            top.append(h1)
    else:
        h0 = h1 = zero
        for t in range(steps):
            h0 = b.op(f"l0_t{t}", "FullyConnected", [xs[t], h0, w0], (1, 256))
            h1 = b.op(f"l1_t{t}", "FullyConnected", [h0, h1, w1, bias], (1, 256))
            top.append(h1)
    cat = b.op("concat", "Concat", top, (steps, 256))
    label = b.input("label", (steps,))
    b.op("loss", "SoftmaxOutput", [cat, label], (steps, 256))
    return b.build()


@pytest.mark.parametrize("layer_first", [False, True])
def test_unrolled_rnn_shares_weights_across_segments_and_replays_its_zero_state(layer_first):
    graph = _unrolled_rnn(12, layer_first)
    plan = plan_segments(graph, 4)
    assert plan.count == 4
    assert {"w0", "w1"} <= set(plan.shared_variables())
    assert all(name not in ("zeros", "bias") for name, _ in plan.boundaries)  # never boundaries
    assert all("bias" in s.nodes for s in plan.segments)                  # replayed where read
    # Owned operators are computed once; only the data-independent ones repeat.
    counts = {}
    for segment in plan.segments:
        for name in segment.nodes:
            counts[name] = counts.get(name, 0) + 1
    assert {n for n, c in counts.items() if c > 1} == {"bias"}
    # Cuts follow the steps even when the graph lists a whole layer first: each cut
    # carries the two states (plus top outputs kept for the concat and the data slices).
    for segment in plan.segments[1:]:
        states = [e for e in segment.inputs if e[0].startswith(("l0_", "l1_"))]
        assert states, segment.inputs


def test_the_chosen_count_is_never_worse_than_one_segment_by_the_estimate():
    for graph in (chain(30), residual(10), _unrolled_rnn(16, True)):
        best = best_segment_plan(graph)
        single = plan_segments(graph, 1)
        assert single.count == 1 and single.boundary_bytes == 0
        assert best.estimated_bytes <= single.estimated_bytes
    assert best_segment_plan(chain(30)).count > 1


def test_recomputation_is_at_most_one_forward_of_the_segments_before_the_last():
    plan = plan_segments(chain(20), 5)
    single = plan_segments(chain(20), 1)
    assert single.recompute_fraction == 0.0
    assert 0.0 < plan.recompute_fraction < 0.34   # forward : backward = 1 : 2


def test_a_cut_after_the_graph_output_is_refused():
    graph = chain(4)
    late = graph.as_late_as_possible()
    with pytest.raises(ValueError, match="last segment"):
        segment_plan_for_cuts(graph, [late.index("loss")])
    with pytest.raises(ValueError, match="increase"):
        segment_plan_for_cuts(graph, [3, 2])


def test_plans_round_trip_through_their_dict_form():
    graph = residual(5)
    plan = plan_segments(graph, 3).with_mirrored({"b1_relu1", "b2_relu1"}, graph)
    again = SegmentPlan.from_dict(plan.to_dict())
    assert again == plan
    assert {n for s in plan.segments for n in s.mirrored} == {"b1_relu1", "b2_relu1"}
    # The replay flag (recompute_dropout with segments) survives the dict form and the other
    # derivations; entries written before it existed read as False.
    replayed = plan.with_replay_random().with_mirrored({"b1_relu1"}, graph).with_working_bytes(
        [1] * plan.count)
    assert replayed.replay_random and SegmentPlan.from_dict(replayed.to_dict()) == replayed
    old = plan.to_dict()
    del old["replay_random"]
    assert SegmentPlan.from_dict(old).replay_random is False


def test_two_level_marks_never_mirror_a_segment_output():
    graph = chain(10)
    plan = plan_segments(graph, 3)
    outputs = {name for s in plan.segments for name, _ in s.outputs}
    marked = plan.with_mirrored(_owned_ops(graph), graph)
    for segment in marked.segments:
        assert not segment.mirrored & outputs
        assert segment.mirrored


def test_owner_is_the_segment_with_the_largest_working_set():
    b = GraphBuilder()
    x = b.input("data", (1, 64))
    for i in range(6):
        x = b.op(f"small{i}", "Activation", [x], (1, 64))
    for i in range(6):
        x = b.op(f"big{i}", "Activation", [x], (1, 4096))
    label = b.input("label", (1,))
    b.op("loss", "SoftmaxOutput", [x, label], (1, 4096))
    plan = plan_segments(b.build(), 2)
    owner = plan.segments[plan.bind_order()[0]]
    assert any(n.startswith("big") for n in owner.nodes)


def test_single_node_graph_gives_one_segment():
    graph = Graph([Node("data", "null", NodeKind.INPUT, [], [(1, 4)]),
                   Node("out", "Activation", NodeKind.OP, [(0, 0)], [(1, 4)])], [(1, 0)])
    assert best_segment_plan(graph).count == 1


def _conv_bn_relu_graph():
    from tests.graphs import GraphBuilder

    builder = GraphBuilder()
    data = builder.input("data")
    conv = builder.op("conv", "Convolution", [data], with_weight=True)
    bn = builder.op("bn", "BatchNorm", [conv])
    relu = builder.op("relu", "Activation", [bn])
    conv2 = builder.op("conv2", "Convolution", [relu], with_weight=True)
    label = builder.input("label", (1,))
    builder.op("loss", "SoftmaxOutput", [conv2, label])
    return builder.build()


def test_copies_nothing_would_read_are_not_mirrored():
    # NOTE [ copies nothing reads ]: a convolution's gradient does not read its output, so its
    # copy is read only through a recomputed consumer; BatchNorm's reads its saved statistics.
    from mxnet_mirror_hook.core.liveness import drop_unread_copies

    graph = _conv_bn_relu_graph()
    assert drop_unread_copies(graph, {"conv"}) == frozenset()
    assert drop_unread_copies(graph, {"conv", "bn"}) == {"conv", "bn"}
    assert drop_unread_copies(graph, {"conv", "bn", "relu"}) == {"conv", "bn", "relu"}
    assert drop_unread_copies(graph, {"conv2"}) == frozenset()
    assert drop_unread_copies(graph, {"relu"}) == {"relu"}


def test_a_segment_output_kept_after_a_mirrored_convolution_drops_the_convolution():
    graph = _conv_bn_relu_graph()
    plan = plan_segments(graph, 2)
    outputs = {name for segment in plan.segments[:-1] for name, _ in segment.outputs}
    everything = [n.name for n in graph.op_nodes if n.can_mirror]
    with_graph = plan.with_mirrored(everything, graph)
    for segment in with_graph.segments:
        assert not segment.mirrored & outputs
        for name in segment.mirrored:
            node = graph.node(name)
            consumers = [graph.nodes[c].name for c in graph.consumers()[graph.index(name)]]
            assert node.op != "Convolution" or any(c in segment.mirrored for c in consumers)


def test_the_shared_pool_reuses_each_block_once_per_executor_and_appends_what_does_not_fit():
    """NOTE [ the shared pool's union ]: MXNet gives each planned block of an executor, largest
    first, the smallest pool block that fits and is still free for this executor."""
    assert shared_pool_bytes([]) == 0
    assert shared_pool_bytes([[8, 4]]) == 12
    # The same plan again reuses everything.
    assert shared_pool_bytes([[8, 4], [4, 8]]) == 12
    # Smaller blocks fit into larger ones, one executor block per pool block.
    assert shared_pool_bytes([[8, 4], [3, 3]]) == 12
    # Three small blocks find only two pool blocks: one is appended.
    assert shared_pool_bytes([[8, 4], [2, 2, 2]]) == 14
    # A larger block than any in the pool is appended, and stays for the next executor.
    assert shared_pool_bytes([[4], [16], [16, 4]]) == 20
    # Largest first, smallest fitting block: the 15 takes the 20, the 8 the 9; a lone 6 then
    # takes the 10 and the 4 finds nothing left.
    assert shared_pool_bytes([[20, 9], [15, 8]]) == 29
    assert shared_pool_bytes([[10], [6, 4]]) == 14


def test_least_pool_choice_takes_the_variants_whose_blocks_dovetail():
    """NOTE [ a match range per segment ]: a segment's own smallest plan is not always the one
    that adds least to the shared pool."""
    options = [
        {16: (12.0, [8, 4])},
        # Variant 2 plans less on its own (6) but as three blocks, one more than the pool has.
        {2: (6.0, [2, 2, 2]), 16: (7.0, [4, 3])},
    ]
    pool, keys = least_pool_choice(options)
    assert keys == [16, 16] and pool == 12
    assert shared_pool_bytes([[8, 4], [2, 2, 2]]) == 14   # what the smaller plan would cost


def test_least_pool_choice_binds_the_largest_planned_segment_first():
    """The chain binds by planned size (SegmentPlan.bind_order): a variant that makes a later
    segment the largest changes the order, and the choice follows it."""
    options = [{0: (5.0, [5])}, {"a": (3.0, [3]), "b": (9.0, [9])}]
    pool, keys = least_pool_choice(options)
    assert keys == [0, "a"] and pool == 5                 # [5] then [3]: reuses the 5
    assert least_pool_choice([{0: (5.0, [5])}, {"b": (9.0, [9])}])[0] == 9   # [9] first, then 5 fits


def test_least_pool_choice_descends_coordinate_wise_beyond_the_exhaustive_limit(monkeypatch):
    options = [{1: (8.0, [8]), 2: (7.0, [4, 3])}, {1: (6.0, [6]), 2: (6.0, [3, 3])},
               {1: (5.0, [5]), 2: (4.0, [2, 2])}]
    exhaustive = least_pool_choice(options)
    monkeypatch.setattr(segment_pool, "POOL_CHOICE_LIMIT", 1)
    descended = least_pool_choice(options)
    assert descended[0] >= exhaustive[0]
    # It starts from each segment's least plan and only ever improves on it.
    start = [2, 1, 2]
    chosen = [options[i][k] for i, k in enumerate(start)]
    order = sorted(range(3), key=lambda i: (-chosen[i][0], i))
    assert descended[0] <= shared_pool_bytes([chosen[i][1] for i in order])
    with pytest.raises(ValueError, match="at least one variant"):
        least_pool_choice([{}])
    assert least_pool_choice([]) == (0, [])


def test_alternative_cuts_move_one_cut_to_the_nearest_positions_crossed_by_no_more_bytes():
    graph = residual(8)
    cuts = choose_cuts(graph, 3)
    assert len(cuts) == 2
    base = segment_plan_for_cuts(graph, cuts)
    crossing = segment_crossings.crossings_of(graph.as_late_as_possible()).crossing
    found = alternative_cuts(graph, cuts, 3)
    assert 0 < len(found) <= 6
    for moved in found:
        changed = [i for i in range(2) if moved[i] != cuts[i]]
        assert len(changed) == 1 and moved == sorted(moved)
        i = changed[0]
        assert crossing[moved[i]] <= crossing[cuts[i]]
        plan = segment_plan_for_cuts(graph, moved)       # every segment owns an operator
        assert all(s.nodes for s in plan.segments)
        assert plan.boundary_bytes <= base.boundary_bytes
    # Per cut, nearest first.
    first = [m[0] for m in found if m[0] != cuts[0]]
    assert [abs(p - cuts[0]) for p in first] == sorted(abs(p - cuts[0]) for p in first)
    assert alternative_cuts(graph, cuts, 0) == []


def test_cut_positions_are_the_cuts_a_plan_was_made_with():
    graph = residual(6)
    for count in (2, 3, 4):
        cuts = choose_cuts(graph, count)
        assert cut_positions(graph, segment_plan_for_cuts(graph, cuts)) == cuts


def test_a_segment_match_range_is_kept_by_the_plan_cache_form_and_checked():
    plan = plan_segments(chain(8), 2)
    tuned = plan.with_match_ranges([2, 0])
    assert [s.match_range for s in tuned.segments] == [2, 0]
    again = SegmentPlan.from_dict(tuned.to_dict())
    assert [s.match_range for s in again.segments] == [2, 0]
    assert [s.match_range for s in again.with_working_bytes([5, 6]).segments] == [2, 0]
    old = tuned.to_dict()
    for segment in old["segments"]:
        del segment["match_range"]                         # a plan cached before 0.6
    assert [s.match_range for s in SegmentPlan.from_dict(old).segments] == [0, 0]
    with pytest.raises(ValueError, match="one match range per segment"):
        plan.with_match_ranges([2])
    with pytest.raises(ValueError, match=">= 0"):
        plan.with_match_ranges([-1, 2])


def test_boundary_gradients_of_a_linear_chain_share_one_array_per_shape():
    """NOTE [ boundary gradients share arrays ]: the gradient of the boundary after segment i
    lives from backward's step over segment i+1 to the start of the step over segment i."""
    plan = plan_segments(chain(12), 4)
    keys = {tuple(e): ((1, 1024, 16, 16), "float32") for e in plan.boundaries}
    slots = gradient_slots(plan, keys, keys)
    assert len(slots) == 3 and len(set(slots.values())) == 1
    # Not shareable: every boundary keeps an array; other shapes never share.
    assert len(set(gradient_slots(plan, keys).values())) == 3
    other = dict(keys)
    other[tuple(plan.boundaries[1])] = ((2,), "float32")
    mixed = gradient_slots(plan, other, other)
    assert mixed[tuple(plan.boundaries[0])] == mixed[tuple(plan.boundaries[2])]
    assert mixed[tuple(plan.boundaries[1])] != mixed[tuple(plan.boundaries[0])]


def test_boundary_gradients_that_live_at_the_same_time_get_different_arrays():
    """A tensor crossing two cuts (produced by segment 0, read by segment 2 only) is alive
    during the step over segment 1, when the other two boundaries' gradients are written."""
    graph = GraphBuilder()
    data = graph.input("data", (1, 1024, 16, 16))
    a = graph.op("a", "Activation", [data])
    e = graph.op("e", "Activation", [data])
    f = graph.op("f", "elemwise_add", [a, e])
    b = graph.op("b", "Activation", [f])
    d = graph.op("d", "elemwise_add", [b, e])
    label = graph.input("label", (1,))
    graph.op("loss", "SoftmaxOutput", [d, label])
    built = graph.build()
    position = {n.name: p for p, n in enumerate(built.as_late_as_possible().nodes)}
    plan = segment_plan_for_cuts(built, [position["f"], position["b"]])
    assert sorted(tuple(x) for x in plan.boundaries) == [("b", 0), ("e", 0), ("f", 0)]
    keys = {tuple(x): ((1, 1024, 16, 16), "float32") for x in plan.boundaries}
    slots = gradient_slots(plan, keys, keys)
    # f: written over segment 1, read when segment 0 starts; b: written over segment 2, read
    # when segment 1 starts; e: written over segment 2, read when segment 0 starts.
    assert slots[("f", 0)] == slots[("b", 0)] != slots[("e", 0)]
    # Summed (several readers) or otherwise unshareable boundaries keep their own.
    only_f = gradient_slots(plan, keys, [("f", 0)])
    assert len(set(only_f.values())) == 3
