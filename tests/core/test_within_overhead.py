"""The one-level plan within an overhead limit (``Budget.within_overhead``; NOTE [ the one-level
plan within an overhead limit ] in planning/selective.py), on hand-built graphs (no MXNet)."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook.core.budget import Budget
from mxnet_mirror_hook.core.cost import recompute_overhead
from mxnet_mirror_hook.core.planners import Candidate, Decision, get_planner, select_candidate
from mxnet_mirror_hook.core.planners.auto.modelled import search_starts
from mxnet_mirror_hook.core.planners.dp import least_memory_within_overhead, prefix_within_overhead
from mxnet_mirror_hook.errors import BudgetError
from tests.core.test_planners import model_measure
from tests.graphs import residual


def test_an_overhead_budget_caps_overhead_has_no_memory_limit_and_its_own_key():
    budget = Budget.within_overhead(0.06)
    assert budget.overhead_limit == 0.06 and not budget.is_limit
    assert budget.limit_mb(1000.0) is None
    assert budget.key == "overhead:0.06" and budget.key != Budget.within_overhead(0.05).key
    assert "6%" in str(budget)
    for bad in (-0.01, float("nan"), float("inf")):
        with pytest.raises(BudgetError):
            Budget.within_overhead(bad)


def test_select_takes_the_least_memory_within_the_overhead_limit():
    candidates = [Candidate(Decision(frozenset(), "plain"), 100.0, 0.0),
                  Candidate(Decision(frozenset({"a"}), "cheap"), 80.0, 0.04),
                  Candidate(Decision(frozenset({"b"}), "at the limit"), 70.0, 0.06),
                  Candidate(Decision(frozenset({"a", "b"}), "dear"), 40.0, 0.10)]
    chosen = select_candidate(candidates, Budget.within_overhead(0.06), 100.0)
    assert chosen.decision.label == "at the limit"
    assert select_candidate(candidates, Budget.within_overhead(0.0), 100.0).decision.label == "plain"


@pytest.mark.parametrize("limit", [0.05, 0.1, 0.2, 0.3])
def test_the_bisected_program_recomputes_within_the_limit(limit):
    graph = residual(8)
    found = least_memory_within_overhead(graph, limit)
    assert found, "a residual chain has plans within a few percent"
    for decision in found:
        assert 0 < recompute_overhead(graph, decision.mirrored) <= limit + 1e-9


def test_the_bisected_program_proposes_nothing_when_nothing_fits_the_limit():
    assert least_memory_within_overhead(residual(8), 0.0) == []


@pytest.mark.parametrize("limit", [0.05, 0.2])
def test_the_prefix_start_is_the_longest_prefix_of_the_forward_order_within_the_limit(limit):
    graph = residual(8)
    movable = [node.name for node in graph.op_nodes if node.can_mirror]
    (prefix,) = prefix_within_overhead(graph, limit)
    count = len(prefix.mirrored)
    assert prefix.mirrored == frozenset(movable[:count])
    assert recompute_overhead(graph, prefix.mirrored) <= limit + 1e-9
    assert recompute_overhead(graph, movable[:count + 1]) > limit
    assert prefix_within_overhead(graph, 0.0) == []


def test_only_an_overhead_limit_searches_from_more_than_one_start():
    assert search_starts(Budget.within_overhead(0.06)) > 1
    assert search_starts(Budget("auto")) == search_starts(Budget("min")) == 1


@pytest.mark.parametrize("planner", ["auto", "dp", "memonger"])
def test_every_planner_respects_an_overhead_budget(planner):
    graph = residual(8)
    outcome = get_planner(planner).plan(graph, Budget.within_overhead(0.08), model_measure(graph))
    assert outcome.chosen.overhead <= 0.08 + 1e-9
    assert outcome.chosen.planned_mb <= outcome.baseline_mb
    within = [c for c in outcome.candidates if c.overhead <= 0.08 + 1e-9]
    assert outcome.chosen.planned_mb == min(c.planned_mb for c in within)


def test_auto_under_an_overhead_budget_measures_the_program_within_it():
    graph = residual(8)
    outcome = get_planner("auto").plan(graph, Budget.within_overhead(0.3), model_measure(graph))
    labels = [c.decision.label for c in outcome.candidates]
    assert any(label.startswith("dp least memory within +30%") for label in labels)
    assert outcome.chosen.planned_mb < outcome.baseline_mb and outcome.chosen.overhead <= 0.3 + 1e-9
