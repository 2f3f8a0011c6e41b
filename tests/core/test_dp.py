"""The cut-set dynamic programs against brute force, and the backward-liveness table (no MXNet)."""
from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings, strategies as st

from mxnet_mirror_hook.core.budget import parse_budget
from mxnet_mirror_hook.core.graph import NodeKind
from mxnet_mirror_hook.core.liveness import gradient_reads_inputs, read_by_backward
from mxnet_mirror_hook.core.planners import Candidate, Decision, get_planner, select_candidate
from mxnet_mirror_hook.core.planners.base import ONE_FORWARD
from mxnet_mirror_hook.core.planners.dp import (Segment, build_cut_chain, evaluate_schedule,
                                                least_compute_decisions, least_memory_decisions,
                                                min_cost_schedule, min_peak_schedule,
                                                schedule_decision)
from tests.graphs import GraphBuilder, random_dags, residual
from tests.core.test_planners import lstm_like, model_measure

OPS = ["Activation", "Convolution", "BatchNorm", "elemwise_add", "Pooling", "Dropout", "Flatten"]


def random_graphs():
    """Random DAGs of up to 8 operators with mixed operator types and sizes."""
    return random_dags(max_size=8, max_fan_in=2, ops=OPS, elements=(1, 64))


def all_schedules(chain):
    """Every increasing sequence of cuts ending at the final one, with every mode per segment."""
    inner = list(range(1, chain.end))
    for count in range(len(inner) + 1):
        for cuts in itertools.combinations(inner, count):
            ends = list(cuts) + [chain.end]
            for modes in itertools.product((True, False), repeat=len(ends)):
                yield [Segment(end, mode) for end, mode in zip(ends, modes)]


@settings(max_examples=120, deadline=None)
@given(random_graphs(), st.sampled_from([1, 2, 3]), st.sampled_from([0.0, 1.0, 2.0]))
def test_least_memory_program_matches_brute_force(graph, max_frontier, grad_factor):
    chain = build_cut_chain(graph, max_frontier, grad_factor=grad_factor)
    best = min(evaluate_schedule(chain, s)[0] for s in all_schedules(chain))
    found, schedule = min_peak_schedule(chain, resolution=1)
    assert found == pytest.approx(best, abs=1.0)
    assert evaluate_schedule(chain, schedule)[0] == found


@settings(max_examples=120, deadline=None)
@given(random_graphs(), st.sampled_from([1, 2]), st.floats(0.2, 1.0))
def test_least_compute_program_matches_brute_force(graph, max_frontier, fraction):
    chain = build_cut_chain(graph, max_frontier)
    evaluated = [evaluate_schedule(chain, s) for s in all_schedules(chain)]
    limit = max(peak for peak, _ in evaluated) * fraction
    fitting = [cost for peak, cost in evaluated if peak <= limit]
    schedule = min_cost_schedule(chain, limit, max_labels=None)
    if not fitting:
        assert schedule is None
        return
    peak, cost = evaluate_schedule(chain, schedule)
    assert peak <= limit
    assert cost == pytest.approx(min(fitting), rel=1e-9, abs=1e-9)


def test_least_compute_under_a_loose_limit_recomputes_nothing():
    graph = residual(4)
    chain = build_cut_chain(graph)
    everything = evaluate_schedule(chain, [Segment(chain.end, False)])[0]
    schedule = min_cost_schedule(chain, everything)
    assert schedule_decision(chain, schedule) == frozenset()


def test_tighter_limits_trade_memory_for_recomputation():
    graph = residual(6)
    chain = build_cut_chain(graph)
    everything = evaluate_schedule(chain, [Segment(chain.end, False)])[0]
    points = [evaluate_schedule(chain, min_cost_schedule(chain, everything * f, max_labels=None))
              for f in (0.9, 0.7, 0.5)]
    peaks = [p for p, _ in points]
    costs = [c for _, c in points]
    assert peaks == sorted(peaks, reverse=True) and costs == sorted(costs)
    assert costs[-1] > costs[0]


def test_least_memory_schedule_recomputes_segments_and_keeps_their_frontiers():
    graph = residual(8)
    chain = build_cut_chain(graph, max_frontier=1, grad_factor=1.0)
    peak, schedule = min_peak_schedule(chain, resolution=1)
    everything = evaluate_schedule(chain, [Segment(chain.end, False)])[0]
    assert peak < 0.7 * everything
    mirrored = schedule_decision(chain, schedule)
    kept_outputs = {n.name for n in graph.op_nodes if n.name.endswith("_out")} - mirrored
    assert kept_outputs, "some block outputs are kept as checkpoints"
    assert any(name.endswith("_conv1") for name in mirrored)


def test_schedule_must_run_through_increasing_cuts_to_the_end():
    chain = build_cut_chain(residual(2))
    with pytest.raises(ValueError, match="end"):
        evaluate_schedule(chain, [Segment(1, True)])
    with pytest.raises(ValueError, match="increasing"):
        evaluate_schedule(chain, [Segment(2, True), Segment(1, True), Segment(chain.end, True)])


def test_dp_planner_is_registered_and_never_worse_than_unmirrored():
    graph = residual(6)
    outcome = get_planner("dp").plan(graph, parse_budget(None), model_measure(graph))
    assert outcome.chosen.planned_mb <= outcome.baseline_mb
    labels = [c.decision.label for c in outcome.candidates]
    assert any(label.startswith("dp least memory") for label in labels)
    assert any(label.startswith("dp least compute") for label in labels)


def test_programs_find_cuts_on_recurrent_graphs():
    graph = lstm_like(12)
    decisions = least_memory_decisions(graph) + least_compute_decisions(graph, (0.5,))
    assert decisions and all(d.mirrored for d in decisions)


def test_auto_runs_the_compute_sweep_only_for_a_fixed_limit():
    graph = residual(6)
    free = get_planner("auto").plan(graph, parse_budget("min"), model_measure(graph))
    limited = get_planner("auto").plan(graph, parse_budget(0.9), model_measure(graph))
    assert not any("least compute" in c.decision.label for c in free.candidates)
    assert any("least compute" in c.decision.label for c in limited.candidates)


# -------------------------------------------------------------- budget None vs 'min'
def test_default_budget_is_lowest_memory_within_one_extra_forward():
    candidates = [Candidate(Decision(frozenset(), "plain"), 100.0, 0.0),
                  Candidate(Decision(frozenset({"a"}), "one forward"), 50.0, ONE_FORWARD),
                  Candidate(Decision(frozenset({"a", "b"}), "two forwards"), 30.0, 2 * ONE_FORWARD)]
    assert select_candidate(candidates, parse_budget(None), 100.0).decision.label == "one forward"
    assert select_candidate(candidates, parse_budget("min"), 100.0).decision.label == "two forwards"
    assert math.isclose(ONE_FORWARD, 1 / 3)


# ------------------------------------------------------------------------ liveness
def test_backward_reads_conv_inputs_relu_outputs_and_nothing_of_additions():
    b = GraphBuilder()
    data = b.input("data")
    conv = b.op("conv", "Convolution", [data], with_weight=True)
    bn = b.op("bn", "BatchNorm", [conv])
    relu = b.op("relu", "Activation", [bn])
    add = b.op("add", "elemwise_add", [relu, conv])
    flat = b.op("flat", "Flatten", [add])
    b.op("loss", "SoftmaxOutput", [flat, b.input("label", (1,))])
    graph = b.build()
    read = dict(zip((n.name for n in graph.nodes), read_by_backward(graph)))
    assert read["conv"]  # BatchNorm's gradient reads its input
    assert not read["bn"]  # ReLU's gradient reads its own output, not its input
    assert read["relu"]
    assert not read["add"] and not read["flat"]
    assert read["loss"]
    assert not read["data"]  # variables are not in MXNet's plan


def test_unknown_operators_are_assumed_to_read_everything():
    assert gradient_reads_inputs("SomeCustomOp")
    assert gradient_reads_inputs("Convolution")
    assert not gradient_reads_inputs("Activation")
    assert not gradient_reads_inputs("elemwise_add")


# ------------------------------------------------------------ linearising for cuts
def projections_first(steps=10):
    """An RNN listed as MXNet's JSON lists an unrolled LSTM: every input projection first."""
    b = GraphBuilder()
    data = b.input("data")
    split = b.op("split", "SliceChannel", [data])
    projections = [b.op(f"proj{t}", "FullyConnected", [split], with_weight=True)
                   for t in reversed(range(steps))][::-1]
    h = b.op("h0", "Activation", [projections[0]])
    c = b.op("c0", "Activation", [h])
    for t in range(1, steps):
        gates = b.op(f"gates{t}", "elemwise_add", [projections[t], h])
        mixed = b.op(f"mix{t}", "elemwise_add", [gates, c])
        c = b.op(f"c{t}", "Activation", [mixed])
        h = b.op(f"h{t}", "elemwise_mul", [c, gates])
    b.op("loss", "SoftmaxOutput", [h, b.input("label", (1,))])
    return b.build()


def test_late_order_is_topological_and_keeps_every_node():
    graph = projections_first()
    late = graph.as_late_as_possible()
    assert sorted(n.name for n in late.nodes) == sorted(n.name for n in graph.nodes)
    for position, node in enumerate(late.nodes):
        assert all(source < position for source, _ in node.inputs)
        original = graph.node(node.name)
        assert [late.nodes[s].name for s, _ in node.inputs] == \
            [graph.nodes[s].name for s, _ in original.inputs]
    # Each projection now sits next to the step that reads it.
    assert late.index("proj5") > late.index("h3")


def test_late_order_turns_projection_first_rnns_into_small_cuts():
    from mxnet_mirror_hook.core.planners.frontier import frontiers

    def cut_after_step_2(g):
        return any("h2" in {g.nodes[i].name for i in f.nodes} for f in frontiers(g, 4))

    graph = projections_first(12)
    # In the JSON order the later projections cross every early step boundary.
    assert not cut_after_step_2(graph)
    assert cut_after_step_2(graph.as_late_as_possible())
    decisions = least_memory_decisions(graph, ((3, 0.5),))
    assert decisions and decisions[0].mirrored


def test_chains_keep_their_order():
    graph = residual(3)
    assert graph.as_late_as_possible() is graph or \
        [n.name for n in graph.as_late_as_possible().nodes if n.kind is NodeKind.OP] == \
        [n.name for n in graph.op_nodes]
