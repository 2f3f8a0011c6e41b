"""A lazily initialized block under ``mirror(net)`` starts from plain Gluon's initial weights.

Layers that infer their input size at the first forward (``in_channels=0``, Dense without
``in_units``) draw their initial values then, from the one global random generator, so the order
in which they are initialized decides each one's weights (NOTE [ deferred initialization in plain
Gluon's order ] in mxnet_mirror_hook/gluon/deferred.py).  Each test builds the same network twice
at the same seed, ``initialize(Xavier())`` with shapes unknown, plain and with ``mirror(net)``, and
compares initial weights, gradients after one autograd step and parameters after one SGD step,
bit for bit.  A block that is not hybridized runs MXNet's imperative kernels in plain Gluon and
the executor's in the mirrored run: with MKLDNN these round differently (about 1e-6), so that
comparison runs in a child process with ``MXNET_MKLDNN_ENABLED=0`` (MXNet reads it at start).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable, Dict, Tuple

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from mxnet_mirror_hook.gluon import mirror, mirror_state  # noqa: E402
from tests.paths import ROOT  # noqa: E402

OPTIMIZER = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}


class _Residual(gluon.HybridBlock):
    """Pre-activation residual unit (BN, ReLU, conv) with input channels inferred lazily."""

    def __init__(self, channels: int, stride: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.bn1 = gluon.nn.BatchNorm()
            self.conv1 = gluon.nn.Conv2D(channels, 3, stride, 1, use_bias=False, in_channels=0)
            self.bn2 = gluon.nn.BatchNorm()
            self.conv2 = gluon.nn.Conv2D(channels, 3, 1, 1, use_bias=False, in_channels=0)
            self.downsample = gluon.nn.Conv2D(channels, 1, stride, use_bias=False, in_channels=0)

    def hybrid_forward(self, F, x):
        out = F.Activation(self.bn1(x), act_type="relu")
        shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.Activation(self.bn2(out), act_type="relu"))
        return out + shortcut


class _Attention(gluon.HybridBlock):
    """A residual-attention module: the soft mask branch is built before the trunk it gates but
    runs after it, so Parameter order and execution order differ (as in gluoncv's
    ResidualAttentionModel)."""

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.mask = gluon.nn.HybridSequential()
            self.mask.add(gluon.nn.MaxPool2D(3, 2, 1), _Residual(channels), _Residual(channels))
            self.mask_out = gluon.nn.HybridSequential()
            self.mask_out.add(gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
                              gluon.nn.Conv2D(channels, 1, use_bias=False, in_channels=0))
            self.trunk = gluon.nn.HybridSequential()
            self.trunk.add(_Residual(channels), _Residual(channels))
            self.first = _Residual(channels)

    def hybrid_forward(self, F, x):
        x = self.first(x)
        trunk = self.trunk(x)
        mask = F.UpSampling(self.mask(x), scale=2, sample_type="nearest")
        return F.broadcast_mul(trunk, 1 + F.sigmoid(self.mask_out(mask)))


class AttentionNet(gluon.HybridBlock):
    """A small CIFAR residual-attention network: lazy convs, attention stages, Dense head."""

    def __init__(self, classes: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.head = gluon.nn.HybridSequential()
            self.head.add(gluon.nn.Dense(32, activation="relu"), gluon.nn.Dense(classes))
            self.stem = gluon.nn.HybridSequential()
            self.stem.add(gluon.nn.Conv2D(16, 3, 1, 1, use_bias=False, in_channels=0),
                          gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
            self.stage1 = _Attention(16)
            self.down = _Residual(32, stride=2)
            self.stage2 = _Attention(32)
            self.pool = gluon.nn.GlobalAvgPool2D()

    def hybrid_forward(self, F, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.pool(F.Activation(x, act_type="relu")))


class PartlyHybridized(AttentionNet):
    """Not hybridized itself, with two hybridized children (each a CachedOp in plain Gluon)."""

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.stage1.hybridize()
        self.down.hybridize()


def _attention56():
    from gluoncv.model_zoo import get_model

    return get_model("cifar_residualattentionnet56", pretrained=False)


def _one_step(factory: Callable[[], gluon.HybridBlock], mirrored: bool, hybridize: bool,
              shape: Tuple[int, ...], seed: int = 7) -> Dict[str, Dict[str, np.ndarray]]:
    """Build at ``seed``, initialize lazily, one autograd step and one SGD step."""
    mx.random.seed(seed)
    np.random.seed(seed)
    net = factory()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    if mirrored:
        mirror(net, cache_dir=False)
    trainer = gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER)
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.uniform(-1, 1, shape))
    label = mx.nd.array(rng.randint(0, 10, shape[0]))
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(data), label)
    loss.backward()
    params = net.collect_params()
    result = {"initial": {k: p.data().asnumpy() for k, p in params.items()},
              "gradient": {k: p.grad().asnumpy() for k, p in params.items() if p.grad_req != "null"}}
    trainer.step(shape[0])
    result["updated"] = {k: p.data().asnumpy() for k, p in params.items()}
    if mirrored:
        assert mirror_state(net).last_plan is not None  # the step ran through the mirrored executor
    # Keyed by position: gluoncv's blocks take names from a process-wide counter.
    return {stage: {f"{i}:{k.split('_', 1)[1]}": v for i, (k, v) in enumerate(arrays.items())}
            for stage, arrays in result.items()}


def _assert_bit_identical(plain, mirrored) -> None:
    for stage in ("initial", "gradient", "updated"):
        assert len(plain[stage]) == len(mirrored[stage]), stage
        for (name, expected), actual in zip(plain[stage].items(), mirrored[stage].values()):
            np.testing.assert_array_equal(actual, expected, err_msg=f"{stage} {name}")


def _differences(plain, mirrored) -> Dict[str, float]:
    """Per stage, the largest absolute difference over every array."""
    return {stage: max(float(np.abs(a - b).max()) for a, b in zip(plain[stage].values(),
                                                                   mirrored[stage].values()))
            for stage in plain}


def test_lazily_initialized_attention_net_starts_from_plain_gluons_weights():
    shape = (4, 3, 16, 16)
    plain = _one_step(AttentionNet, mirrored=False, hybridize=True, shape=shape)
    mirrored = _one_step(AttentionNet, mirrored=True, hybridize=True, shape=shape)
    _assert_bit_identical(plain, mirrored)


def test_not_hybridized_attention_net_starts_from_plain_gluons_weights():
    shape = (4, 3, 16, 16)
    plain = _one_step(AttentionNet, mirrored=False, hybridize=False, shape=shape)
    mirrored = _one_step(AttentionNet, mirrored=True, hybridize=False, shape=shape)
    for name, expected in plain["initial"].items():
        if "running_" not in name:  # the forward updates BatchNorm statistics (rounded differently)
            np.testing.assert_array_equal(mirrored["initial"][name], expected, err_msg=name)
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="0", MXNET_STORAGE_FALLBACK_LOG_VERBOSE="0",
               PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    identical = {"initial": 0.0, "gradient": 0.0, "updated": 0.0}
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"imperative": identical,
                                                                 "partly hybridized": identical}


@pytest.mark.slow
def test_gluoncv_cifar_residual_attention_56_starts_from_plain_gluons_weights():
    shape = (2, 3, 32, 32)
    plain = _one_step(_attention56, mirrored=False, hybridize=True, shape=shape)
    mirrored = _one_step(_attention56, mirrored=True, hybridize=True, shape=shape)
    _assert_bit_identical(plain, mirrored)


if __name__ == "__main__":  # the not hybridized comparisons, in a process without MKLDNN
    _shape = (4, 3, 16, 16)
    print(json.dumps({name: _differences(_one_step(factory, False, False, _shape),
                                         _one_step(factory, True, False, _shape))
                      for name, factory in (("imperative", AttentionNet),
                                            ("partly hybridized", PartlyHybridized))}))
