"""The cost model with measured operator times (NOTE [ measured operator times ] in core/cost.py)."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook.core.cost import (BACKWARD_TO_FORWARD, MeasuredCosts, iteration_cost,
                                         measured_costs_of, node_costs, recompute_overhead,
                                         use_measured_costs)
from mxnet_mirror_hook.core.planners.dp import build_cut_chain
from mxnet_mirror_hook.core.segments import segment_plan_for_cuts
from tests.graphs import chain, residual


def _table(graph, forward=1.0, backward=3.0, skip=()):
    names = [n.name for n in graph.op_nodes if n.name not in skip]
    return MeasuredCosts({n: forward for n in names}, {n: backward for n in names})


def test_measured_times_replace_the_operation_count():
    graph = residual(3)
    table = _table(graph)
    everything = graph.mirrorable_names
    # One forward over forward + backward: 1 / (1 + 3), not the analytic 1 / 3.
    assert recompute_overhead(graph, everything, table) == pytest.approx(
        sum(1.0 for n in graph.op_nodes if n.can_mirror) / (4.0 * len(graph.op_nodes)))
    assert iteration_cost(graph, table) == pytest.approx(4.0 * len(graph.op_nodes))
    assert set(node_costs(graph, table).values()) == {1.0}
    assert recompute_overhead(graph, everything) == pytest.approx(1 / 3)  # without a table: unchanged


def test_a_node_the_table_misses_is_converted_at_the_tables_rate():
    graph = chain(4)
    ops = graph.op_nodes
    missing = ops[0].name
    table = _table(graph, skip=(missing,))
    analytic = node_costs(graph)
    rate = sum(1.0 for _ in ops[1:]) / sum(analytic[n.name] for n in ops[1:])
    costs = node_costs(graph, table)
    assert costs[missing] == pytest.approx(analytic[missing] * rate)
    assert iteration_cost(graph, table) == pytest.approx(
        4.0 * (len(ops) - 1) + costs[missing] * (1 + BACKWARD_TO_FORWARD))


def test_a_table_attached_to_the_graph_reaches_every_estimate_and_can_be_removed():
    graph = residual(2)
    everything = graph.mirrorable_names
    analytic = recompute_overhead(graph, everything)
    table = _table(graph, forward=1.0, backward=1.0)
    use_measured_costs(graph, table)
    assert measured_costs_of(graph) is table
    attached = recompute_overhead(graph, everything)
    assert attached == pytest.approx(recompute_overhead(graph, everything, table))
    late = graph.as_late_as_possible()
    assert iteration_cost(late) == pytest.approx(iteration_cost(graph, table))
    cuts = [len(late.nodes) // 2]
    plan = segment_plan_for_cuts(graph, cuts, build_cut_chain(graph, max_frontier=len(late.nodes),
                                                               max_cuts=len(late.nodes)))
    rerun = sum(1 for n in late.nodes[:cuts[0] + 1] if n.is_variable is False)
    assert plan.recompute_fraction == pytest.approx(rerun / iteration_cost(graph, table))
    use_measured_costs(graph, None)
    assert measured_costs_of(graph) is None
    assert recompute_overhead(graph, everything) == pytest.approx(analytic)
