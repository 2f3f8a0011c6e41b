"""MirroredModule against a plain mx.mod.Module: same results, less memory."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook import MirroredModule, ShapeError, UnknownPlannerError, plan_mirror
from mxnet_mirror_hook.testing.models import small_resnet
from mxnet_mirror_hook.mx.convert import MIRROR_ATTR
from tests.helpers import SyncedModule, batches, max_difference, train

SHAPE = (8, 3, 64, 64)
CLASSES = 10


@pytest.fixture(scope="module")
def symbol():
    return small_resnet(num_blocks=4, channels=16, num_classes=CLASSES)


def test_three_sgd_steps_match_a_plain_module_exactly(symbol):
    plain_args, plain_auxs = train(mx.mod.Module(symbol), SHAPE, CLASSES)
    mirrored = MirroredModule(symbol)
    args, auxs = train(mirrored, SHAPE, CLASSES)
    plan = mirrored.mirror_plan
    assert plan is not None and plan.mirrored, "the plan must recompute something"
    assert any(name.endswith("_bn") for name in plan.mirrored)  # BatchNorm is recomputed too
    assert plan.planned_mb < plan.baseline_mb
    assert max_difference(plain_args, args) <= 1e-6
    assert max_difference(plain_auxs, auxs) <= 1e-6  # BatchNorm moving statistics


def test_the_bound_executor_uses_the_mirrored_symbol(symbol):
    module = MirroredModule(symbol)
    module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    bound = module._exec_group.symbol
    flagged = {n for n, a in bound.attr_dict().items() if a.get(MIRROR_ATTR) == "True"}
    assert flagged == set(module.mirror_plan.mirrored)
    assert module.symbol is symbol  # what users and checkpoints see


def test_inference_bind_is_plain(symbol):
    module = MirroredModule(symbol)
    module.bind([("data", SHAPE)], for_training=False)
    assert module.mirror_plan is None
    assert module._exec_group.symbol is symbol


def test_new_batch_shape_replans_and_training_stays_equal(symbol):
    small, large = batches(1, (4,) + SHAPE[1:], CLASSES), batches(2, SHAPE, CLASSES, seed=7)
    results = []
    for module in (mx.mod.Module(symbol), MirroredModule(symbol)):
        mx.random.seed(0)
        module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
        module.init_params(mx.init.Xavier(magnitude=2.0))
        module.init_optimizer(optimizer_params={"learning_rate": 0.1, "momentum": 0.9})
        first_plan = getattr(module, "mirror_plan", None)
        for batch in large[:1] + small + large[1:]:
            module.forward_backward(batch)
            module.update()
        mx.nd.waitall()
        results.append(module.get_params())
        if isinstance(module, MirroredModule):
            assert module.mirror_plan is not first_plan
            assert module.mirror_plan.mirrored
            assert module._exec_group.data_shapes[0].shape == SHAPE
    (pa, xa), (pb, xb) = results
    assert max_difference({k: v.asnumpy() for k, v in pa.items()},
                          {k: v.asnumpy() for k, v in pb.items()}) <= 1e-6
    assert max_difference({k: v.asnumpy() for k, v in xa.items()},
                          {k: v.asnumpy() for k, v in xb.items()}) <= 1e-6


def test_checkpoint_holds_the_users_symbol_and_loads_in_both_modules(symbol, tmp_path):
    module = MirroredModule(symbol)
    train(module, SHAPE, CLASSES, steps=1)
    prefix = str(tmp_path / "net")
    module.save_checkpoint(prefix, 1, save_optimizer_states=True)
    saved = mx.sym.load(prefix + "-symbol.json")
    assert MIRROR_ATTR not in saved.tojson()
    assert saved.tojson() == symbol.tojson()

    plain = mx.mod.Module.load(prefix, 1)
    again = MirroredModule.load(prefix, 1, load_optimizer_states=True, memory_budget="min")
    assert isinstance(again, MirroredModule) and type(plain) is mx.mod.Module
    again.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    again.init_optimizer(optimizer_params={"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
    assert again.mirror_plan.mirrored
    loaded_args, _ = again.get_params()
    saved_args, _ = module.get_params()
    for name in saved_args:
        np.testing.assert_array_equal(loaded_args[name].asnumpy(), saved_args[name].asnumpy())


def test_reference_module_with_the_sync_fix_is_reproducible(symbol):
    """Documents the MXNet race that SyncedModule and MirroredModule work around."""
    predictions = [_fit_and_predict(cls, symbol)[1] for cls in (SyncedModule, SyncedModule)]
    np.testing.assert_array_equal(predictions[0], predictions[1])


def _fit_and_predict(cls, symbol):
    rng = np.random.RandomState(3)
    data = rng.uniform(-1, 1, (16,) + SHAPE[1:]).astype("float32")
    labels = rng.randint(0, CLASSES, 16).astype("float32")
    iterator = mx.io.NDArrayIter(data, labels, batch_size=SHAPE[0], label_name="softmax_label")
    module = cls(symbol)
    mx.random.seed(0)
    module.fit(iterator, num_epoch=1, optimizer_params={"learning_rate": 0.05},
               initializer=mx.init.Xavier(magnitude=2.0))
    return dict(module.score(iterator, "acc"))["accuracy"], module.predict(iterator).asnumpy()


def test_fit_score_and_predict_match_module(symbol):
    (score_plain, plain), (score_mirrored, mirrored) = [
        _fit_and_predict(cls, symbol) for cls in (SyncedModule, MirroredModule)]
    assert score_plain == score_mirrored
    np.testing.assert_allclose(plain, mirrored, atol=1e-6)


def test_several_contexts_plan_for_the_per_device_batch(symbol):
    contexts = [mx.cpu(0), mx.cpu(1)]
    plain_args, plain_auxs = train(mx.mod.Module(symbol, context=contexts), SHAPE, CLASSES)
    module = MirroredModule(symbol, context=contexts)
    args, auxs = train(module, SHAPE, CLASSES)
    per_device = plan_mirror(symbol, [("data", (SHAPE[0] // 2,) + SHAPE[1:])],
                             [("softmax_label", (SHAPE[0] // 2,))])
    assert module.mirror_plan.baseline_mb == per_device.baseline_mb
    assert max_difference(plain_args, args) <= 1e-6
    assert max_difference(plain_auxs, auxs) <= 1e-6


def test_no_gradient_bind_is_plain(symbol):
    module = MirroredModule(symbol)
    module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))], grad_req="null")
    assert module.mirror_plan is None


def test_bad_arguments_fail_early_with_clear_errors(symbol):
    with pytest.raises(UnknownPlannerError):
        MirroredModule(symbol, planner="greedy")
    with pytest.raises(ValueError):
        MirroredModule(symbol, memory_budget="-1GB")
    module = MirroredModule(symbol)
    with pytest.raises(ShapeError):
        module.bind([("data", (8, 64, 64))], [("softmax_label", (8,))])
    assert not module.binded


class _BatchDependentPlanner:
    """Test planner whose decision changes with the batch size (forces a rebind)."""

    name = "test-batch-dependent"

    def plan(self, graph, budget, measure):
        from mxnet_mirror_hook.core.planners.base import CandidateEvaluator, Decision

        evaluator = CandidateEvaluator(graph, measure)
        baseline = evaluator.evaluate(Decision(frozenset(), "unmirrored"))
        batch = graph.node("data").output_shapes[0][0]
        suffix = "_relu" if batch >= 8 else "_bn"
        chosen = evaluator.evaluate(Decision(frozenset(
            n.name for n in graph.op_nodes if n.name.endswith(suffix)), suffix))
        return type(evaluator.outcome(budget, baseline))(chosen, baseline.planned_mb,
                                                         evaluator.candidates)


def test_shape_change_with_a_different_decision_rebinds_and_keeps_training_equal(symbol):
    from mxnet_mirror_hook.core.planners import _REGISTRY, register_planner

    if _BatchDependentPlanner.name not in _REGISTRY:
        register_planner(_BatchDependentPlanner.name)(_BatchDependentPlanner)
    small, large = batches(2, (4,) + SHAPE[1:], CLASSES), batches(2, SHAPE, CLASSES, seed=7)
    results = []
    for module in (mx.mod.Module(symbol), MirroredModule(symbol, planner=_BatchDependentPlanner.name)):
        mx.random.seed(0)
        module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
        module.init_params(mx.init.Xavier(magnitude=2.0))
        module.init_optimizer(optimizer_params={"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
        for step, batch in enumerate([large[0], small[0], small[1], large[1]]):
            module.forward_backward(batch)
            module.update()
            if isinstance(module, MirroredModule):
                expected = "_bn" if step in (1, 2) else "_relu"
                assert module.mirror_plan.mirrored
                assert all(name.endswith(expected) for name in module.mirror_plan.mirrored)
        mx.nd.waitall()
        results.append([{k: v.asnumpy() for k, v in d.items()} for d in module.get_params()])
    assert max_difference(results[0][0], results[1][0]) <= 1e-6
    assert max_difference(results[0][1], results[1][1]) <= 1e-6
