"""The forward graph: validation, cut points, labels (pure Python, no MXNet)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mxnet_mirror_hook.core.graph import Graph, Node, NodeKind, repeat_keys
from tests.graphs import GraphBuilder, chain, residual


def test_every_operator_of_a_chain_is_a_cut_point():
    graph = chain(5)
    assert graph.cut_points() == ["relu0", "relu1", "relu2", "relu3", "relu4", "loss"]


def test_diamond_interior_is_not_a_cut_point():
    b = GraphBuilder()
    x = b.op("split", "Activation", [b.input("data")])
    left = b.op("left", "Activation", [x])
    right = b.op("right", "Activation", [x])
    joined = b.op("join", "elemwise_add", [left, right])
    b.op("loss", "MakeLoss", [joined])
    graph = b.build()
    assert graph.cut_points() == ["split", "join", "loss"]


def test_residual_block_joins_are_the_cut_points():
    graph = residual(3)
    cuts = graph.cut_points()
    assert cuts == ["stem", "b0_add", "b0_out", "b1_add", "b1_out", "b2_add", "b2_out", "loss"]
    assert "b1_conv1" not in cuts and "b1_relu1" not in cuts


def test_cut_points_do_not_depend_on_topological_order():
    # Same diamond, branches listed in the other order and the label first.
    b = GraphBuilder()
    label = b.input("label", (1,))
    x = b.op("split", "Activation", [b.input("data")])
    right = b.op("right", "Activation", [x])
    left = b.op("left", "Activation", [x])
    joined = b.op("join", "elemwise_add", [left, right])
    b.op("loss", "SoftmaxOutput", [joined, label])
    assert b.build().cut_points() == ["split", "join", "loss"]


def test_a_second_graph_output_removes_cut_points_before_it():
    b = GraphBuilder()
    x = b.op("a", "Activation", [b.input("data")])
    y = b.op("b", "Activation", [x])
    z = b.op("c", "Activation", [y])
    graph = b.build(z, x)  # x is also a graph output
    assert graph.cut_points() == ["a"]  # b and c are not on the path data -> a


def test_labels_are_found_by_structure_not_by_name():
    b = GraphBuilder()
    x = b.op("fc", "FullyConnected", [b.input("pixels")], with_weight=True)
    target = b.input("whatever_target", (1,))
    b.op("out", "SoftmaxOutput", [x, target])
    graph = b.build()
    assert [graph.nodes[i].name for i in graph.label_input_indices()] == ["whatever_target"]


def test_graph_rejects_a_bad_order():
    with pytest.raises(ValueError, match="topological"):
        Graph([Node("a", "relu", NodeKind.OP, [(1, 0)]), Node("b", "null", NodeKind.INPUT)], [(0, 0)])


def test_dropout_is_never_mirrorable():
    b = GraphBuilder()
    x = b.op("drop", "Dropout", [b.input("data")])
    b.op("loss", "MakeLoss", [x])
    graph = b.build()
    assert graph.mirrorable_names == ["loss"]
    assert not graph.node("drop").can_mirror


def test_planned_bytes_are_four_per_element_whatever_the_dtype():
    node = Node("h", "relu", NodeKind.OP, [], [(2, 3)], itemsize=2)
    assert node.nbytes == 12 and node.planned_bytes == 24


def test_planning_core_does_not_import_mxnet():
    code = ("import sys; import mxnet_mirror_hook.core as c; "
            "from mxnet_mirror_hook.core.planners import get_planner; get_planner('auto'); "
            "assert 'mxnet' not in sys.modules, sorted(m for m in sys.modules if 'mxnet' in m)")
    # Import the core package without executing mxnet_mirror_hook/__init__.py.
    loader = ("import importlib.util, sys, os; root = os.getcwd(); "
              "spec = importlib.util.spec_from_file_location('mxnet_mirror_hook', "
              "os.path.join(root, 'mxnet_mirror_hook', '__init__.py'), "
              "submodule_search_locations=[os.path.join(root, 'mxnet_mirror_hook')]); "
              "mod = importlib.util.module_from_spec(spec); sys.modules['mxnet_mirror_hook'] = mod; ")
    result = subprocess.run([sys.executable, "-c", loader + code], capture_output=True, text=True,
                            cwd=__file__.rsplit("/tests/", 1)[0])
    assert result.returncode == 0, result.stderr


def test_repeated_names_get_keys_by_position_and_keep_the_symbols_name():
    b = GraphBuilder()
    x = b.op("relu", "Activation", [b.input("data")])
    y = b.op("fc", "FullyConnected", [x], with_weight=True)
    z = b.op("relu", "Activation", [y])
    w = b.op("relu", "Activation", [z])
    b.op("loss", "MakeLoss", [w])
    graph = b.build()
    ops = [n for n in graph.op_nodes if n.op == "Activation"]
    assert [n.name for n in ops] == ["relu", "relu#1", "relu#2"]
    assert [n.symbol_name for n in ops] == ["relu", "relu", "relu"]
    assert [graph.index(n.name) for n in ops] == sorted(graph.index(n.name) for n in ops)
    assert graph.node("relu#1").inputs == [(graph.index("fc"), 0)]
    assert graph.mirrorable_names.count("relu#2") == 1
    # Reordering keeps every node's key (the keys are not recomputed from the new order).
    late = graph.as_late_as_possible()
    assert {n.name: n.symbol_name for n in late.nodes} == {n.name: n.symbol_name for n in graph.nodes}


def test_a_key_another_node_already_has_as_its_name_is_skipped():
    assert repeat_keys(["a", "a#1", "a", "a"]) == ["a", "a#1", "a#2", "a#3"]
    assert repeat_keys(["x", "y"]) == ["x", "y"]
    nodes = [Node("a", "null", NodeKind.INPUT), Node("a", "relu", NodeKind.OP, [(0, 0)]),
             Node("a#1", "relu", NodeKind.OP, [(1, 0)])]
    graph = Graph(nodes, [(2, 0)])
    assert [n.name for n in graph.nodes] == ["a", "a#2", "a#1"]
    assert nodes[1].name == "a"  # the caller's nodes are not modified
