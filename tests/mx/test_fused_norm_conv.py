"""A BatchNorm and relu recomputed inside the Convolution reading them (mx/fused_norm_conv.py,
core/fused_norm_conv.py): the pattern by position, the rewrite, gradients, moving statistics and
training against the plain graph (bit for bit without MKLDNN), the static plan, cost and workspace."""
from __future__ import annotations

import json
import zlib

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.core.cost import forward_cost
from mxnet_mirror_hook.core.fused_norm_conv import (FUSED_NORM_CONV_OP, SLOT_PREFIX, WORKSPACE_SLOTS,
                                                    find_fused_norm_convs, fused_norm_conv_cost,
                                                    fused_norm_conv_workspace, is_fused_norm_conv,
                                                    norm_conv_recompute_cost)
from mxnet_mirror_hook.core.graph import KEEP_ATTR
from mxnet_mirror_hook.mx import workspace
from mxnet_mirror_hook.mx.convert import normalize_inputs, structural_graph, symbol_to_graph
from mxnet_mirror_hook.mx.fused_norm_conv import recompute_norm_convs
from mxnet_mirror_hook.testing.models import gluon_symbol, small_resnet
from tests.helpers import train
from tests.mx.test_core_attention import run

SHAPES = {"data": (4, 3, 8, 8), "softmax_label": (4,)}


def found(symbol):
    return find_fused_norm_convs(structural_graph(json.loads(symbol.tojson())))


def chain(**bn) -> "mx.sym.Symbol":
    """``conv -> BatchNorm -> relu -> conv`` twice (repeated names), a softmax loss."""
    x = mx.sym.var("data")
    for index in range(2):
        x = mx.sym.Convolution(x, weight=mx.sym.var(f"w{index}"), num_filter=6, kernel=(3, 3), pad=(1, 1),
                               no_bias=True, name="conv")
        x = mx.sym.BatchNorm(x, gamma=mx.sym.var(f"g{index}"), beta=mx.sym.var(f"b{index}"),
                             moving_mean=mx.sym.var(f"m{index}"), moving_var=mx.sym.var(f"v{index}"),
                             name="bn", **bn)
        x = x[0] if bn.get("output_mean_var") else x
        x = mx.sym.Activation(x, act_type="relu", name="relu")
    x = mx.sym.Convolution(x, num_filter=4, kernel=(1, 1), stride=(2, 2), name="last")  # with a bias
    x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=10, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax")


# ------------------------------------------------------------------------- pattern
def test_both_bottleneck_norms_of_every_resnet50_block_are_found_by_position():
    symbol = gluon_symbol("resnet50_v1b")[0]
    graph = structural_graph(json.loads(symbol.tojson()))
    matches = find_fused_norm_convs(graph)
    assert len(matches) == 32  # 16 bottlenecks x (bn1 -> relu -> conv2, bn2 -> relu -> conv3)
    for match in matches:
        assert graph.nodes[match.norm].op == "BatchNorm"
        assert graph.nodes[match.relu].inputs == [(match.norm, 0)]
        assert graph.nodes[match.conv].op == "Convolution"
        assert graph.nodes[match.conv].inputs[0] == (match.relu, 0)


def test_small_resnet_fuses_the_inner_norm_of_each_block_only():
    matches = found(small_resnet())  # the stem's relu has two readers; the second norm feeds an add
    assert len(matches) == 3
    assert len(found(chain())) == 2  # repeated names: matched by position


@pytest.mark.parametrize("bn", [{"use_global_stats": True}, {"output_mean_var": True}])
def test_global_statistics_and_visible_mean_and_variance_are_left_alone(bn):
    assert found(chain(**bn)) == []


def test_second_readers_graph_outputs_and_kept_nodes_are_left_alone():
    x = mx.sym.BatchNorm(mx.sym.var("data"), name="bn")
    relu = mx.sym.Activation(x, act_type="relu", name="relu")
    conv = mx.sym.Convolution(relu, num_filter=4, kernel=(1, 1), name="conv")
    assert len(found(conv)) == 1
    assert found(mx.sym.Group([conv, relu])) == []                               # relu is an output
    assert found(conv + mx.sym.Convolution(relu, num_filter=4, kernel=(1, 1))) == []  # two readers
    assert found(mx.sym.Group([conv, x])) == []                                  # bn is an output
    assert found(mx.sym.Convolution(mx.sym.Activation(x, act_type="tanh"), num_filter=4, kernel=(1, 1))) == []
    kept = mx.sym.Activation(x, act_type="relu", name="relu", attr={KEEP_ATTR: "True"})
    assert found(mx.sym.Convolution(kept, num_filter=4, kernel=(1, 1))) == []


def test_rewrite_keeps_arguments_auxiliary_states_and_outputs_and_marks_the_operator_kept():
    symbol = chain()
    rewritten = recompute_norm_convs(symbol)
    assert rewritten.list_arguments() == symbol.list_arguments()
    assert rewritten.list_auxiliary_states() == symbol.list_auxiliary_states()
    assert rewritten.list_outputs() == symbol.list_outputs()
    nodes = json.loads(rewritten.tojson())["nodes"]
    fused = [node for node in nodes if node["op"] == "Custom"]
    assert len(fused) == 2 and all(node["attrs"]["op_type"] == FUSED_NORM_CONV_OP for node in fused)
    assert all(node["attrs"][KEEP_ATTR] == "True" for node in fused)
    assert not any(node["op"] in ("BatchNorm", "Activation") for node in nodes)
    nothing = mx.sym.var("x") * 2
    assert recompute_norm_convs(nothing) is nothing


# ------------------------------------------------------------------ gradients, statistics
def _bind(symbol, given, seed=0):
    requests = {name: ("null" if name in given else "write") for name in symbol.list_arguments()}
    executor = symbol.simple_bind(mx.cpu(), grad_req=requests, **given)
    for name, array in executor.arg_dict.items():
        rng = np.random.RandomState(seed + zlib.crc32(name.encode()) % 10000)
        label = name == "softmax_label"
        array[:] = rng.randint(0, 10, array.shape) if label else rng.uniform(-1, 1, array.shape)
    for name, array in executor.aux_dict.items():
        array[:] = np.random.RandomState(zlib.crc32(name.encode()) % 10000).uniform(0.5, 1.5, array.shape)
    return executor


def compare(symbol, given, exact: bool, rounds: int = 2) -> None:
    """Outputs, gradients and moving statistics of ``rounds`` training iterations and one inference
    of the plain and the rewritten symbol."""
    results = []
    for candidate in (symbol, recompute_norm_convs(symbol)):
        executor = _bind(candidate, given)
        for _ in range(rounds):
            executor.forward(is_train=True)
            executor.backward()
        trained = executor.outputs[0].asnumpy()
        executor.forward(is_train=False)
        arrays = {f"grad {k}": v for k, v in executor.grad_dict.items() if v is not None}
        arrays.update({f"aux {k}": v for k, v in executor.aux_dict.items()})
        arrays.update(trained=trained, inferred=executor.outputs[0])
        results.append({k: v if isinstance(v, np.ndarray) else v.asnumpy() for k, v in arrays.items()})
    plain, fused = results
    assert sorted(plain) == sorted(fused)
    for key in plain:
        if exact:
            assert np.array_equal(plain[key], fused[key]), key
        else:
            np.testing.assert_allclose(fused[key], plain[key], rtol=1e-4, atol=1e-4, err_msg=key)


CASES = [(small_resnet, SHAPES), (chain, {"data": (4, 3, 8, 8), "softmax_label": (4,)}),
         (lambda: chain(fix_gamma=True, eps=1e-3, momentum=0.8),
          {"data": (2, 3, 6, 6), "softmax_label": (2,)})]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients_and_moving_statistics_match_the_plain_graph(case):
    make, given = CASES[case]
    compare(make(), given, exact=False)


def exact() -> None:
    """Without MKLDNN: outputs, gradients and moving statistics equal the plain graph's exactly."""
    for make, given in CASES:
        compare(make(), given, exact=True)
    print("identical")


def test_gradients_and_moving_statistics_are_bit_identical_without_mkldnn():
    assert "identical" in run("from tests.mx.test_fused_norm_conv import exact; exact()", mkldnn=False)


def module_steps(exact: bool = True) -> None:
    """Two SGD steps of ``Module`` on the plain and the rewritten small ResNet."""
    symbol = small_resnet()
    (plain_args, plain_aux), (fused_args, fused_aux) = (
        train(mx.mod.Module(s, context=mx.cpu()), (4, 3, 8, 8), 10, steps=2)
        for s in (symbol, recompute_norm_convs(symbol)))
    assert sorted(plain_args) == sorted(fused_args) and sorted(plain_aux) == sorted(fused_aux)
    for plain, fused in ((plain_args, fused_args), (plain_aux, fused_aux)):
        for key in plain:
            if exact:
                assert np.array_equal(plain[key], fused[key]), key
            else:
                np.testing.assert_allclose(fused[key], plain[key], rtol=1e-4, atol=1e-5, err_msg=key)
    print("trained identically")


def test_two_module_steps_give_bit_identical_parameters_and_statistics_without_mkldnn():
    output = run("from tests.mx.test_fused_norm_conv import module_steps; module_steps()", mkldnn=False)
    assert "trained identically" in output


def test_two_module_steps_match_the_plain_module():
    module_steps(exact=False)


# ---------------------------------------------------------------- memory, cost
def static_mb(symbol, given) -> int:
    requests = {name: ("null" if name in given else "write") for name in symbol.list_arguments()}
    executor = symbol.simple_bind(mx.cpu(), grad_req=requests, **given)
    line = next(line for line in executor.debug_str().splitlines() if "MB allocated" in line)
    return int(line.split()[1])


def test_static_plan_of_the_rewritten_network_drops_the_relu_outputs():
    given = {"data": (64, 3, 32, 32), "softmax_label": (64,)}
    symbol = small_resnet(channels=32)
    plain, fused = (static_mb(s, given) for s in (symbol, recompute_norm_convs(symbol)))
    relu_mb = 3 * 64 * 32 * 32 * 32 * 4 / (1 << 20)  # three blocks' relu outputs, float32
    assert plain - fused >= relu_mb - 1


def test_cost_and_workspace_of_the_fused_operator():
    symbol = small_resnet()
    inputs = normalize_inputs(sorted(SHAPES.items()))
    plain = symbol_to_graph(symbol, inputs)
    graph = symbol_to_graph(recompute_norm_convs(symbol), inputs)
    fused = [node for node in graph.nodes if is_fused_norm_conv(node)]
    by_name = {node.symbol_name: node for node in plain.nodes}
    norm, relu, conv = by_name["block0_a_bn"], by_name["block0_a_relu"], by_name["block0_b_conv"]
    assert len(fused) == 3
    recomputed = forward_cost(plain, norm) + forward_cost(plain, relu)
    assert norm_conv_recompute_cost(graph, fused[0]) == recomputed > 0
    assert fused_norm_conv_cost(graph, fused[0]) == \
        forward_cost(plain, norm) + forward_cost(plain, relu) + forward_cost(plain, conv)
    assert fused_norm_conv_workspace(graph) == len(WORKSPACE_SLOTS) * 4 * 8 * 8 * 8 * 4  # x: 4x8x8x8 float32
    assert fused_norm_conv_workspace(plain) == 0


def test_training_keeps_the_buffers_between_calls():
    workspace.release()
    executor = _bind(recompute_norm_convs(small_resnet()), SHAPES)
    for _ in range(2):
        executor.forward(is_train=True)
        executor.backward()
        mx.nd.waitall()
        mine = {key: array for key, array in workspace._buffers.items() if key[2].startswith(SLOT_PREFIX)}
        assert {SLOT_PREFIX + slot for slot in WORKSPACE_SLOTS} <= {key[2] for key in mine}
        assert all(mine[(k[0], k[1], SLOT_PREFIX + slot)].size == 4 * 8 * 8 * 8
                   for k in mine for slot in WORKSPACE_SLOTS)
