"""Recomputable dropout: the ``recompute_dropout`` option.

What holds (docs/guarantees.md): with the option off plans are as before; with
it on, the gradients are those of the masks used in forward, the masks drop a
fraction p at MXNet's scale, inference passes the input through, and the plan
is never above the one made without the option (lower where the rewrite helps).
The masks are not MXNet's own Dropout draws (another random stream).
"""
from __future__ import annotations

import argparse
import os
import sys

import mxnet as mx
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_dropout import dropout_transformer  # noqa: E402
from mxnet_mirror_hook import MirroredModule, plan_mirror  # noqa: E402
from mxnet_mirror_hook.cache import PlanKey  # noqa: E402
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph  # noqa: E402
from mxnet_mirror_hook.mx.dropout import MASK_SUFFIX, dropout_scale, recomputable_dropout  # noqa: E402
from mxnet_mirror_hook.options import MirrorOptions, option_arguments  # noqa: E402
from tests.helpers import dropout_mlp  # noqa: E402


def _bind(symbol, **shapes):
    return symbol.simple_bind(mx.cpu(), grad_req="write", **shapes)


def _dropout_of(x, p, **kwargs):
    return mx.sym.Dropout(x, p=p, name="drop", **kwargs)


def _rewritten_with_mask(p, **kwargs):
    """(rewritten symbol, its outputs grouped with the mask) for Dropout(data)."""
    symbol = recomputable_dropout(_dropout_of(mx.sym.var("data"), p, **kwargs))
    mask = symbol.get_internals()["drop" + MASK_SUFFIX + "_output"]
    return symbol, mx.sym.Group([symbol, mask])


# ------------------------------------------------------------------ option off: as before
def test_option_is_off_by_default_and_validated():
    assert MirrorOptions().recompute_dropout is False
    assert "recompute_dropout" in MirrorOptions().as_dict()
    with pytest.raises(TypeError, match="recompute_dropout"):
        MirrorOptions(recompute_dropout="yes")
    parser = argparse.ArgumentParser()
    option_arguments(parser)
    assert MirrorOptions.from_args(parser.parse_args([])).recompute_dropout is False
    assert MirrorOptions.from_args(parser.parse_args(["--recompute-dropout"])).recompute_dropout is True


def test_plan_key_digest_is_unchanged_when_the_option_is_off():
    fields = dict(structure="s", inputs=(("data", (1, 2), "float32"),), grad_req="g", planner="auto",
                  budget="auto", mxnet_version="1.9.1", context="cpu")
    assert PlanKey(**fields).digest == PlanKey(**fields, recompute_dropout=False).digest
    assert "recompute_dropout" not in PlanKey(**fields).as_json()
    assert PlanKey(**fields, recompute_dropout=True).digest != PlanKey(**fields).digest


def test_with_the_option_off_dropout_is_kept_and_not_rewritten():
    plan = plan_mirror(dropout_mlp(6), [("data", (256, 1024))], cache_dir=False)
    assert not any(name.startswith("drop") for name in plan.mirrored)
    assert not any(n.endswith("_mask_draw_output") for n in plan.symbol.get_internals().list_outputs())


# ------------------------------------------------------------------ the rewrite
def test_rewrite_keeps_arguments_outputs_auxiliary_states_and_is_idempotent():
    x = mx.sym.BatchNorm(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=8, name="fc"), name="bn")
    symbol = mx.sym.SoftmaxOutput(mx.sym.Dropout(x, p=0.2, name="drop"), name="softmax")
    rewritten = recomputable_dropout(symbol)
    assert rewritten.list_arguments() == symbol.list_arguments()
    assert rewritten.list_outputs() == symbol.list_outputs()
    assert rewritten.list_auxiliary_states() == symbol.list_auxiliary_states()
    assert "drop_mask_draw_output" in rewritten.get_internals().list_outputs()
    assert recomputable_dropout(rewritten) is rewritten
    no_dropout = mx.sym.SoftmaxOutput(x, name="softmax")
    assert recomputable_dropout(no_dropout) is no_dropout


def test_rewritten_product_may_be_recomputed_and_the_mask_may_not():
    symbol = recomputable_dropout(dropout_mlp(2, hidden=16))
    graph = symbol_to_graph(symbol, normalize_inputs([("data", (4, 8))]))
    assert graph.node("drop0").op == "elemwise_mul" and graph.node("drop0").can_mirror
    for name in ("drop0_mask_ones", "drop0_mask_draw", "drop0" + MASK_SUFFIX):
        assert not graph.node(name).can_mirror
    assert graph.node("drop0_mask_draw").op == "Dropout"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_training_masks_drop_a_fraction_p_at_mxnets_scale(p):
    _, grouped = _rewritten_with_mask(p)
    executor = _bind(grouped, data=(1000, 1000))
    x = np.random.RandomState(0).uniform(0.5, 1.5, (1000, 1000)).astype(np.float32)
    executor.arg_dict["data"][:] = x
    mx.random.seed(3)
    y, mask = (o.asnumpy() for o in executor.forward(is_train=True))
    scale = np.float32(dropout_scale(p))
    assert set(np.unique(mask)) == {np.float32(0), scale}
    dropped = float((mask == 0).mean())
    standard_error = np.sqrt(p * (1 - p) / mask.size)
    assert abs(dropped - p) < 5 * standard_error
    np.testing.assert_array_equal(y, x * mask)          # the product is the mask actually drawn
    np.testing.assert_array_equal(y[mask != 0], x[mask != 0] * scale)  # MXNet's own formula


def test_mxnet_dropout_scales_kept_elements_the_same_way():
    executor = _bind(_dropout_of(mx.sym.var("data"), 0.1), data=(1000,))
    executor.arg_dict["data"][:] = 1.0
    values = set(np.unique(executor.forward(is_train=True)[0].asnumpy()))
    assert values == {np.float32(0), np.float32(dropout_scale(0.1))}


def test_axes_draw_one_mask_value_along_the_axes():
    _, grouped = _rewritten_with_mask(0.5, axes=(1,))
    executor = _bind(grouped, data=(64, 32, 8))
    executor.arg_dict["data"][:] = 1.0
    y = executor.forward(is_train=True)[0].asnumpy()
    assert executor.outputs[1].shape == (64, 1, 8)
    assert (y == y[:, :1, :]).all()                     # broadcast along axis 1
    assert 0.3 < float((y == 0).mean()) < 0.7


def test_inference_passes_the_input_through_and_mode_always_still_drops():
    rewritten, _ = _rewritten_with_mask(0.5)
    executor = _bind(rewritten, data=(100, 100))
    x = np.random.RandomState(1).uniform(-1, 1, (100, 100)).astype(np.float32)
    executor.arg_dict["data"][:] = x
    np.testing.assert_array_equal(executor.forward(is_train=False)[0].asnumpy(), x)
    always, _ = _rewritten_with_mask(0.5, mode="always")
    executor = _bind(always, data=(100, 100))
    executor.arg_dict["data"][:] = x
    assert float((executor.forward(is_train=False)[0].asnumpy() == 0).mean()) > 0.3


def test_p_zero_is_left_as_written():
    symbol = _dropout_of(mx.sym.var("data"), 0.0)
    assert recomputable_dropout(symbol) is symbol


# ------------------------------------------------------------------ gradients and memory
def _one_step(module, symbol_inputs, seed):
    data = mx.nd.array(np.random.RandomState(5).uniform(-1, 1, symbol_inputs))
    label = mx.nd.array(np.random.RandomState(6).randint(0, 10, symbol_inputs[0]))
    module.bind([("data", symbol_inputs)], [("softmax_label", (symbol_inputs[0],))],
                inputs_need_grad=True)
    mx.random.seed(0)
    module.init_params(mx.init.Xavier())
    mx.random.seed(seed)
    module.forward_backward(mx.io.DataBatch([data], [label]))
    mx.nd.waitall()
    grads = {name: g[0].asnumpy() for name, g in zip(module._exec_group.param_names,
                                                     module._exec_group.grad_arrays)}
    grads["data"] = module.get_input_grads()[0].asnumpy()
    return grads


MLP_SHAPE = (512, 1024)


@pytest.mark.slow
def test_gradients_are_those_of_the_masks_used_in_forward():
    symbol = dropout_mlp(6, hidden=2048)
    module = MirroredModule(symbol, context=mx.cpu(),
                            options=MirrorOptions(recompute_dropout=True, memory_budget="min",
                                                  cache_dir=False))
    mirrored = _one_step(module, MLP_SHAPE, seed=11)
    # The option took the rewritten symbol here (it plans lower: see the memory test) and
    # recomputes the Dropout products.
    plan = module.mirror_plan
    assert "drop0_mask_draw_output" in plan.symbol.get_internals().list_outputs()
    assert any(name.startswith("drop") and "_mask" not in name for name in plan.mirrored)
    assert module.symbol is symbol                      # save_checkpoint writes the user's symbol
    plain = _one_step(mx.mod.Module(recomputable_dropout(symbol), context=mx.cpu()), MLP_SHAPE, seed=11)
    assert sorted(mirrored) == sorted(plain)
    for name in plain:
        np.testing.assert_array_equal(mirrored[name], plain[name], err_msg=name)


def test_data_gradient_is_the_forward_mask_on_a_mirrored_module():
    data = mx.sym.var("data")
    hidden = mx.sym.Activation(mx.sym.FullyConnected(data, num_hidden=64, name="fc"), act_type="relu")
    dropped = mx.sym.Dropout(hidden * 1.0, p=0.5, name="drop")
    symbol = mx.sym.Group([mx.sym.MakeLoss(mx.sym.sum(dropped), name="loss"), mx.sym.BlockGrad(dropped),
                           mx.sym.BlockGrad(hidden)])
    module = MirroredModule(symbol, data_names=["data"], label_names=None, context=mx.cpu(),
                            options=MirrorOptions(recompute_dropout=True, memory_budget="min",
                                                  cache_dir=False))
    module.bind([("data", (32, 16))], None)
    module.init_params(mx.init.Xavier())
    module.forward_backward(mx.io.DataBatch([mx.nd.ones((32, 16))], None))
    _, out, hid = (o.asnumpy() for o in module.get_outputs())
    mask = np.where(hid > 0, out / np.where(hid > 0, hid, 1), 0)
    assert set(np.round(np.unique(mask[hid > 0]), 5)) <= {0.0, round(dropout_scale(0.5), 5)}
    weight_grad = dict(zip(module._exec_group.param_names, module._exec_group.grad_arrays))["fc_bias"]
    # d(sum y)/d(bias) = sum over the batch of mask * relu'(pre-activation)
    expected = (mask * (hid > 0)).sum(axis=0)
    np.testing.assert_allclose(weight_grad[0].asnumpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_option_lowers_the_plan_of_a_dropout_mlp_and_never_raises_one():
    shapes = [("data", MLP_SHAPE)]
    symbol = dropout_mlp(6, hidden=2048)
    off = plan_mirror(symbol, shapes, memory_budget="min", cache_dir=False)
    on = plan_mirror(symbol, shapes, memory_budget="min", cache_dir=False, recompute_dropout=True)
    assert on.planned_mb < off.planned_mb
    assert "drop0_mask_draw_output" in on.symbol.get_internals().list_outputs()
    assert on.symbol.list_arguments() == symbol.list_arguments()
    # Attention: a kept Dropout output is a free checkpoint for MXNet's one-level mirror, so
    # rewriting plans more there; the option then keeps the user's symbol.
    transformer = dropout_transformer(2, 64, 4, 0.1)
    shapes = [("data", (4, 64, 64))]
    off = plan_mirror(transformer, shapes, memory_budget="min", cache_dir=False)
    on = plan_mirror(transformer, shapes, memory_budget="min", cache_dir=False, recompute_dropout=True)
    assert on.planned_mb <= off.planned_mb


def test_segments_backend_replays_the_users_dropout_instead_of_rewriting_it():
    # With executor segments the option replays each re-run segment's draws (tests/api/
    # test_segment_dropout.py): the segments bind the user's Dropout, not the rewritten form;
    # without the option segments refuse the network and 'auto' keeps the one-level plan.
    from mxnet_mirror_hook import BackendError

    symbol = dropout_mlp(3, hidden=64)
    plan = plan_mirror(symbol, [("data", (32, 64))], cache_dir=False, backend="segments",
                       segments=2, recompute_dropout=True)
    assert plan.backend == "segments" and plan.segment_plan.replay_random
    assert plan.symbol is symbol
    with pytest.raises(BackendError, match="dropout masks"):
        plan_mirror(symbol, [("data", (32, 64))], cache_dir=False, backend="segments", segments=2)
    plan = plan_mirror(symbol, [("data", (32, 64))], cache_dir=False, backend="auto")
    assert plan.backend == "mirror"
    assert not any(n.endswith("_mask_draw_output") for n in plan.symbol.get_internals().list_outputs())
