"""Mirrored training equals plain training, across architectures and random graphs.

Every decision MXNet accepts must leave training unchanged: gradients, parameters
and BatchNorm statistics equal to a plain Module's, and Dropout never recomputed
(a new mask would change the gradients).  Besides the default planner, a planner
that recomputes a random half of the graph exercises decisions no heuristic makes.
"""
from __future__ import annotations

import random
from typing import Dict

import mxnet as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mxnet_mirror_hook import MirroredModule, plan_mirror
from mxnet_mirror_hook.core.planners import _REGISTRY, register_planner
from mxnet_mirror_hook.core.planners.base import CandidateEvaluator, Decision, Planner
from mxnet_mirror_hook.testing.models import small_resnet
from tests.helpers import SyncedModule, dropout_mlp

RANDOM_PLANNER = "test-random-half"


class RandomHalfPlanner(Planner):
    """Recomputes a seeded random half of the recomputable nodes (chosen even if worse)."""

    name = RANDOM_PLANNER

    def plan(self, graph, budget, measure):
        evaluator = CandidateEvaluator(graph, measure)
        baseline, chosen = evaluator.evaluate_many([
            Decision(frozenset(), "unmirrored"),
            Decision(frozenset(random.Random(len(graph)).sample(
                graph.mirrorable_names, len(graph.mirrorable_names) // 2)), "random half")])
        outcome = evaluator.outcome(budget, baseline)
        outcome.chosen = chosen
        return outcome


if RANDOM_PLANNER not in _REGISTRY:
    register_planner(RANDOM_PLANNER)(RandomHalfPlanner)


# ----------------------------------------------------------------- architectures
def _conv(x, filters, kernel, name, stride=(1, 1)):
    pad = tuple(k // 2 for k in kernel)
    x = mx.sym.Convolution(x, num_filter=filters, kernel=kernel, stride=stride, pad=pad,
                           no_bias=True, name=f"{name}_conv")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name=f"{name}_bn")
    return mx.sym.Activation(x, act_type="relu", name=f"{name}_relu")


def _head(x, classes=10):
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1, 1), pool_type="avg", name="gap")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x, name="flat"), num_hidden=classes, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def inception_like():
    x = _conv(mx.sym.var("data"), 16, (3, 3), "stem")
    for block in range(2):
        a = _conv(x, 8, (1, 1), f"i{block}_a")
        b = _conv(_conv(x, 8, (1, 1), f"i{block}_b1"), 8, (3, 3), f"i{block}_b2")
        c = mx.sym.Pooling(x, kernel=(3, 3), pad=(1, 1), pool_type="max", name=f"i{block}_pool")
        c = _conv(c, 8, (1, 1), f"i{block}_c")
        x = mx.sym.Concat(a, b, c, dim=1, name=f"i{block}_concat")
    return _head(x), (8, 3, 48, 48), (8,)


def densenet_like():
    x = _conv(mx.sym.var("data"), 16, (3, 3), "stem")
    for layer in range(4):
        y = mx.sym.BatchNorm(x, fix_gamma=False, name=f"d{layer}_bn")
        y = mx.sym.Activation(y, act_type="relu", name=f"d{layer}_relu")
        y = mx.sym.Convolution(y, num_filter=8, kernel=(3, 3), pad=(1, 1), no_bias=True,
                               name=f"d{layer}_conv")
        x = mx.sym.Concat(x, y, dim=1, name=f"d{layer}_concat")
    return _head(x), (8, 3, 48, 48), (8,)


def lstm_unrolled():
    steps, hidden = 12, 256
    stack = mx.rnn.SequentialRNNCell()
    stack.add(mx.rnn.LSTMCell(hidden, prefix="l0_"))
    stack.add(mx.rnn.LSTMCell(hidden, prefix="l1_"))
    outputs, _ = stack.unroll(steps, inputs=mx.sym.var("data"), layout="NTC", merge_outputs=False)
    x = mx.sym.FullyConnected(outputs[-1], num_hidden=10, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax"), (32, steps, 64), (32,)


def unet_like():
    d1 = _conv(mx.sym.var("data"), 16, (3, 3), "down1")
    d2 = _conv(mx.sym.Pooling(d1, kernel=(2, 2), stride=(2, 2), pool_type="max", name="p1"),
               32, (3, 3), "down2")
    bottom = _conv(mx.sym.Pooling(d2, kernel=(2, 2), stride=(2, 2), pool_type="max", name="p2"),
                   32, (3, 3), "bottom")
    u2 = mx.sym.Deconvolution(bottom, num_filter=32, kernel=(2, 2), stride=(2, 2), name="up2")
    u2 = _conv(mx.sym.Concat(u2, d2, dim=1, name="skip2"), 32, (3, 3), "dec2")
    u1 = mx.sym.Deconvolution(u2, num_filter=16, kernel=(2, 2), stride=(2, 2), name="up1")
    u1 = _conv(mx.sym.Concat(u1, d1, dim=1, name="skip1"), 16, (3, 3), "dec1")
    return _head(u1), (4, 3, 64, 64), (4,)


def mlp_with_dropout():
    return dropout_mlp(4), (256, 1024), (256,)


def residual():
    return small_resnet(4, 16), (8, 3, 64, 64), (8,)


ARCHITECTURES = {"residual": residual, "inception": inception_like, "densenet": densenet_like,
                 "lstm": lstm_unrolled, "unet": unet_like, "mlp_dropout": mlp_with_dropout}


# ---------------------------------------------------------------------- harness
def train_and_capture(module, data_shape, label_shape, steps=3, classes=10):
    """Train ``steps`` SGD steps; return params, BatchNorm statistics and last gradients."""
    mx.random.seed(11)
    np.random.seed(11)
    rng = np.random.RandomState(5)
    module.bind([("data", data_shape)], [("softmax_label", label_shape)])
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={
        "learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4})
    grads: Dict[str, np.ndarray] = {}
    for _ in range(steps):
        batch = mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, data_shape))],
                                [mx.nd.array(rng.randint(0, classes, label_shape))])
        module.forward_backward(batch)
        mx.nd.waitall()
        grads = {name: g[0].asnumpy().copy() for name, g in
                 zip(module._exec_group.param_names, module._exec_group.grad_arrays)}
        module.update()
    mx.nd.waitall()
    args, auxs = module.get_params()
    return ({k: v.asnumpy() for k, v in args.items()}, {k: v.asnumpy() for k, v in auxs.items()},
            grads)


def assert_same_training(symbol, data_shape, label_shape, planner, tolerance=1e-6,
                         memory_budget=None):
    plain = train_and_capture(SyncedModule(symbol), data_shape, label_shape)
    module = MirroredModule(symbol, planner=planner, cache_dir=False, memory_budget=memory_budget)
    mirrored = train_and_capture(module, data_shape, label_shape)
    for what, left, right in zip(("parameter", "statistic", "gradient"), plain, mirrored):
        assert sorted(left) == sorted(right)
        for name in left:
            np.testing.assert_allclose(right[name], left[name], rtol=0, atol=tolerance,
                                       err_msg=f"{what} {name} differs")
    return module.mirror_plan


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("planner", ["auto", RANDOM_PLANNER])
def test_mirrored_training_equals_plain_training(architecture, planner):
    symbol, data_shape, label_shape = ARCHITECTURES[architecture]()
    plan = assert_same_training(symbol, data_shape, label_shape, planner)
    assert plan.planned_mb <= plan.baseline_mb or planner == RANDOM_PLANNER
    assert plan.mirrored, "this case must recompute something to mean anything"
    assert not any(name.startswith("drop") for name in plan.mirrored)


@pytest.mark.parametrize("architecture", ["residual", "inception", "densenet"])
def test_least_compute_plans_under_a_budget_train_identically(architecture):
    """A fixed budget picks a plan with kept and recomputed stretches (the dp program)."""
    symbol, data_shape, label_shape = ARCHITECTURES[architecture]()
    plan = assert_same_training(symbol, data_shape, label_shape, "dp", memory_budget=0.8)
    assert plan.planned_mb <= 0.8 * plan.baseline_mb
    assert plan.mirrored


# ------------------------------------------------------------- random graphs
@st.composite
def random_symbols(draw):
    """A random DAG of dense, activation, BatchNorm, sum and concat nodes over one input."""
    width = 64
    nodes = [mx.sym.var("data")]
    for i in range(draw(st.integers(3, 9))):
        kind = draw(st.sampled_from(["fc", "relu", "tanh", "bn", "add", "concat"]))
        a = nodes[draw(st.integers(0, len(nodes) - 1))]
        b = nodes[draw(st.integers(0, len(nodes) - 1))]
        if kind == "fc" or (kind in ("add", "concat") and a is nodes[0] and b is nodes[0]):
            node = mx.sym.FullyConnected(a, num_hidden=width, name=f"n{i}_fc")
        elif kind in ("relu", "tanh"):
            node = mx.sym.Activation(a, act_type=kind, name=f"n{i}_{kind}")
        elif kind == "bn":
            node = mx.sym.BatchNorm(a, fix_gamma=False, name=f"n{i}_bn")
        elif kind == "add":
            node = mx.sym.elemwise_add(a, b, name=f"n{i}_add")
        else:
            node = mx.sym.FullyConnected(mx.sym.Concat(a, b, dim=1, name=f"n{i}_cat"),
                                         num_hidden=width, name=f"n{i}_catfc")
        nodes.append(node)
    out = mx.sym.FullyConnected(nodes[-1], num_hidden=10, name="head")
    if not any(a.startswith("n") for a in out.list_arguments()):  # trivial graph: make one layer
        out = mx.sym.FullyConnected(mx.sym.Activation(out, act_type="relu", name="r"),
                                    num_hidden=10, name="head2")
    return mx.sym.SoftmaxOutput(out, name="softmax")


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_symbols(), st.sampled_from(["auto", RANDOM_PLANNER]))
def test_random_graphs_train_identically_and_auto_is_never_worse(symbol, planner):
    data_shape, label_shape = (256, 64), (256,)
    plan = assert_same_training(symbol, data_shape, label_shape, planner, tolerance=1e-5)
    if planner == "auto":
        assert plan.planned_mb <= plan.baseline_mb
    auto = plan_mirror(symbol, [("data", data_shape)], cache_dir=False)
    assert auto.planned_mb <= auto.baseline_mb
