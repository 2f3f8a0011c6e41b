"""MirroredTrainer against autograd + gluon.Trainer."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from mxnet_mirror_hook import ShapeError
from mxnet_mirror_hook.errors import GluonMirrorError
from mxnet_mirror_hook.gluon import MirroredTrainer, mirror, mirror_state

OPTIMIZER = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}


def _twin_resnets(tmp_path):
    from gluoncv.model_zoo import get_model

    mx.random.seed(0)
    reference = get_model("resnet18_v1b", pretrained=False, classes=10)
    reference.initialize(mx.init.Xavier(magnitude=2.0))
    reference(mx.nd.zeros((1, 3, 64, 64)))
    path = str(tmp_path / "init.params")
    reference.save_parameters(path)
    mirrored = get_model("resnet18_v1b", pretrained=False, classes=10)
    mirrored.load_parameters(path)
    reference.hybridize()
    mirrored.hybridize()
    return reference, mirrored


def _batches(count, batch=8, seed=0):
    rng = np.random.RandomState(seed)
    return [(mx.nd.array(rng.uniform(-1, 1, (batch, 3, 64, 64))),
             mx.nd.array(rng.randint(0, 10, batch))) for _ in range(count)]


def _by_structure(net):
    """Parameters keyed without the model prefix, as numpy."""
    mx.nd.waitall()
    return {name.split("_", 1)[1]: p.data().asnumpy() for name, p in net.collect_params().items()}


@pytest.mark.slow
def test_mirrored_trainer_equals_autograd_and_trainer_on_resnet18(tmp_path):
    reference, mirrored = _twin_resnets(tmp_path)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    plain_trainer = gluon.Trainer(reference.collect_params(), "sgd", OPTIMIZER)
    trainer = MirroredTrainer(mirrored, loss, "sgd", OPTIMIZER, cache_dir=False)
    for data, label in _batches(3):
        with autograd.record():
            plain_loss = loss(reference(data), label)
        plain_loss.backward()
        plain_trainer.step(data.shape[0])
        assert trainer.step(data, label) == pytest.approx(float(plain_loss.mean().asscalar()),
                                                          abs=1e-5)
    plan = trainer.mirror_plan
    assert plan.mirrored and plan.planned_mb < plan.baseline_mb
    expected, actual = _by_structure(reference), _by_structure(mirrored)
    assert sorted(expected) == sorted(actual)
    for name in expected:  # weights and BatchNorm running statistics
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_net_stays_usable_with_plain_gluon_and_new_batch_size_replans(tmp_path):
    _, net = _twin_resnets(tmp_path)
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), "sgd", OPTIMIZER)
    (data, label), = _batches(1)
    trainer.step(data, label)
    first = trainer.mirror_plan
    trainer.step(data, label)  # same shape: the bound executors are reused
    assert trainer.mirror_plan is first
    (small, small_label), = _batches(1, batch=4, seed=1)
    trainer.step(small, small_label)
    assert trainer.mirror_plan is not first and trainer.mirror_plan.mirrored
    (other, other_label), = _batches(1, batch=6, seed=2)
    trainer.step(other, other_label)  # a third shape evicts batch 8's executors...
    trainer.step(data, label)  # ...which are bound again from the cached plan
    assert trainer.mirror_plan.from_cache and trainer.mirror_plan.mirrored == first.mirrored
    assert net(data).shape == (8, 10)  # plain Gluon still works
    net.save_parameters(str(tmp_path / "after.params"))

def test_bad_batches_and_blocks_are_rejected():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(16, activation="relu"), gluon.nn.Dense(4))
    net.initialize()
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), "sgd")
    with pytest.raises(ShapeError, match="batch size"):
        trainer.step(mx.nd.ones((8, 32)), mx.nd.ones((7,)))
    with pytest.raises(TypeError, match="HybridBlock"):
        MirroredTrainer(gluon.nn.Sequential(), gluon.loss.L2Loss(), "sgd")


def test_deferred_initialization_is_finished_without_touching_statistics():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(256, activation="relu"), gluon.nn.BatchNorm(), gluon.nn.Dense(4))
    net.initialize()  # shapes unknown until the first batch
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), "sgd",
                              {"learning_rate": 0.01})
    loss = trainer.step(mx.nd.ones((16, 32)), mx.nd.zeros((16,)))
    assert np.isfinite(loss)


def _small_net():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(16, activation="relu"), gluon.nn.BatchNorm(), gluon.nn.Dense(4))
    net.initialize()
    return net


def test_a_ready_trainer_is_used_as_it_is():
    net = _small_net()
    ready = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), ready)
    assert trainer.trainer is ready
    assert np.isfinite(trainer.step(mx.nd.ones((8, 32)), mx.nd.zeros((8,))))
    with pytest.raises(GluonMirrorError, match="optimizer_params"):
        MirroredTrainer(net, gluon.loss.L2Loss(), ready, {"learning_rate": 0.1})


def test_horovod_distributed_optimizer_is_refused_with_the_fix():
    class DistributedOptimizer(mx.optimizer.SGD):  # what hvd.DistributedOptimizer looks like
        pass

    DistributedOptimizer.__module__ = "horovod.mxnet.mpi_ops"
    with pytest.raises(GluonMirrorError, match="DistributedTrainer"):
        MirroredTrainer(_small_net(), gluon.loss.L2Loss(), DistributedOptimizer())


def test_mirror_takes_recompute_dropout_and_refuses_an_unknown_option():
    net = _small_net()
    mirror(net, recompute_dropout=True, cache_dir=False)
    assert mirror_state(net).options.recompute_dropout is True
    with pytest.raises(TypeError, match="memory_budget"):
        mirror(_small_net(), memory_bugdet="min")
