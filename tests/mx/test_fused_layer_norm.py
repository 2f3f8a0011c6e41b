"""LayerNorm recomputed inside the FullyConnected reading it (mx/fused_layer_norm.py,
core/fused_layer_norm.py): the pattern, the rewrite, gradients and training against the plain
graph, composition with the core attention, the static plan, cost and workspace."""
from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.core.cost import forward_cost
from mxnet_mirror_hook.core.fused_layer_norm import (FUSED_LAYER_NORM_OP, SLOT_PREFIX,
                                                     find_layer_norm_fusions, fused_layer_norm_forward_cost,
                                                     fused_layer_norm_workspace, is_fused_layer_norm,
                                                     layer_norm_recompute_cost)
from mxnet_mirror_hook.core.graph import KEEP_ATTR
from mxnet_mirror_hook.mx import workspace
from mxnet_mirror_hook.mx.attention import recompute_core_attention
from mxnet_mirror_hook.mx.convert import structural_graph
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.mx.custom_deps import CommonDependencies, use_common_dependencies
from mxnet_mirror_hook.mx.fused_activation import recompute_activations
from mxnet_mirror_hook.mx.fused_layer_norm import recompute_layer_norms
from mxnet_mirror_hook.mx.text import parse_planned_mb
from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes
from tests.mx.test_core_attention import BATCH, SEQ, bind, gradients, run, shapes, small_bert


def structure(symbol):
    return structural_graph(json.loads(symbol.tojson()))


def assert_close(left, right, out_left, out_right):
    np.testing.assert_allclose(out_right, out_left, rtol=1e-6, atol=1e-7)
    assert sorted(right) == sorted(left)
    for name in left:
        np.testing.assert_allclose(right[name], left[name], rtol=1e-5, atol=1e-6, err_msg=name)


def residual_block(data, index=0, name_of=str, no_bias=False, flatten=False, eps=None, units=16):
    """``LayerNorm(data) -> FullyConnected -> relu``, summed with the normalized input."""
    kwargs = {} if eps is None else {"eps": eps}
    x = mx.sym.LayerNorm(data, gamma=mx.sym.var(f"g{index}"), beta=mx.sym.var(f"b{index}"),
                         name=name_of(f"ln{index}"), **kwargs)
    y = mx.sym.FullyConnected(x, weight=mx.sym.var(f"w{index}"),
                              bias=None if no_bias else mx.sym.var(f"c{index}"), no_bias=no_bias,
                              num_hidden=units, flatten=flatten, name=name_of(f"fc{index}"))
    y = mx.sym.Activation(y, act_type="relu", name=name_of(f"act{index}"))
    if flatten:
        y = mx.sym.reshape(y, shape=(0, -1, 16))
    return x + y


def regression(out):
    return mx.sym.LinearRegressionOutput(mx.sym.sum(out, axis=-1), name="loss")


# ------------------------------------------------------------------------- pattern
def test_both_layer_norms_of_every_layer_feeding_a_projection_are_found_by_position():
    graph = structure(small_bert(layers=3))
    found = find_layer_norm_fusions(graph)
    pairs = [(graph.nodes[m.layer_norm].symbol_name, graph.nodes[m.fc].symbol_name) for m in found]
    assert pairs == [("enc0_ln1", "enc0_ffn1"), ("enc0_ln2", "enc1_qkv"), ("enc1_ln1", "enc1_ffn1"),
                     ("enc1_ln2", "enc2_qkv"), ("enc2_ln1", "enc2_ffn1"), ("mlm_ln", "mlm_out")]
    for match in found:
        assert graph.nodes[match.layer_norm].op == "LayerNorm"
        assert graph.nodes[match.fc].op == "FullyConnected"
        assert graph.nodes[match.fc].inputs[0] == (match.layer_norm, 0)
    # the embedding's feeds a transpose, the last layer's the output transpose: not taken
    assert all(graph.nodes[m.layer_norm].symbol_name not in ("embed_ln", "enc2_ln2") for m in found)
    encoder = [m for m in found if m.others]
    assert len(encoder) == 5 and all(graph.nodes[m.others[0]].op == "elemwise_add" for m in encoder)
    assert not found[-1].normalized_read  # mlm_ln: read by its FullyConnected only


def test_a_layer_norm_read_by_a_reader_that_keeps_it_is_left_alone():
    data = mx.sym.var("data")
    x = mx.sym.LayerNorm(data, name="ln")
    fc = mx.sym.FullyConnected(x, num_hidden=8, flatten=False, name="fc")
    keeps = regression(fc + x * x)                           # elemwise_mul's backward reads x
    two = regression(fc + mx.sym.FullyConnected(x, num_hidden=8, flatten=False, name="fc2"))
    head = mx.sym.Group([regression(fc + x), x])             # x itself is an output
    moments = mx.sym.LayerNorm(data, output_mean_var=True, name="lnm")
    mean = regression(mx.sym.FullyConnected(moments[0], num_hidden=8, flatten=False)
                      + mx.sym.broadcast_add(moments[0], moments[1]))
    for symbol in (keeps, two, head, mean):
        assert find_layer_norm_fusions(structure(symbol)) == []
        assert recompute_layer_norms(symbol) is symbol
    summed = regression(fc + x)
    assert len(find_layer_norm_fusions(structure(summed))) == 1


def test_a_fusion_that_would_reorder_the_arguments_is_left_alone():
    # the sum meets x (LayerNorm's gamma, beta) then z's product (v) before the FullyConnected
    # (w): fused, w would be listed before v
    x = mx.sym.LayerNorm(mx.sym.var("data"), name="ln")
    side = mx.sym.FullyConnected(mx.sym.var("z"), weight=mx.sym.var("v"), no_bias=True, num_hidden=8,
                                 flatten=False, name="side")
    fc = mx.sym.FullyConnected(x, weight=mx.sym.var("w"), no_bias=True, num_hidden=8, flatten=False,
                               name="fc")
    symbol = regression((x + side) * fc)
    assert find_layer_norm_fusions(structure(symbol)) == []
    assert recompute_layer_norms(symbol) is symbol


# ------------------------------------------------------------------------- rewrite
def test_rewrite_keeps_arguments_outputs_names_and_marks_the_operator_kept():
    symbol = small_bert(padding_mask=True)
    rewritten = recompute_layer_norms(symbol)
    assert rewritten.list_arguments() == symbol.list_arguments()
    assert rewritten.list_outputs() == symbol.list_outputs()
    assert rewritten.list_auxiliary_states() == symbol.list_auxiliary_states()
    internals = rewritten.get_internals().list_outputs()
    assert "enc0_ffn1_output" in internals and "enc0_ln1_output" not in internals
    graph = symbol_to_graph(rewritten, normalize_inputs(sorted(shapes(True).items())))
    fused = [node for node in graph.nodes if is_fused_layer_norm(node)]
    assert len(fused) == 4
    assert all(node.attrs[KEEP_ATTR] == "True" and not node.can_mirror for node in fused)
    assert all(node.attrs["op_type"] == FUSED_LAYER_NORM_OP for node in fused)
    assert [n.op for n in graph.nodes].count("LayerNorm") == 2  # the embedding's and the last layer's


def test_user_attributes_of_both_operators_are_carried_and_the_product_may_be_an_output():
    with mx.AttrScope(__group__="norm"):
        x = mx.sym.LayerNorm(mx.sym.var("data"), name="ln")
    with mx.AttrScope(__stage__="2"):
        fc = mx.sym.FullyConnected(x, num_hidden=8, flatten=False, name="fc")
    symbol = mx.sym.Group([regression(fc + x), fc])  # the product itself is an output too
    rewritten = recompute_layer_norms(symbol)
    assert rewritten.list_outputs() == symbol.list_outputs() == ["loss_output", "fc_output"]
    document = json.loads(rewritten.tojson())
    (custom,) = [node for node in document["nodes"] if node["op"] == "Custom"]
    assert custom["name"] == "fc"
    assert custom["attrs"]["__group__"] == "norm" and custom["attrs"]["__stage__"] == "2"
    assert custom["attrs"]["num_hidden"] == "8" and custom["attrs"][KEEP_ATTR] == "True"


# ------------------------------------------------------------------- gradients
@pytest.mark.parametrize("padding_mask", [False, True])
def test_fused_gradients_match_the_plain_graph(padding_mask):
    symbol = small_bert(padding_mask=padding_mask)
    given = shapes(padding_mask)
    (left, out_left), (right, out_right) = (gradients(bind(s, given))
                                            for s in (symbol, recompute_layer_norms(symbol)))
    assert_close(left, right, out_left, out_right)


def variants():
    """Repeated names, no bias, a flattening product, another eps: ``(symbol, shapes)``."""
    out = mx.sym.var("data")
    for index, options in enumerate([{"units": 16}, {"no_bias": True, "eps": 1e-3, "units": 16},
                                     {"flatten": True, "units": 5 * 16}]):
        out = residual_block(out, index, name_of=lambda name: name[:-1], **options)
    return regression(out), {"data": (6, 5, 16), "loss_label": (6, 5)}


def test_repeated_names_no_bias_and_flattening_products_are_rewritten_by_position():
    symbol, given = variants()
    rewritten = recompute_layer_norms(symbol)
    ops = [node["op"] for node in json.loads(rewritten.tojson())["nodes"]]
    assert ops.count("Custom") == 3 and "LayerNorm" not in ops
    (left, out_left), (right, out_right) = (gradients(bind(s, given)) for s in (symbol, rewritten))
    assert_close(left, right, out_left, out_right)


def accumulated(symbol, given, requests, steps=2):
    """Gradients after ``steps`` backward passes under ``requests`` (name -> grad_req)."""
    executor = bind(symbol, given)
    arrays = {name: executor.arg_dict[name] for name in symbol.list_arguments()}
    grads = {name: mx.nd.zeros_like(array) for name, array in arrays.items()
             if requests.get(name, "write") != "null" and name not in given}
    executor = symbol.bind(mx.cpu(), arrays, args_grad=grads,
                           grad_req={n: (requests.get(n, "write") if n in grads else "null") for n in arrays})
    for _ in range(steps):
        executor.forward(is_train=True)
        executor.backward()
    return {name: grad.asnumpy() for name, grad in grads.items()}, executor.outputs[0].asnumpy()


def test_accumulated_and_unwanted_parameter_gradients_match_the_plain_graph():
    symbol, given = variants()
    requests = {"w0": "add", "g0": "add", "c2": "add", "b1": "null", "w1": "null"}
    (left, out_left), (right, out_right) = (accumulated(s, given, requests)
                                            for s in (symbol, recompute_layer_norms(symbol)))
    assert "w1" not in left and sorted(left) == sorted(right)
    assert_close(left, right, out_left, out_right)


def test_composes_with_the_core_attention_rewrite():
    symbol = small_bert()
    both = recompute_layer_norms(recompute_core_attention(symbol))
    ops = [node["op"] for node in json.loads(both.tojson())["nodes"]]
    assert ops.count("Custom") == 2 + 4 and both.list_arguments() == symbol.list_arguments()
    (left, out_left), (right, out_right) = (gradients(bind(s, shapes())) for s in (symbol, both))
    assert_close(left, right, out_left, out_right)


def test_composes_with_the_core_attention_and_activation_rewrites_in_the_planning_order():
    symbol = small_bert()
    rewritten = recompute_activations(recompute_layer_norms(recompute_core_attention(symbol)))
    kinds = [node["attrs"]["op_type"] for node in json.loads(rewritten.tojson())["nodes"]
             if node["op"] == "Custom"]
    assert kinds.count(FUSED_LAYER_NORM_OP) == 4 and len(set(kinds)) == 3
    (left, out_left), (right, out_right) = (gradients(bind(s, shapes())) for s in (symbol, rewritten))
    assert_close(left, right, out_left, out_right)


def test_every_custom_operator_is_asked_only_for_dependencies_all_of_them_declared():
    deps = CommonDependencies()
    assert 0 not in deps
    for declared in ([0, 1], [0, 1, 2, 3, 4, 5]):  # core attention, then a fused LayerNorm
        deps.start(set())
        for index in declared:
            deps.add(index)
    assert sorted(deps) == [0, 1] and 2 not in deps  # index 2: the core attention's output
    alone = CommonDependencies([0, 1, 2])
    assert sorted(alone) == [0, 1, 2]
    use_common_dependencies()
    use_common_dependencies()  # idempotent
    assert isinstance(mx.operator._registry.result_deps, CommonDependencies)


def test_fused_gradients_are_bit_identical_without_mkldnn():
    output = run("from tests.mx.test_fused_layer_norm import exact; exact()", mkldnn=False)
    assert output.count("identical") == 5


def exact() -> None:
    """Without MKLDNN: outputs and gradients of the rewritten graphs equal the plain graph's exactly."""
    cases = [(small_bert(padding_mask=p), shapes(p), f"bert padding={p}") for p in (False, True)]
    cases.append(variants() + ("variants",))
    cases.append((small_bert(), shapes(), "with core attention and activations"))
    for symbol, given, label in cases:
        rewritten = recompute_layer_norms(symbol)
        if label.startswith("with"):
            rewritten = recompute_activations(recompute_layer_norms(recompute_core_attention(symbol)))
        (left, out_left), (right, out_right) = (gradients(bind(s, given)) for s in (symbol, rewritten))
        np.testing.assert_array_equal(out_right, out_left)
        for name in left:
            np.testing.assert_array_equal(right[name], left[name], err_msg=name)
        print("identical", label)
    symbol, given = variants()
    requests = {"w0": "add", "g0": "add", "c2": "add", "b1": "null", "w1": "null"}
    (left, _), (right, _) = (accumulated(s, given, requests) for s in (symbol, recompute_layer_norms(symbol)))
    for name in left:
        np.testing.assert_array_equal(right[name], left[name], err_msg=name)
    print("identical accumulated")


# ----------------------------------------------------------------------- training
def trained(symbol, steps: int = 2):
    """Parameters after ``steps`` SGD steps of ``mx.mod.Module`` on fixed batches."""
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    module = mx.mod.Module(symbol, data_names=[n for n, _ in data], label_names=[n for n, _ in label])
    module.bind(data, label)
    rng = np.random.RandomState(3)
    params = {name: mx.nd.array(rng.uniform(-0.1, 0.1, shape))
              for name, shape in zip(symbol.list_arguments(), symbol.infer_shape(**dict(data + label))[0])
              if name not in dict(data + label)}
    module.init_params(arg_params=params, aux_params={})
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.1, "momentum": 0.9})
    for step in range(steps):
        rows = np.random.RandomState(step)
        arrays = [rows.randint(0, 100, (BATCH, SEQ)), np.zeros((BATCH, SEQ)),
                  np.stack([rows.choice(SEQ, 8, replace=False) for _ in range(BATCH)])]
        batch = mx.io.DataBatch([mx.nd.array(a) for a in arrays],
                                [mx.nd.array(rows.randint(0, 100, (BATCH, 8)))])
        module.forward_backward(batch)
        module.update()
    return {name: array.asnumpy() for name, array in module.get_params()[0].items()}


def training_difference() -> float:
    """Largest parameter difference after two SGD steps, plain against rewritten."""
    symbol = small_bert()
    left, right = trained(symbol), trained(recompute_layer_norms(symbol))
    assert sorted(left) == sorted(right)
    return max(float(np.abs(left[name] - right[name]).max()) for name in left)


def test_two_sgd_steps_of_module_match_the_plain_module():
    assert training_difference() < 1e-6


def test_two_sgd_steps_of_module_are_bit_identical_without_mkldnn():
    code = "from tests.mx.test_fused_layer_norm import training_difference as f; print('worst', f())"
    assert "worst 0.0" in run(code, mkldnn=False)


# ------------------------------------------------------------- memory, cost, workspace
def test_mxnet_static_plan_of_the_rewritten_bert_is_smaller():
    symbol = bert_mlm(layers=2, units=256, heads=4, hidden=512, vocab=100, seq_len=128, max_length=128,
                      masked=8)
    data, label = bert_mlm_shapes(8, 128, masked=8)
    given = dict(data + label)
    requests = {name: ("null" if name in given else "write") for name in symbol.list_arguments()}
    planned = []
    for candidate in (symbol, recompute_layer_norms(symbol)):
        executor = candidate.simple_bind(mx.cpu(), grad_req=requests, **given)
        planned.append(parse_planned_mb(executor.debug_str()))
        del executor
    # three LayerNorms of 128 x 8 x 256 float32 (1 MB each) no longer keep their output
    assert planned[1] <= planned[0] - 2.5, planned


def test_cost_and_workspace_of_the_fused_operator():
    symbol = small_bert()
    inputs = normalize_inputs(sorted(shapes().items()))
    plain = symbol_to_graph(symbol, inputs)
    graph = symbol_to_graph(recompute_layer_norms(symbol), inputs)
    fused = [node for node in graph.nodes if is_fused_layer_norm(node)]
    norm = plain.node("enc0_ln1")
    fc = plain.node("enc0_ffn1")
    assert layer_norm_recompute_cost(graph, fused[0]) == forward_cost(plain, norm) == 8.0 * SEQ * BATCH * 64
    assert fused_layer_norm_forward_cost(graph, fused[0]) == \
        forward_cost(plain, norm) + forward_cost(plain, fc)
    mlm = fused[-1]  # (BATCH * 8) x 64, flattening product
    assert fused_layer_norm_forward_cost(graph, mlm) == \
        forward_cost(plain, plain.node("mlm_ln")) + forward_cost(plain, plain.node("mlm_out"))
    encoder = SEQ * BATCH * 64  # larger than the decoder's (BATCH * 8) x 64: the buffers grow to it
    expected = (2 * encoder + 2 * encoder // 64) * 4
    assert fused_layer_norm_workspace(graph) == expected
    workspace.release()
    gradients(bind(recompute_layer_norms(symbol), shapes()))
    kept = [array for (_, _, slot), array in workspace._buffers.items() if slot.startswith(SLOT_PREFIX)]
    assert sum(array.size * 4 for array in kept) == expected
