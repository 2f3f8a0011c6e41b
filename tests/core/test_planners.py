"""Planners, budgets and the cost model on hand-built graphs (no MXNet)."""
from __future__ import annotations


import threading

import pytest
from hypothesis import given, settings

from mxnet_mirror_hook.core.budget import Budget, parse_budget
from mxnet_mirror_hook.core.cost import forward_cost, iteration_cost, recompute_overhead
from mxnet_mirror_hook.core.graph import Node, NodeKind
from mxnet_mirror_hook.core.timeline import mirrored_segments
from tests.graphs import estimate_planned_bytes
from mxnet_mirror_hook.core.planners import (Candidate, Decision, get_planner, list_planners,
                                             select_candidate)
from mxnet_mirror_hook.core.planners.auto import auto_stages
from mxnet_mirror_hook.core.planners.memonger import search_thresholds, threshold_plan, user_stages
from mxnet_mirror_hook.errors import BudgetError, BudgetUnreachableError, UnknownPlannerError
from tests.graphs import GraphBuilder, chain, random_dags, residual

MB = 1 << 20


def model_measure(graph):
    """A stand-in for MXNet: the Chen-style estimate, in MB, counting calls."""
    calls = []

    def measure(mirrored):
        calls.append(mirrored)
        return estimate_planned_bytes(graph, mirrored) / MB

    measure.calls = calls
    return measure


# ---------------------------------------------------------------- threshold heuristic
def test_threshold_zero_keeps_every_stage_and_recomputes_the_rest():
    graph = chain(8, stage_every=2)             # stages: relu1, relu3, relu5, relu7
    result = threshold_plan(graph, 0, user_stages(graph))
    assert result.kept == ("relu1", "relu3", "relu5", "relu7")
    assert result.mirrored == frozenset({"relu0", "relu2", "relu4", "relu6", "loss"})
    assert result.saved_bytes == 4 * MB


def test_threshold_groups_stages_into_segments_of_that_size():
    graph = chain(8, stage_every=1)
    result = threshold_plan(graph, 3 * MB, user_stages(graph))
    # data (1 MB) + relu0..relu2 pass 3 MB at relu2; then every 4th node.
    assert result.kept == ("relu2", "relu6")
    assert result.max_segment_bytes == 4 * MB


def test_same_named_stage_is_kept_or_recomputed_together():
    graph = chain(6)
    stages = {"relu1": "s1", "relu2": "s1", "relu4": "s2", "relu5": "s2"}
    result = threshold_plan(graph, 0, stages)
    assert set(result.kept) == {"relu1", "relu2", "relu4", "relu5"}


def test_parameters_do_not_count_towards_segments():
    graph = residual(2)
    with_params = threshold_plan(graph, 0, auto_stages(graph))
    activations = sum(n.planned_bytes for n in graph.nodes if n.kind is NodeKind.INPUT)
    assert with_params.max_segment_bytes >= activations
    assert all(graph.node(name).kind is NodeKind.OP for name in with_params.mirrored)


def test_search_tries_the_seeds_threshold_sequence():
    graph = chain(64, stage_every=1)
    thresholds = [t for t, _ in search_thresholds(graph, user_stages(graph))]
    assert thresholds[0] == 0
    assert len(thresholds) >= 3
    # second guess: sqrt(saved * local / 2) from threshold 0 (each stage kept, 1 MB each)
    assert thresholds[1] == int((64 * 2 / 2) ** 0.5)


# ------------------------------------------------------------------------ planners
def test_registry_lists_planners_and_rejects_unknown_names():
    assert {"auto", "memonger", "none"} <= set(list_planners())
    with pytest.raises(UnknownPlannerError, match="auto"):
        get_planner("chen")
    with pytest.raises(TypeError):
        get_planner(3)


@pytest.mark.parametrize("graph_factory", [lambda: chain(30), lambda: residual(6)])
def test_auto_planner_saves_memory_on_unmarked_graphs(graph_factory):
    graph = graph_factory()
    measure = model_measure(graph)
    outcome = get_planner("auto").plan(graph, parse_budget(None), measure)
    assert outcome.chosen.planned_mb < 0.6 * outcome.baseline_mb
    assert outcome.chosen.decision.mirrored
    assert 0 < outcome.chosen.overhead <= 1 / 3 + 1e-9


def test_memonger_planner_without_marks_falls_back_to_unmirrored():
    graph = residual(6)
    outcome = get_planner("memonger").plan(graph, parse_budget(None), model_measure(graph))
    assert outcome.chosen.decision.mirrored == frozenset()
    assert outcome.chosen.planned_mb == outcome.baseline_mb


def test_none_planner_measures_once_and_mirrors_nothing():
    graph = chain(10)
    measure = model_measure(graph)
    outcome = get_planner("none").plan(graph, parse_budget(None), measure)
    assert outcome.chosen.decision.mirrored == frozenset()
    assert len(measure.calls) == 1


def test_each_decision_is_measured_once():
    graph = chain(40)
    measure = model_measure(graph)
    get_planner("auto").plan(graph, parse_budget(None), measure)
    assert len(measure.calls) == len(set(measure.calls))


def test_planners_never_return_worse_than_baseline_even_with_a_hostile_measure():
    graph = residual(4)

    def hostile(mirrored):  # every mirrored plan measures worse
        return 100.0 + len(mirrored)

    for name in ("auto", "memonger", "none"):
        outcome = get_planner(name).plan(graph, parse_budget(None), hostile)
        assert outcome.chosen.decision.mirrored == frozenset()
        assert outcome.chosen.planned_mb == 100.0


# ------------------------------------------------------------------------ budgets
def test_a_percentage_is_the_same_budget_and_cache_key_as_its_fraction():
    assert parse_budget("60%").key == parse_budget(0.6).key == parse_budget("0.6").key
    for bad in ("0%", "150%", "%", "60%%"):
        with pytest.raises(BudgetError, match="60%|percentage"):
            parse_budget(bad)


@pytest.mark.parametrize("text, expected", [
    (None, Budget("auto")), ("min", Budget("min")), (0.6, Budget("fraction", 0.6)),
    ("0.5", Budget("fraction", 0.5)), ("512MB", Budget("bytes", 512 * MB)),
    ("4GB", Budget("bytes", 4 * 1024 * MB)), (2 * 1024 * MB, Budget("bytes", 2 * 1024 * MB)),
    ("1.5 GiB", Budget("bytes", 1.5 * 1024 * MB)), (1, Budget("fraction", 1.0)),
    ("60%", Budget("fraction", 0.6)), ("60 %", Budget("fraction", 0.6)),
    (" 12.5% ", Budget("fraction", 0.125)), ("100%", Budget("fraction", 1.0)),
])
def test_budget_parsing(text, expected):
    if text == 1:
        with pytest.raises(BudgetError, match="under 1 MB"):
            parse_budget(text)
        return
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", [-1, 0, 0.0, 1.5, "-3GB", "lots", "5 parsecs", float("nan")])
def test_nonsense_budgets_raise_value_errors_naming_the_problem(bad):
    with pytest.raises(BudgetError) as error:
        parse_budget(bad)
    assert "memory_budget" in str(error.value)


@pytest.mark.parametrize("bad", [True, [1], {"mb": 3}])
def test_budgets_of_the_wrong_type_raise_type_errors(bad):
    with pytest.raises(TypeError, match="memory_budget"):
        parse_budget(bad)


def _candidates():
    return [Candidate(Decision(frozenset(), "plain"), 100.0, 0.0),
            Candidate(Decision(frozenset({"a"}), "light"), 70.0, 0.05),
            Candidate(Decision(frozenset({"a", "b"}), "heavy"), 40.0, 0.30)]


def test_budget_picks_the_cheapest_candidate_that_fits():
    assert select_candidate(_candidates(), parse_budget(0.8), 100.0).decision.label == "light"
    assert select_candidate(_candidates(), parse_budget(0.5), 100.0).decision.label == "heavy"
    assert select_candidate(_candidates(), parse_budget("min"), 100.0).decision.label == "heavy"
    assert select_candidate(_candidates(), parse_budget(1.0), 100.0).decision.label == "plain"


def test_impossible_budget_reports_the_smallest_reachable_memory():
    with pytest.raises(BudgetUnreachableError) as error:
        select_candidate(_candidates(), parse_budget(0.2), 100.0)
    assert error.value.min_reachable_mb == 40.0
    assert "40 MB" in str(error.value) and isinstance(error.value, ValueError)


# --------------------------------------------------------------------- cost model
def test_convolution_cost_counts_multiply_adds():
    b = GraphBuilder()
    x = b.input("data", (2, 3, 8, 8))
    w = b.param("w", (4, 3, 3, 3))
    b.nodes.append(Node("conv", "Convolution", NodeKind.OP, [(x, 0), (w, 0)], [(2, 4, 8, 8)], 4,
                        {"kernel": "(3, 3)", "num_group": "1"}))
    graph = b.build()
    assert forward_cost(graph, graph.node("conv")) == 2 * (2 * 4 * 8 * 8) * 3 * 9


def test_recomputing_everything_costs_one_forward_pass():
    graph = residual(3)
    everything = graph.mirrorable_names
    assert recompute_overhead(graph, everything) == pytest.approx(1 / 3)
    assert recompute_overhead(graph, []) == 0.0
    cheap = [n for n in everything if "relu" in n]
    assert recompute_overhead(graph, cheap) < 0.01
    assert iteration_cost(graph) > 0


def test_memory_model_counts_kept_outputs_plus_largest_segment():
    graph = chain(4)
    assert estimate_planned_bytes(graph, frozenset()) == 5 * MB
    mirrored = frozenset({"relu0", "relu1", "relu3"})
    assert sorted(map(sorted, mirrored_segments(graph, mirrored))) == [["relu0", "relu1"], ["relu3"]]
    assert estimate_planned_bytes(graph, mirrored) == 2 * MB + 2 * MB


# ------------------------------------------------------------- property: cut points
def _all_paths_pass(graph, name):
    """Brute force: does removing ``name`` disconnect data from the output?"""
    blocked = graph.index(name)
    reach = [False] * len(graph.nodes)
    reach[0] = True
    for i, node in enumerate(graph.nodes):
        if i and i != blocked:
            reach[i] = any(reach[s] for s, _ in node.inputs)
    head = graph.heads[0][0]
    return head == blocked or not reach[head]


@settings(max_examples=150, deadline=None)
@given(random_dags())
def test_cut_points_match_brute_force_on_random_dags(graph):
    region = graph.activation_region()
    expected = [n.name for i, n in enumerate(graph.nodes)
                if region[i] and _all_paths_pass(graph, n.name)]
    assert graph.cut_points() == expected


# ------------------------------------------------------------------ frontier cuts
def lstm_like(steps=8):
    """Two tensors (h, c) cross every step boundary together: no single-node cut points."""
    b = GraphBuilder()
    h = b.op("h0", "Activation", [b.input("data")])
    c = b.op("c0", "Activation", [h])
    for t in range(1, steps + 1):
        gates = b.op(f"gates{t}", "FullyConnected", [h], with_weight=True)
        mixed = b.op(f"mix{t}", "elemwise_add", [gates, c])
        c = b.op(f"c{t}", "Activation", [mixed])
        h = b.op(f"h{t}", "elemwise_mul", [c, gates])
    label = b.input("label", (1,))
    b.op("loss", "SoftmaxOutput", [h, label])
    return b.build()


def test_recurrent_graph_has_no_single_cut_points_but_small_frontiers():
    from mxnet_mirror_hook.core.planners.frontier import frontiers

    graph = lstm_like()
    assert [n for n in graph.cut_points() if n.startswith(("mix", "gates"))] == []
    found = frontiers(graph, 2)
    crossing = [{graph.nodes[i].name for i in f.nodes} for f in found]
    assert {"h3", "c3"} in crossing


def test_auto_falls_back_to_frontier_cuts_on_recurrent_graphs():
    graph = lstm_like(16)
    outcome = get_planner("auto").plan(graph, parse_budget(None), model_measure(graph))
    assert outcome.chosen.planned_mb < 0.7 * outcome.baseline_mb
    assert "frontier" in outcome.chosen.decision.label


def test_candidates_mxnet_refuses_are_skipped_but_a_refused_baseline_fails():
    from mxnet_mirror_hook.errors import MeasurementError

    graph = residual(4)
    honest = model_measure(graph)

    def picky(mirrored):
        if len(mirrored) % 2:  # refuse some candidates, as MXNet's bind sometimes does
            raise MeasurementError("refused")
        return honest(mirrored)

    outcome = get_planner("auto").plan(graph, parse_budget(None), picky)
    assert all(len(c.decision.mirrored) % 2 == 0 for c in outcome.candidates)

    def refuses_all(mirrored):
        raise MeasurementError("refused")

    with pytest.raises(MeasurementError):
        get_planner("auto").plan(graph, parse_budget(None), refuses_all)


class _SlowFirst:
    """A measurement whose first batch (the prefetched one) answers last."""

    def __init__(self, graph):
        from mxnet_mirror_hook.core.planners.base import NullProgress

        self.graph = graph
        self.calls = []
        self.first = threading.Event()
        self.progress = NullProgress()

    def executed_graph(self):
        return None

    def __call__(self, mirrored):
        return self.many([mirrored])[0]

    def many(self, keys):
        self.calls.append(list(keys))
        if len(self.calls) == 1:
            self.first.wait(5)  # released once the planning thread has measured its own
        else:
            self.first.set()
        return [float(estimate_planned_bytes(self.graph, k)) for k in keys]


def test_prefetched_candidates_are_recorded_in_the_order_they_are_evaluated():
    from mxnet_mirror_hook.core.planners.base import CandidateEvaluator

    graph = chain(6)
    names = [n.name for n in graph.op_nodes if n.can_mirror]
    measure = _SlowFirst(graph)
    evaluator = CandidateEvaluator(graph, measure)
    best = [Decision(frozenset(names[:2]), "best"), Decision(frozenset(names[2:4]), "second")]
    evaluator.prefetch(best)
    searched = Decision(frozenset(names[1:3]), "searched")
    results = evaluator.evaluate_many([searched] + best)
    evaluator.close()
    assert [c.decision.label for c in results] == ["searched", "best", "second"]
    assert [c.decision.label for c in evaluator.candidates] == ["searched", "best", "second"]
    # Each decision was measured once: the prefetched pair in the background, the other here.
    assert sorted(len(call) for call in measure.calls) == [1, 2]
