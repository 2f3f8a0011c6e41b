"""The networks of every failure class the zoo sweep found, as Gluon blocks: ``mirror(net)`` in a
plain autograd loop trains exactly as the same loop without it.

The counterpart of tests/api/test_zoo_training.py (``MirroredModule`` against ``Module``) for the
Gluon surface: repeated operator names (a video network, Xception), the gradient-sum cap MXNet
cannot bind (a residual-attention network), a wide ResNet.  The unrolled language model called
with its list of states is in tests/api/test_gluon_nested_calls.py.  Each network is built at one
seed, initialized lazily (``initialize(Xavier())`` with input channels unknown, as gluoncv's
training scripts do), hybridized, then two autograd steps with a momentum SGD ``Trainer``:
initial weights, gradients of both steps and the parameters after them are compared bit for bit
(one-level plans, ``memory_budget='min'``), each network in a fresh process with MKLDNN off
(MXNet 1.9.1's MKLDNN cannot hand out the 3-D convolution's gradient views: 'Check failed:
!is_view', plain Gluon included).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from typing import Dict, Tuple

import numpy as np
import pytest

from tests.paths import ROOT

#: Network -> input shape (one or two samples at a small size: the graph, not the size, is tested).
NETWORKS: Dict[str, Tuple[int, ...]] = {
    "r2plus1d_resnet18_kinetics400": (1, 3, 4, 32, 32),
    "xception": (1, 3, 64, 64),
    "cifar_residualattentionnet56": (2, 3, 32, 32),
    "cifar_wideresnet16_10": (2, 3, 32, 32),
}
STEPS = 2
OPTIMIZER = {"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4}


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_a_zoo_network_of_each_failure_class_trains_like_plain_gluon(network):
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="0", MXNET_STORAGE_FALLBACK_LOG_VERBOSE="0", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), network], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["differences"] == {"initial": 0.0, "gradient": 0.0, "updated": 0.0}
    assert report["arrays"] > 10
    assert report["planned_mb"] < report["baseline_mb"] and report["recomputed"] > 0


def train(network: str, mirrored: bool) -> Tuple[Dict[str, Dict[str, np.ndarray]], object]:
    """Build ``network`` at a fixed seed, initialize it lazily and take STEPS SGD steps (the last
    plan too, when mirrored); arrays keyed by position (gluoncv's names take a process-wide
    counter)."""
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    from mxnet import autograd, gluon

    from mxnet_mirror_hook.gluon import mirror, mirror_state

    mx.random.seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gluoncv's parameter warnings
        net = get_model(network, pretrained=False, classes=10)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    if mirrored:
        mirror(net, backend="mirror", memory_budget="min", cache_dir=False)
    trainer = gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(0)
    shape = NETWORKS[network]
    params = net.collect_params()
    result: Dict[str, Dict[str, np.ndarray]] = {"initial": {}, "gradient": {}, "updated": {}}
    for step in range(STEPS):
        data = mx.nd.array(rng.uniform(-1, 1, shape))
        label = mx.nd.array(rng.randint(0, 10, shape[0]))
        with autograd.record():
            output = net(data)
            loss = loss_fn(output[0] if isinstance(output, (list, tuple)) else output, label)
        loss.backward()
        if step == 0:
            result["initial"] = {f"{i}": p.data().asnumpy() for i, p in enumerate(params.values())}
        result["gradient"].update({f"{step}:{i}": p.grad().asnumpy()
                                   for i, p in enumerate(params.values()) if p.grad_req != "null"})
        trainer.step(shape[0])
    result["updated"] = {f"{i}": p.data().asnumpy() for i, p in enumerate(params.values())}
    plan = mirror_state(net).last_plan if mirrored else None
    return result, plan


def _largest_differences(plain, mirrored) -> Dict[str, float]:
    differences = {}
    for stage in plain:
        assert sorted(plain[stage]) == sorted(mirrored[stage]), stage
        differences[stage] = max(float(np.abs(plain[stage][key] - mirrored[stage][key]).max())
                                 for key in plain[stage])
    return differences


if __name__ == "__main__":  # one network, plain and mirrored, in a process without MKLDNN
    _network = sys.argv[1]
    _plain, _ = train(_network, mirrored=False)
    _mirrored, _plan = train(_network, mirrored=True)
    assert _plan is not None, "the mirrored steps did not run through a plan"
    print(json.dumps({"differences": _largest_differences(_plain, _mirrored),
                      "arrays": len(_plain["updated"]), "baseline_mb": _plan.baseline_mb,
                      "planned_mb": _plan.planned_mb, "recomputed": len(_plan.mirrored)}))
