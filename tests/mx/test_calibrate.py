"""Measured operator times (NOTE [ calibrating the cost model ] in mx/calibrate.py)."""
from __future__ import annotations

import json
import os

import mxnet as mx
import pytest

from mxnet_mirror_hook import plan_mirror
from mxnet_mirror_hook.core.cost import recompute_overhead
from mxnet_mirror_hook.mx import calibrate as calibration
from mxnet_mirror_hook.mx.calibrate import (TABLE_FILE, calibrate, calibrated_costs, node_signature,
                                            round_seconds, table_costs)
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph

SHAPES = {"data": (8, 3, 64, 64)}


def _net():
    net = mx.sym.Variable("data")
    for i in range(3):
        net = mx.sym.Convolution(net, kernel=(3, 3), pad=(1, 1), num_filter=16, name=f"conv{i}")
        net = mx.sym.BatchNorm(net, name=f"bn{i}")
        net = mx.sym.Activation(net, act_type="relu", name=f"relu{i}")
    net = mx.sym.FullyConnected(net, num_hidden=10, name="fc")
    return mx.sym.SoftmaxOutput(net, name="softmax")


def _graph():
    return symbol_to_graph(_net(), normalize_inputs(list(SHAPES.items())))


def test_times_are_rounded_to_two_significant_digits():
    assert round_seconds(0.0123456) == 0.012
    assert round_seconds(1.26) == 1.3
    assert round_seconds(0.0) == 0.0


def test_every_operator_is_timed_once_and_the_table_is_reused(tmp_path, monkeypatch):
    graph = _graph()
    table = calibrated_costs(graph, mx.cpu(), str(tmp_path), repeats=1)
    assert set(table.forward) == {n.name for n in graph.op_nodes}
    assert all(t >= 0 for t in table.forward.values()) and sum(table.backward.values()) > 0
    saved = json.load(open(os.path.join(tmp_path, TABLE_FILE)))["entries"]
    assert node_signature(graph, graph.node("conv1"), "cpu") in saved

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although the table has every operator")

    monkeypatch.setattr(calibration, "measure_node", refuse)
    again = calibrated_costs(graph, mx.cpu(), str(tmp_path))
    assert again == table


def test_same_operator_at_the_same_shapes_shares_one_entry():
    graph = _graph()
    # conv1 and conv2 read 16 channels at the same shape; conv0 reads the 3-channel data.
    conv0, conv1, conv2 = (node_signature(graph, graph.node(f"conv{i}"), "cpu") for i in range(3))
    assert conv1 == conv2 and conv0 != conv1
    assert conv1 != node_signature(graph, graph.node("conv1"), "gpu")


def test_a_plan_is_reproducible_from_an_injected_table(tmp_path, monkeypatch):
    graph = _graph()
    # An injected table: every forward 1 ms, every backward 2 ms (no timing anywhere).
    entries = {node_signature(graph, n, "cpu"): [0.001, 0.002] for n in graph.op_nodes}
    os.makedirs(tmp_path / "cache")
    with open(os.path.join(tmp_path, "cache", TABLE_FILE), "w") as handle:
        json.dump({"version": 1, "entries": entries}, handle)
    monkeypatch.setattr(calibration, "measure_node", lambda *a, **k: pytest.fail("timed an operator"))
    plans = [plan_mirror(_net(), list(SHAPES.items()), memory_budget="min", cache_dir=str(tmp_path / "cache"))
             for _ in range(2)]
    assert plans[0].mirrored == plans[1].mirrored
    mirrorable = [n for n in plans[0].mirrored if graph.node(n).can_mirror]
    count = len(graph.op_nodes)
    # One forward (1 ms) per recomputed node over 3 ms per node of the iteration.
    assert plans[0].overhead == pytest.approx(len(mirrorable) / (3.0 * count))
    assert plans[0].overhead != pytest.approx(recompute_overhead(graph, plans[0].mirrored))


def test_planning_reads_a_complete_table_only_and_never_measures(tmp_path, monkeypatch):
    graph = _graph()
    assert table_costs(graph, "cpu", str(tmp_path)) is None  # no table: the analytic model
    calibrate(_net(), list(SHAPES.items()), ctx=mx.cpu(), cache_dir=str(tmp_path), repeats=1, method="alone")
    assert set(table_costs(graph, "cpu", str(tmp_path)).forward) == {n.name for n in graph.op_nodes}
    assert table_costs(graph, "gpu", str(tmp_path)) is None
    wider = symbol_to_graph(_net(), normalize_inputs([("data", (8, 3, 32, 32))]))
    assert table_costs(wider, "cpu", str(tmp_path)) is None  # other shapes: not in the table
    monkeypatch.setattr(calibration, "measure_node", lambda *a, **k: pytest.fail("planning timed"))
    plan = plan_mirror(_net(), list(SHAPES.items()), cache_dir=str(tmp_path))
    assert plan.planned_mb <= plan.baseline_mb


def test_profiled_times_cover_every_operator_inside_the_graph(tmp_path):
    graph = _graph()
    table = calibration.profiled_costs(_net(), graph, SHAPES, mx.cpu())
    assert set(table.forward) == {n.name for n in graph.op_nodes}
    assert all(t >= 0 for t in table.forward.values()) and sum(table.backward.values()) > 0
    saved = calibrate(_net(), list(SHAPES.items()), ctx=mx.cpu(), cache_dir=str(tmp_path))
    assert table_costs(graph, "cpu", str(tmp_path)) == saved  # planning reads what was saved
