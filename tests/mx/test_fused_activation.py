"""An activation recomputed inside the product reading it (mx/fused_activation.py,
core/fused_activation.py): the pattern by position, the rewrite, gradients and training against the
plain graph (bit for bit without MKLDNN), the static plan, the cost and workspace counts."""
from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.core.cost import forward_cost
from mxnet_mirror_hook.core.fused_activation import (FUSED_ACTIVATION_OP, SLOT_PREFIX, WORKSPACE_SLOTS,
                                                     activation_recompute_cost, find_fused_activations,
                                                     fused_activation_cost, fused_activation_workspace,
                                                     is_fused_activation)
from mxnet_mirror_hook.core.graph import KEEP_ATTR
from mxnet_mirror_hook.mx import workspace
from mxnet_mirror_hook.mx.attention import recompute_core_attention
from mxnet_mirror_hook.mx.convert import structural_graph
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.mx.fused_activation import recompute_activations
from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes
from tests.helpers import train
from tests.mx.test_core_attention import bind, gradients, run, shapes, small_bert


def found(symbol, only_freeing=True):
    return find_fused_activations(structural_graph(json.loads(symbol.tojson())), only_freeing)


def mlp(act_op: str = "LeakyReLU", act_type: str = "gelu", no_bias: bool = False, flatten: bool = True,
        **act_attrs) -> "mx.sym.Symbol":
    """Two hidden layers ``fc -> act -> fc -> act -> out`` with a softmax loss (repeated names)."""
    x = mx.sym.var("data")
    for index in range(2):
        bias = {} if no_bias else {"bias": mx.sym.var(f"b{index}")}
        x = mx.sym.FullyConnected(x, weight=mx.sym.var(f"w{index}"), num_hidden=24, no_bias=no_bias,
                                  flatten=flatten, name="fc", **bias)
        x = getattr(mx.sym, act_op)(x, act_type=act_type, name="act", **act_attrs)
    x = mx.sym.FullyConnected(x, num_hidden=5, no_bias=no_bias, flatten=flatten, name="out")
    return mx.sym.SoftmaxOutput(x, name="softmax", preserve_shape=not flatten)


MLP_SHAPES = {"data": (6, 3, 10), "softmax_label": (6,)}


def mlp_shapes(flatten: bool = True):
    return MLP_SHAPES if flatten else {"data": (6, 3, 10), "softmax_label": (6, 3)}


ACTIVATIONS = [("LeakyReLU", "gelu", {}), ("LeakyReLU", "elu", {"slope": 0.3}), ("LeakyReLU", "selu", {}),
               ("LeakyReLU", "leaky", {"slope": 0.1}), ("Activation", "relu", {}),
               ("Activation", "sigmoid", {}), ("Activation", "tanh", {}), ("Activation", "softrelu", {}),
               ("Activation", "softsign", {})]


def two_branches() -> "mx.sym.Symbol":
    """Two feed-forward branches of one input, summed: two fused operators with no order between them."""
    x = mx.sym.var("data")
    outs = []
    for index in range(2):
        h = mx.sym.FullyConnected(x, num_hidden=32, flatten=False, name=f"up{index}")
        h = mx.sym.LeakyReLU(h, act_type="gelu", name=f"gelu{index}")
        outs.append(mx.sym.FullyConnected(h, num_hidden=8, flatten=False, name=f"down{index}"))
    return mx.sym.LinearRegressionOutput(mx.sym.sum(outs[0] + outs[1], axis=(1, 2)), name="loss")


# ------------------------------------------------------------------------- pattern
def test_every_feed_forward_gelu_is_found_by_position_and_the_mlm_head_gelu_is_not():
    graph = structural_graph(json.loads(bert_mlm(dropout=0.0).tojson()))  # BERT-base, 12 layers
    matches = find_fused_activations(graph)
    assert len(matches) == 12
    for match in matches:
        assert graph.nodes[match.activation].op == "LeakyReLU"
        assert match.activation_attrs["act_type"] == "gelu"
        assert graph.nodes[match.product].op == "FullyConnected"
        assert graph.nodes[match.product].inputs[0] == (match.activation, 0)
        assert match.product_attrs["num_hidden"] == "768" and match.product_attrs["flatten"] == "False"
    head = [p for p, node in enumerate(graph.nodes) if node.name == "mlm_gelu"]
    assert head and head[0] not in {match.activation for match in matches}  # it feeds a LayerNorm


def test_repeated_names_are_matched_by_position():
    matches = found(mlp())
    assert len(matches) == 2 and matches[0].activation != matches[1].activation
    ops = [node["op"] for node in json.loads(recompute_activations(mlp()).tojson())["nodes"]]
    assert ops.count("Custom") == 2 and "LeakyReLU" not in ops


def test_activation_with_a_second_reader_or_as_a_graph_output_is_left_alone():
    z = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=8, name="fc1")
    g = mx.sym.LeakyReLU(z, act_type="gelu", name="gelu")
    y = mx.sym.FullyConnected(g, num_hidden=4, name="fc2")
    twice = mx.sym.Group([y, mx.sym.sum(g, name="other")])
    as_head = mx.sym.Group([y, g])
    as_weight = mx.sym.FullyConnected(mx.sym.var("x"), weight=g, num_hidden=8, no_bias=True, name="fc3")
    assert len(found(y)) == 1
    for symbol in (twice, as_head, as_weight):
        assert found(symbol) == []
        assert recompute_activations(symbol) is symbol


def test_nodes_marked_kept_and_unknown_parameters_are_left_alone():
    z = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=8, name="fc1")
    with mx.AttrScope(**{KEEP_ATTR: "True"}):
        kept = mx.sym.LeakyReLU(z, act_type="gelu", name="gelu")
    assert found(mx.sym.FullyConnected(kept, num_hidden=4, name="fc2")) == []
    prelu = mx.sym.LeakyReLU(z, gamma=mx.sym.var("gamma"), act_type="prelu", name="prelu")
    assert found(mx.sym.FullyConnected(prelu, num_hidden=4, name="fc2")) == []
    rrelu = mx.sym.LeakyReLU(z, act_type="rrelu", name="rrelu")
    assert found(mx.sym.FullyConnected(rrelu[0], num_hidden=4, name="fc2")) == []


def test_a_relu_whose_input_nothing_else_reads_is_fused_only_when_asked():
    """Its backward reads only its output, so fusing it would keep z for g: nothing freed."""
    assert found(mlp("Activation", "relu")) == []
    assert len(found(mlp("Activation", "relu"), only_freeing=False)) == 2
    z = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=8, name="fc1")
    y = mx.sym.FullyConnected(mx.sym.Activation(z, act_type="relu"), num_hidden=4, name="fc2")
    assert len(found(mx.sym.Group([y, mx.sym.sum(z)]))) == 1  # z is read elsewhere: g is freed


# ------------------------------------------------------------------------- rewrite
def test_rewrite_keeps_arguments_outputs_and_marks_the_operator_kept():
    symbol = small_bert(layers=2)
    with mx.AttrScope(__mirror_stage__="s1"):
        staged = mx.sym.FullyConnected(mx.sym.LeakyReLU(mx.sym.var("data"), act_type="gelu"), num_hidden=3,
                                       name="staged")
    for original in (symbol, staged):
        rewritten = recompute_activations(original)
        assert rewritten.list_arguments() == original.list_arguments()
        assert rewritten.list_outputs() == original.list_outputs()
        assert rewritten.list_auxiliary_states() == original.list_auxiliary_states()
    internals = recompute_activations(symbol).get_internals().list_outputs()
    assert "enc0_ffn2_output" in internals and "enc0_gelu_output" not in internals
    graph = symbol_to_graph(recompute_activations(symbol), normalize_inputs(sorted(shapes().items())))
    fused = [node for node in graph.nodes if is_fused_activation(node)]
    assert len(fused) == 2
    assert all(node.attrs[KEEP_ATTR] == "True" and not node.can_mirror for node in fused)
    assert all(node.attrs["op_type"] == FUSED_ACTIVATION_OP for node in fused)
    staged_node = json.loads(recompute_activations(staged).tojson())["nodes"][-1]
    assert staged_node["attrs"]["__mirror_stage__"] == "s1" and staged_node["op"] == "Custom"


# ------------------------------------------------------------------- gradients
def bind_requests(symbol, given, grad_req, given_shapes=None):
    """:func:`bind`'s executor of ``symbol`` with ``grad_req`` for every argument but the inputs
    (``'null'``: only the weight and bias of the first fused product and the last bias; MKLDNN's
    product backward in MXNet 1.9.1 leaves the bias gradient unwritten when the weight's is not
    asked for, so a product with only its weight unrequested would compare with that)."""
    shapes_ = given_shapes or given
    if grad_req == "write":
        return bind(symbol, shapes_)
    requests = {name: "null" if name in given else grad_req for name in symbol.list_arguments()}
    if grad_req == "null":
        requests.update({name: "write" for name in requests if name not in given})
        requests.update(w1="null", b1="null", out_bias="null")
    executor = symbol.simple_bind(mx.cpu(), grad_req=requests, **shapes_)
    for name, array in bind(symbol, shapes_).arg_dict.items():
        executor.arg_dict[name][:] = array
    for array in executor.grad_arrays:
        if array is not None:
            array[:] = 0
    return executor


def compare(symbol, given, only_freeing=True, grad_req="write", exact=False, rounds=1, attention=False,
            given_shapes=None):
    """Outputs and gradients of ``symbol`` and of its rewrite after ``rounds`` forward/backward
    (``attention``: its core attention recomputed in one operator too; ``given_shapes``: shapes
    when some are of arguments with gradients, ``given`` then names the inputs)."""
    rewritten = recompute_activations(recompute_core_attention(symbol) if attention else symbol, only_freeing)
    assert rewritten is not symbol
    results = []
    for candidate in (symbol, rewritten):
        executor = bind_requests(candidate, given, grad_req, given_shapes)
        for _ in range(rounds):
            grads, out = gradients(executor)
        results.append((grads, out))
    (left, out_left), (right, out_right) = results
    assert sorted(right) == sorted(left)
    if exact:
        check = np.testing.assert_array_equal
    else:
        def check(actual, desired, err_msg):
            np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6, err_msg=err_msg)
    check(out_right, out_left, err_msg="output")
    for name in left:
        check(right[name], left[name], err_msg=name)


def cases():
    """(name, symbol, shapes, only_freeing) of every configuration the gradient tests compare."""
    yield "bert", small_bert(), shapes(), True
    yield "branches", two_branches(), {"data": (4, 6, 16), "loss_label": (4,)}, True
    for act_op, act_type, attrs in ACTIVATIONS:
        yield f"{act_type}", mlp(act_op, act_type, **attrs), MLP_SHAPES, False
    yield "no_bias", mlp(no_bias=True), MLP_SHAPES, True
    yield "not_flattened", mlp("Activation", "tanh", flatten=False), mlp_shapes(False), True


@pytest.mark.parametrize("name", [case[0] for case in cases()])
def test_fused_gradients_match_the_plain_graph(name):
    _, symbol, given, only_freeing = next(case for case in cases() if case[0] == name)
    compare(symbol, given, only_freeing)


@pytest.mark.parametrize("grad_req", ["add", "null"])
def test_added_and_unrequested_gradients_match_the_plain_graph(grad_req):
    compare(mlp(), MLP_SHAPES, grad_req=grad_req, rounds=2)


def of_an_argument() -> "mx.sym.Symbol":
    """The activation of an argument ``x`` (its gradient is the operator's input gradient)."""
    y = mx.sym.FullyConnected(mx.sym.LeakyReLU(mx.sym.var("x"), act_type="gelu"), num_hidden=6, name="fc")
    return mx.sym.LinearRegressionOutput(mx.sym.sum(y, axis=1), name="loss")


ARGUMENT_SHAPES = {"x": (5, 12), "loss_label": (5,)}


def test_an_accumulated_gradient_of_the_activation_input_matches_the_plain_graph():
    compare(of_an_argument(), {"loss_label": (5,)}, grad_req="add", rounds=2, given_shapes=ARGUMENT_SHAPES)


def test_with_the_core_attention_operator_gradients_match_the_plain_graph():
    compare(small_bert(padding_mask=True), shapes(True), attention=True)


def test_fused_gradients_are_bit_identical_without_mkldnn():
    output = run("from tests.mx.test_fused_activation import exact; exact()", mkldnn=False)
    assert output.count("identical") == len(list(cases())) + 4


def exact() -> None:
    """Without MKLDNN: outputs and gradients of every case equal the plain graph's exactly."""
    for name, symbol, given, only_freeing in cases():
        compare(symbol, given, only_freeing, exact=True)
        print("identical", name)
    for grad_req in ("add", "null"):
        compare(mlp(), MLP_SHAPES, grad_req=grad_req, exact=True, rounds=2)
        print("identical", grad_req)
    compare(small_bert(padding_mask=True), shapes(True), exact=True, attention=True)
    print("identical with the core attention operator")
    compare(of_an_argument(), {"loss_label": (5,)}, grad_req="add", exact=True, rounds=2,
            given_shapes=ARGUMENT_SHAPES)
    print("identical accumulated input gradient")


# ------------------------------------------------------------------- training
def gelu_classifier() -> "mx.sym.Symbol":
    x = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=64, name="fc0")
    x = mx.sym.LeakyReLU(x, act_type="gelu", name="gelu0")
    x = mx.sym.FullyConnected(x, num_hidden=32, name="fc1")
    x = mx.sym.Activation(x, act_type="tanh", name="tanh1")
    x = mx.sym.FullyConnected(x, num_hidden=10, name="out")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def module_steps(contexts: int = 1, exact: bool = True) -> None:
    """Two SGD steps of ``Module`` on the plain and the rewritten classifier over ``contexts`` CPU
    contexts (two: two executors whose callbacks run at once): the same parameters."""
    symbol = gelu_classifier()
    rewritten = recompute_activations(symbol)
    assert len(found(symbol)) == 2
    context = [mx.cpu(i) for i in range(contexts)]
    (plain, _), (fused, _) = (train(mx.mod.Module(s, context=context), (16, 20), 10, steps=2)
                              for s in (symbol, rewritten))
    assert sorted(plain) == sorted(fused)
    for name in plain:
        if exact:
            np.testing.assert_array_equal(fused[name], plain[name], err_msg=name)
        else:
            np.testing.assert_allclose(fused[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)
    print("trained identically on", contexts)


def test_two_module_steps_give_bit_identical_parameters_without_mkldnn():
    output = run("from tests.mx.test_fused_activation import module_steps; module_steps(1); module_steps(2)",
                 mkldnn=False)
    assert "trained identically on 1" in output and "trained identically on 2" in output


def test_two_module_steps_on_two_contexts_match_the_plain_module():
    module_steps(2, exact=False)


# ---------------------------------------------------------------- memory, cost
def static_mb(symbol, given) -> int:
    executor = symbol.simple_bind(mx.cpu(), **given)
    line = next(line for line in executor.debug_str().splitlines() if "MB allocated" in line)
    return int(line.split()[1])


def test_static_plan_of_the_rewritten_bert_drops_the_gelu_outputs():
    symbol = bert_mlm(layers=2, units=64, heads=4, hidden=1024, vocab=100, seq_len=64, max_length=64,
                      masked=8, dropout=0.0)
    data, label = bert_mlm_shapes(8, 64, masked=8)
    plain, fused = (static_mb(s, dict(data + label)) for s in (symbol, recompute_activations(symbol)))
    gelu_mb = 2 * 64 * 8 * 1024 * 4 / (1 << 20)  # two layers' batch x seq x hidden float32
    assert plain - fused >= gelu_mb - 1


def test_cost_and_workspace_of_the_fused_operator():
    symbol = small_bert()
    inputs = normalize_inputs(sorted(shapes().items()))
    plain = symbol_to_graph(symbol, inputs)
    graph = symbol_to_graph(recompute_activations(symbol), inputs)
    fused = [node for node in graph.nodes if is_fused_activation(node)]
    gelus = [node for node in plain.nodes if node.op == "LeakyReLU" and node.symbol_name.startswith("enc")]
    products = [node for node in plain.nodes if node.symbol_name.endswith("ffn2")]
    assert len(fused) == len(gelus) == len(products) == 2
    assert activation_recompute_cost(graph, fused[0]) == forward_cost(plain, gelus[0]) > 0
    assert fused_activation_cost(graph, fused[0]) == \
        forward_cost(plain, gelus[0]) + forward_cost(plain, products[0])
    assert fused_activation_workspace(graph) == gelus[0].nbytes  # one kept buffer of z
    assert fused_activation_workspace(plain) == 0


def test_training_keeps_one_buffer_of_the_largest_input_between_calls():
    workspace.release()
    executor = bind(recompute_activations(small_bert()), shapes())
    gradients(executor)
    mine = {key: array for key, array in workspace._buffers.items() if key[2].startswith(SLOT_PREFIX)}
    assert sorted(key[2] for key in mine) == sorted(SLOT_PREFIX + slot for slot in WORKSPACE_SLOTS)
    assert all(array.size == SEQ_BATCH_HIDDEN for array in mine.values())
    gradients(executor)
    assert all(workspace._buffers[key] is array for key, array in mine.items())


SEQ_BATCH_HIDDEN = 32 * 4 * 128  # small_bert: seq 32, batch 4, hidden 128
