"""``mirror(net)`` with Horovod's own ``DistributedTrainer`` (2 ranks, Gloo, CPU).

Skips where Horovod (``pip install ".[horovod]"``, built with MXNet and Gloo) or ``horovodrun`` is
missing.  Run as a script by ``horovodrun``, this file is the worker: every rank trains a plain and a
mirrored copy of one network on its own shard, each with its own ``hvd.DistributedTrainer``, plus a
``MirroredTrainer`` given a ``DistributedTrainer``, and writes what it ends with.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIMIZER = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}


def _horovod_available() -> bool:
    try:
        import horovod.mxnet  # noqa: F401
    except Exception:  # ImportError, or a build without MXNet support
        return False
    return shutil.which("horovodrun") is not None or \
        os.path.exists(os.path.join(os.path.dirname(sys.executable), "horovodrun"))


@pytest.mark.slow
@pytest.mark.skipif(not _horovod_available(), reason="Horovod with MXNet support is not installed")
def test_mirror_with_horovod_distributed_trainer_on_two_ranks(tmp_path):
    runner = shutil.which("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(
        [runner, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, os.path.abspath(__file__),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["plain_vs_mirrored"] == 0.0  # parameters and BatchNorm statistics, bit for bit
        assert result["plain_vs_trainer"] == 0.0  # MirroredTrainer given a DistributedTrainer
        assert result["mirrored_nodes"] > 0
    # the allreduce made the weights equal on both ranks (statistics stay per rank, as in Gluon)
    assert results[0]["weights_digest"] == results[1]["weights_digest"]


def _worker(out_dir: str) -> None:
    import hashlib

    import horovod.mxnet as hvd
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon

    from mxnet_mirror_hook.gluon import MirroredTrainer, mirror, mirror_state

    hvd.init()
    rank = hvd.rank()

    def make():
        net = gluon.nn.HybridSequential()
        with net.name_scope():
            for _ in range(4):
                net.add(gluon.nn.Conv2D(32, 3, padding=1), gluon.nn.BatchNorm(),
                        gluon.nn.Activation("relu"))
            net.add(gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(10))
        return net

    path = os.path.join(out_dir, "init.params")
    if rank == 0:
        mx.random.seed(0)
        source = make()
        source.initialize(mx.init.Xavier(magnitude=2.0))
        source(mx.nd.zeros((1, 3, 32, 32)))
        source.save_parameters(path)
    hvd.allreduce(mx.nd.zeros((1,)), name="barrier").wait_to_read()
    nets = []
    for _ in range(3):
        net = make()
        net.load_parameters(path)
        net.hybridize()
        nets.append(net)
    plain, mirrored, stepped = nets
    mirror(mirrored, cache_dir=False, memory_budget="min")
    trainers = [hvd.DistributedTrainer(net.collect_params(), "sgd", OPTIMIZER, prefix=f"t{i}_")
                for i, net in enumerate(nets)]
    wrapper = MirroredTrainer(stepped, gluon.loss.SoftmaxCrossEntropyLoss(), trainers[2],
                              cache_dir=False, memory_budget="min")
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(rank)
    for _ in range(3):
        data = mx.nd.array(rng.uniform(-1, 1, (4, 3, 32, 32)))
        label = mx.nd.array(rng.randint(0, 10, 4))
        for net, trainer in zip(nets[:2], trainers[:2]):
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(data.shape[0])
        wrapper.step(data, label)

    def values(net):
        return [p.data().asnumpy() for p in net.collect_params().values()]

    def largest_difference(a, b):
        return max(float(np.abs(x - y).max()) for x, y in zip(values(a), values(b)))

    weights = [p.data().asnumpy() for name, p in plain.collect_params().items() if "running" not in name]
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    result = {"plain_vs_mirrored": largest_difference(plain, mirrored),
              "plain_vs_trainer": largest_difference(plain, stepped),
              "mirrored_nodes": len(mirror_state(mirrored).last_plan.mirrored),
              "weights_digest": digest}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    _worker(sys.argv[1])
