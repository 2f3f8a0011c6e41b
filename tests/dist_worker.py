"""One worker of the distributed test (run by tests/api/test_distributed.py, not by pytest).

Usage: python tests/dist_worker.py KVSTORE OUT_DIR [module|gluon].  The DMLC_* variables say where the
scheduler is.  Trains a mirrored residual network for two epochs on this worker's own
shard and saves its parameters and plan.
"""
import json
import os
import sys

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mxnet_mirror_hook import MirroredModule  # noqa: E402
from mxnet_mirror_hook.testing.models import small_resnet  # noqa: E402


def train_gluon(kvstore_type: str, out_dir: str) -> None:
    """MirroredTrainer with a distributed kvstore: each worker trains on its own shard."""
    from mxnet import gluon

    from mxnet_mirror_hook.gluon import MirroredTrainer

    kvstore = mx.kv.create(kvstore_type)
    rank = kvstore.rank
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        for _ in range(8):
            net.add(gluon.nn.Dense(1024), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
        net.add(gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), "sgd",
                              {"learning_rate": 0.05, "momentum": 0.9}, kvstore=kvstore,
                              cache_dir=False)
    rng = np.random.RandomState(100 + rank)
    for _ in range(2):  # two epochs of four batches
        for _ in range(4):
            trainer.step(mx.nd.array(rng.uniform(-1, 1, (256, 512))),
                         mx.nd.array(rng.randint(0, 10, 256)))
    mx.nd.waitall()
    params = {name: p.data().asnumpy() for name, p in net.collect_params().items()
              if p.grad_req != "null"}
    np.savez(os.path.join(out_dir, f"params-{rank}.npz"), **params)
    with open(os.path.join(out_dir, f"plan-{rank}.json"), "w") as handle:
        json.dump({"mirrored": list(trainer.mirror_plan.mirrored),
                   "planned_mb": trainer.mirror_plan.planned_mb,
                   "baseline_mb": trainer.mirror_plan.baseline_mb,
                   "workers": kvstore.num_workers}, handle)


def main() -> None:
    kvstore_type, out_dir = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3 and sys.argv[3] == "gluon":
        train_gluon(kvstore_type, out_dir)
        return
    kvstore = mx.kv.create(kvstore_type)
    rank = kvstore.rank
    rng = np.random.RandomState(100 + rank)  # a different shard on each worker
    data = rng.uniform(-1, 1, (32, 3, 32, 32)).astype("float32")
    labels = rng.randint(0, 10, 32).astype("float32")
    iterator = mx.io.NDArrayIter(data, labels, batch_size=8, label_name="softmax_label")
    module = MirroredModule(small_resnet(3, 16), cache_dir=False)
    mx.random.seed(0)
    module.fit(iterator, num_epoch=2, kvstore=kvstore, optimizer="sgd",
               optimizer_params={"learning_rate": 0.05, "momentum": 0.9, "wd": 1e-4},
               initializer=mx.init.Xavier(magnitude=2.0))
    args, _ = module.get_params()
    np.savez(os.path.join(out_dir, f"params-{rank}.npz"), **{k: v.asnumpy() for k, v in args.items()})
    with open(os.path.join(out_dir, f"plan-{rank}.json"), "w") as handle:
        json.dump({"mirrored": list(module.mirror_plan.mirrored),
                   "planned_mb": module.mirror_plan.planned_mb,
                   "baseline_mb": module.mirror_plan.baseline_mb,
                   "workers": kvstore.num_workers}, handle)


if __name__ == "__main__":
    main()
