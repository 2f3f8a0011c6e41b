"""One worker of the distributed test (run by tests/test_distributed.py, not by pytest).

Usage: python tests/dist_worker.py KVSTORE OUT_DIR.  The DMLC_* variables say where the
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
from mxnet_mirror_hook.models import small_resnet  # noqa: E402


def main() -> None:
    kvstore_type, out_dir = sys.argv[1], sys.argv[2]
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
