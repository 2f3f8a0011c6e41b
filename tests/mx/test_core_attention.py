"""The core attention recomputed in one operator (mx/attention.py, core/attention.py): the pattern,
the rewrite, gradients against the plain graph, the dropout mask, the workspace count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.core.attention import (CORE_ATTENTION_OP, core_attention_cost,
                                              core_attention_workspace, find_core_attention,
                                              is_core_attention)
from mxnet_mirror_hook.core.cost import forward_cost
from mxnet_mirror_hook.core.graph import KEEP_ATTR
from mxnet_mirror_hook.mx.attention import CoreAttentionOp, recompute_core_attention
from mxnet_mirror_hook.mx.convert import structural_graph
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes
from tests.helpers import reordered_symbol
from tests.paths import ROOT

SEQ, BATCH, HEADS = 32, 4, 4


def small_bert(dropout: float = 0.0, padding_mask: bool = False, layers: int = 2) -> "mx.sym.Symbol":
    return bert_mlm(layers=layers, units=64, heads=HEADS, hidden=128, vocab=100, seq_len=SEQ, max_length=SEQ,
                    masked=8, dropout=dropout, padding_mask=padding_mask)


def shapes(padding_mask: bool = False):
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8, padding_mask=padding_mask)
    return dict(data + label)


def bind(symbol, given, seed=0):
    """An executor of ``symbol`` with every argument filled from ``seed`` and its name (inputs as
    integers), so symbols with other arguments get the same values for the same names."""
    requests = {name: ("null" if name in given else "write") for name in symbol.list_arguments()}
    executor = symbol.simple_bind(mx.cpu(), grad_req=requests, **given)
    for name, array in executor.arg_dict.items():
        rng = np.random.RandomState(seed + zlib.crc32(name.encode()) % 10000)
        if name in ("data", "softmax_label"):
            array[:] = rng.randint(0, 100, array.shape)
        elif name == "token_types":
            array[:] = 0
        elif name == "valid_length":
            array[:] = rng.randint(SEQ // 3, SEQ + 1, array.shape)
        elif name == "masked_positions":
            rows = [rng.choice(SEQ, array.shape[1], replace=False) for _ in range(array.shape[0])]
            array[:] = np.stack(rows)
        else:
            array[:] = rng.uniform(-0.1, 0.1, array.shape)
    return executor


def run(code: str, mkldnn: bool = True, timeout: int = 600) -> str:
    """Run ``code`` in a fresh process (MKLDNN off unless ``mkldnn``); its output."""
    environment = dict(os.environ, PYTHONPATH=ROOT)
    if not mkldnn:
        environment["MXNET_MKLDNN_ENABLED"] = "0"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def gradients(executor):
    executor.forward(is_train=True)
    executor.backward()
    return ({name: g.asnumpy() for name, g in executor.grad_dict.items() if g is not None},
            executor.outputs[0].asnumpy())


# ------------------------------------------------------------------------- pattern
def test_every_layer_core_attention_is_found_by_key_positions():
    graph = structural_graph(json.loads(small_bert(layers=3).tojson()))
    found = find_core_attention(graph)
    assert len(found) == 3
    for match in found:
        assert graph.nodes[match.qk].op == "_contrib_interleaved_matmul_selfatt_qk"
        assert graph.nodes[match.softmax].op == "softmax"
        assert graph.nodes[match.valatt].op == "_contrib_interleaved_matmul_selfatt_valatt"
        assert match.dropout is None and match.length is None and match.heads == HEADS


def test_attention_dropout_is_taken_in_only_when_asked():
    graph = structural_graph(json.loads(small_bert(dropout=0.1).tojson()))
    assert find_core_attention(graph) == []
    found = find_core_attention(graph, with_dropout=True)
    assert len(found) == 2 and all(m.p == pytest.approx(0.1) for m in found)
    assert all(graph.nodes[m.dropout].op == "Dropout" for m in found)


def test_probabilities_read_elsewhere_are_left_alone():
    qkv = mx.sym.var("qkv")
    scores = mx.sym.contrib.interleaved_matmul_selfatt_qk(qkv, heads=2, name="scores")
    probs = mx.sym.softmax(scores, axis=-1, name="probs")
    out = mx.sym.contrib.interleaved_matmul_selfatt_valatt(qkv, probs, heads=2, name="context")
    both = mx.sym.Group([out, probs])
    assert find_core_attention(structural_graph(json.loads(both.tojson()))) == []
    assert recompute_core_attention(both) is both


def test_identities_between_softmax_and_values_are_taken_in():
    def layer(x, index, between):
        qkv = mx.sym.FullyConnected(x, weight=mx.sym.var(f"w{index}"), bias=mx.sym.var(f"b{index}"),
                                    num_hidden=3 * 16, flatten=False, name=f"qkv{index}")
        scores = mx.sym.contrib.interleaved_matmul_selfatt_qk(qkv, heads=2, name=f"scores{index}")
        probs = between(mx.sym.softmax(scores, axis=-1, name=f"probs{index}"))
        return mx.sym.contrib.interleaved_matmul_selfatt_valatt(qkv, probs, heads=2, name=f"context{index}")

    copy = mx.sym.identity                           # Gluon's Dropout(0.0) leaves a _copy
    off = lambda x: mx.sym.Dropout(mx.sym.identity(x), p=0.0)  # noqa: E731 - a Dropout of p=0 copies
    out = layer(layer(mx.sym.var("data"), 0, copy), 1, off)
    symbol = mx.sym.LinearRegressionOutput(mx.sym.sum(out, axis=(0, 2)), name="loss")
    found = find_core_attention(structural_graph(json.loads(symbol.tojson())))
    assert [len(match.copies) for match in found] == [1, 2] and all(m.dropout is None for m in found)
    rewritten = recompute_core_attention(symbol)
    ops = [node["op"] for node in json.loads(rewritten.tojson())["nodes"]]
    assert ops.count("Custom") == 2 and "_copy" not in ops and "Dropout" not in ops
    given = {"data": (8, 3, 16), "loss_label": (3,)}
    (left, out_left), (right, out_right) = (gradients(bind(s, given)) for s in (symbol, rewritten))
    np.testing.assert_allclose(out_right, out_left, rtol=1e-6)
    for name in left:
        np.testing.assert_allclose(right[name], left[name], rtol=1e-5, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------------- rewrite
def test_rewrite_keeps_arguments_outputs_and_marks_the_operator_kept():
    symbol = small_bert(padding_mask=True)
    rewritten = recompute_core_attention(symbol)
    assert rewritten.list_arguments() == symbol.list_arguments()
    assert rewritten.list_outputs() == symbol.list_outputs()
    internals = rewritten.get_internals().list_outputs()
    assert "enc0_context_output" in internals and "enc0_probs_output" not in internals
    graph = symbol_to_graph(rewritten, normalize_inputs(sorted(shapes(True).items())))
    fused = [node for node in graph.nodes if is_core_attention(node)]
    assert len(fused) == 2
    assert all(node.attrs[KEEP_ATTR] == "True" and not node.can_mirror for node in fused)
    assert all(node.attrs["op_type"] == CORE_ATTENTION_OP for node in fused)


def test_repeated_names_are_rewritten_by_position():
    def layer(x, index):  # every layer's operators carry the same names
        qkv = mx.sym.FullyConnected(x, weight=mx.sym.var(f"w{index}"), bias=mx.sym.var(f"b{index}"),
                                    num_hidden=3 * 16, flatten=False, name="qkv")
        scores = mx.sym.contrib.interleaved_matmul_selfatt_qk(qkv, heads=2, name="scores")
        probs = mx.sym.softmax(scores, axis=-1, name="probs")
        return mx.sym.contrib.interleaved_matmul_selfatt_valatt(qkv, probs, heads=2, name="context")

    out = layer(layer(mx.sym.var("data"), 0), 1)
    symbol = mx.sym.LinearRegressionOutput(mx.sym.sum(out, axis=(0, 2)), name="loss")
    rewritten = recompute_core_attention(symbol)
    ops = [node["op"] for node in json.loads(rewritten.tojson())["nodes"]]
    assert ops.count("Custom") == 2 and "softmax" not in ops
    given = {"data": (8, 3, 16), "loss_label": (3,)}
    plain, fused = (bind(s, given) for s in (symbol, rewritten))
    (left, out_left), (right, out_right) = gradients(plain), gradients(fused)
    np.testing.assert_allclose(out_right, out_left, rtol=1e-6)
    for name in left:
        np.testing.assert_allclose(right[name], left[name], rtol=1e-5, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------- gradients
@pytest.mark.parametrize("padding_mask", [False, True])
@pytest.mark.parametrize("pass_mb", [16.0, 1e-6])  # the whole batch in one pass; one sequence a pass
def test_fused_gradients_match_the_plain_graph(padding_mask, pass_mb):
    symbol = small_bert(padding_mask=padding_mask)
    rewritten = recompute_core_attention(symbol, pass_mb=pass_mb)
    given = shapes(padding_mask)
    (left, out_left), (right, out_right) = (gradients(bind(s, given)) for s in (symbol, rewritten))
    np.testing.assert_allclose(out_right, out_left, rtol=1e-6)
    assert sorted(right) == sorted(left)
    for name in left:
        np.testing.assert_allclose(right[name], left[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_fused_gradients_are_bit_identical_without_mkldnn():
    output = run("from tests.mx.test_core_attention import exact; exact()", mkldnn=False)
    assert output.count("identical") == 4


def exact() -> None:
    """Without MKLDNN: outputs and gradients of the fused graph equal the plain graph's exactly."""
    for padding_mask in (False, True):
        for pass_mb in (16.0, 1e-6):
            symbol = small_bert(padding_mask=padding_mask)
            given = shapes(padding_mask)
            rewritten = recompute_core_attention(symbol, pass_mb=pass_mb)
            (left, out_left), (right, out_right) = (gradients(bind(s, given)) for s in (symbol, rewritten))
            np.testing.assert_array_equal(out_right, out_left)
            for name in left:
                np.testing.assert_array_equal(right[name], left[name], err_msg=name)
            print("identical", padding_mask, pass_mb)


# ----------------------------------------------------------------------- dropout
def _masked_reference(symbol):
    """``symbol`` with each attention Dropout replaced by a product with a mask input ``mask<i>``
    (batch x heads x seq x seq, batch first as ``Module`` splits inputs; reshaped to the
    probabilities' batch*heads x seq x seq)."""
    document = json.loads(symbol.tojson())
    count = 0
    for node in document["nodes"]:
        if node["op"] == "Dropout" and node["name"].endswith("att_drop"):
            document["nodes"].append({"op": "null", "name": f"mask{count}", "inputs": []})
            document["nodes"].append({"op": "Reshape", "name": f"mask{count}_rows",
                                      "attrs": {"shape": "(-3, -2)"},
                                      "inputs": [[len(document["nodes"]) - 1, 0, 0]]})
            node.update(op="elemwise_mul", attrs={},
                        inputs=[node["inputs"][0], [len(document["nodes"]) - 1, 0, 0]])
            count += 1
    return reordered_symbol(document), count


def dropout_against_fed_masks(steps: int = 3) -> float:
    """Gradients of the fused graph with dropout, against the plain graph fed the masks forward drew;
    the largest difference (other Dropouts are off: p applies to the attention only)."""
    symbol = small_bert(dropout=0.1)
    document = json.loads(symbol.tojson())
    for node in document["nodes"]:  # keep the attention Dropouts only
        if node["op"] == "Dropout" and not node["name"].endswith("att_drop"):
            node["attrs"]["p"] = "0"
    symbol = mx.sym.load_json(json.dumps(document))
    drawn = []
    original = CoreAttentionOp._keep

    def recording(self, shape):
        keep = original(self, shape)
        drawn.append(keep.copy())
        return keep

    CoreAttentionOp._keep = recording
    try:
        fused = bind(recompute_core_attention(symbol, with_dropout=True), shapes())
        reference, count = _masked_reference(symbol)
        given = shapes()
        worst = 0.0
        for _ in range(steps):
            drawn.clear()
            right, out_right = gradients(fused)
            assert len(drawn) == count == 2
            scale = np.float32(1) / np.float32(0.9)  # MXNet's 1.0f / (1.0f - p)
            masks = {f"mask{i}": (keep.astype(np.float32) * scale).reshape(BATCH, HEADS, SEQ, SEQ)
                     for i, keep in enumerate(drawn)}
            plain = bind(reference, {**given, **{k: v.shape for k, v in masks.items()}})
            for name, value in masks.items():
                plain.arg_dict[name][:] = value
            left, out_left = gradients(plain)
            worst = max([worst, float(np.abs(out_right - out_left).max())]
                        + [float(np.abs(right[n] - left[n]).max()) for n in right])
        return worst
    finally:
        CoreAttentionOp._keep = original


def test_the_mask_forward_drew_is_the_one_backward_differentiates():
    assert dropout_against_fed_masks() < 1e-6


def test_the_mask_gradients_are_bit_identical_without_mkldnn():
    code = "from tests.mx.test_core_attention import dropout_against_fed_masks as f; print('worst', f())"
    assert "worst 0.0" in run(code, mkldnn=False)


def test_masks_repeat_under_mxnet_seed_and_differ_between_iterations():
    rewritten = recompute_core_attention(small_bert(dropout=0.1), with_dropout=True)
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        executor = bind(rewritten, shapes())
        outputs = []
        for _ in range(2):
            executor.forward(is_train=True)
            outputs.append(executor.outputs[0].asnumpy())
        runs.append(outputs)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[0][1])


def test_training_with_downstream_dropouts_does_not_hang():
    """The executor's own Dropouts after the fused operator (MXNet's generator) and its NumPy draws
    run side by side for several iterations (a deadlock would hit the timeout)."""
    code = ("import mxnet as mx; from tests.mx.test_core_attention import *; "
            "e = bind(recompute_core_attention(small_bert(dropout=0.1), with_dropout=True), shapes()); "
            "[(e.forward(is_train=True), e.backward()) for _ in range(10)]; mx.nd.waitall(); print('done')")
    assert "done" in run(code, timeout=300)


# ---------------------------------------------------------------- cost, workspace
def test_cost_and_workspace_of_the_fused_operator():
    rewritten = recompute_core_attention(small_bert(dropout=0.1), with_dropout=True, pass_mb=1e-6)
    graph = symbol_to_graph(rewritten, normalize_inputs(sorted(shapes().items())))
    fused = [node for node in graph.nodes if is_core_attention(node)]
    square = BATCH * HEADS * SEQ * SEQ
    assert forward_cost(graph, fused[0]) == core_attention_cost(graph, fused[0]) == \
        4 * square * (64 // HEADS) + 5 * square + 2 * square
    temporaries, masks = core_attention_workspace(graph)
    assert temporaries == 4 * (square // BATCH) * 4  # one sequence a pass, four kept s^2 float32 buffers
    assert masks == 2 * square // 8                   # two layers' masks, one bit each
