#!/usr/bin/env python
"""Train a gluoncv classification network with MirroredModule (or plain Module).

Synthetic data by default: nothing is downloaded, weights start random.

    python examples/train_resnet.py --network resnet50_v1b --batch-size 32 --mirror
    python examples/train_resnet.py --network inceptionv3 --no-mirror
"""
from __future__ import annotations

import argparse
import logging
import time

import mxnet as mx
import numpy as np

from mxnet_mirror_hook import MirroredModule
from mxnet_mirror_hook.models import default_image_size, gluon_symbol

log = logging.getLogger("train_resnet")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="resnet50_v1b",
                        help="gluoncv model name (resnet50_v1b, resnet152_v1b, inceptionv3, "
                             "densenet121, mobilenetv2_1.0, ...)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side (default 224, 299 for Inception)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--num-batches", type=int, default=10, help="training iterations")
    parser.add_argument("--mirror", dest="mirror", action="store_true", default=True,
                        help="recompute forward nodes during backward (default)")
    parser.add_argument("--no-mirror", dest="mirror", action="store_false",
                        help="train with a plain mx.mod.Module")
    parser.add_argument("--planner", default="auto")
    parser.add_argument("--memory-budget", default=None)
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids; CPU when empty")
    parser.add_argument("--lr", type=float, default=0.01)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size = args.image_size or default_image_size(args.network)
    contexts = [mx.gpu(int(i)) for i in args.gpus.split(",") if i.strip()] or [mx.cpu()]
    symbol, _ = gluon_symbol(args.network, classes=args.classes)

    rng = np.random.RandomState(0)
    samples = args.batch_size * 2
    data = rng.uniform(-1, 1, (samples, 3, size, size)).astype("float32")
    labels = rng.randint(0, args.classes, samples).astype("float32")
    train_iter = mx.io.NDArrayIter(data, labels, args.batch_size, shuffle=False,
                                   last_batch_handle="roll_over", label_name="softmax_label")

    if args.mirror:
        module = MirroredModule(symbol, context=contexts, planner=args.planner,
                                memory_budget=args.memory_budget)
    else:
        module = mx.mod.Module(symbol, context=contexts)
    module.bind(train_iter.provide_data, train_iter.provide_label)
    plan = getattr(module, "mirror_plan", None)  # the library logs its summary at INFO
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": args.lr,
                                                             "momentum": 0.9, "wd": 1e-4})
    metric = mx.metric.create("ce")
    done, timed, started = 0, 0.0, None
    while done < args.num_batches:
        train_iter.reset()
        for batch in train_iter:
            if done >= args.num_batches:
                break
            tick = time.perf_counter()
            module.forward_backward(batch)
            module.update()
            module.update_metric(metric, batch.label)
            mx.nd.waitall()
            elapsed = time.perf_counter() - tick
            if done > 0:  # the first iteration includes one-off setup
                timed += elapsed
            done += 1
            log.info("iter %d/%d  %.2f s  %s=%.3f", done, args.num_batches, elapsed,
                     *metric.get())
    throughput = (args.batch_size * (done - 1) / timed) if done > 1 and timed > 0 else float("nan")
    summary = {
        "network": args.network, "batch_size": args.batch_size, "image_size": size,
        "mirror": args.mirror, "iterations": done, "samples_per_second": throughput,
        "baseline_mb": plan.baseline_mb if plan else None,
        "planned_mb": plan.planned_mb if plan else None,
    }
    log.info("summary: %s, %s, %.1f samples/s%s", args.network,
             "mirrored" if args.mirror else "plain", throughput,
             f", memory plan {plan.baseline_mb:.0f} -> {plan.planned_mb:.0f} MB" if plan else "")
    return summary


if __name__ == "__main__":
    main()
