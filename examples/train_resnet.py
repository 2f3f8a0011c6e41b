#!/usr/bin/env python
"""Train a gluoncv classification network with memory mirroring (or without, to compare).

Synthetic data by default: nothing is downloaded, weights start random.

    python examples/train_resnet.py --network resnet50_v1b --batch-size 32
    python examples/train_resnet.py --network inceptionv3 --mode gluon --no-mirror
    python examples/train_resnet.py --rec train.rec --memory-budget 0.6
    python examples/train_resnet.py --network resnet152_v1b --find-max-batch 16GB
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Dict, Iterator, Optional, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from mxnet_mirror_hook import MirrorOptions, add_arguments, from_args, max_batch
from mxnet_mirror_hook.gluon import mirror, mirror_state
from mxnet_mirror_hook.testing.models import default_image_size, gluon_symbol

log = logging.getLogger("train_resnet")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="resnet50_v1b",
                        help="gluoncv model: resnet50_v1b, resnet152_v1b, inceptionv3, "
                             "densenet121, mobilenetv2_1.0, ...")
    parser.add_argument("--mode", choices=("module", "gluon"), default="module",
                        help="train with (Mirrored)Module or with an ordinary Gluon loop "
                             "(net = mirror(net))")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side (default 224, 299 for Inception)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--num-batches", type=int, default=10, help="training iterations")
    parser.add_argument("--rec", default=None,
                        help="a RecordIO file of images (ImageRecordIter) instead of synthetic data")
    parser.add_argument("--find-max-batch", default=None, metavar="BUDGET",
                        help="report the largest batch whose whole footprint fits BUDGET "
                             "(e.g. 16GB): plain, one-level and segments, and exit")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids; CPU when empty")
    parser.add_argument("--lr", type=float, default=0.01)
    # --mirror/--no-mirror, --memory-budget, --planner, --cache-dir, --no-cache, --cost-ctx, --keep-ops
    add_arguments(parser, mirror_default=True)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------- data
def batches(args, size: int) -> Iterator[Tuple[mx.nd.NDArray, mx.nd.NDArray]]:
    """Endless (data, label) batches from a RecordIO file or synthetic."""
    if args.rec:
        records = mx.io.ImageRecordIter(path_imgrec=args.rec, data_shape=(3, size, size),
                                        batch_size=args.batch_size, shuffle=True, rand_mirror=True,
                                        round_batch=True)
        while True:
            records.reset()
            for batch in records:
                yield batch.data[0], batch.label[0]
    rng = np.random.RandomState(0)
    pool = [(mx.nd.array(rng.uniform(-1, 1, (args.batch_size, 3, size, size))),
             mx.nd.array(rng.randint(0, args.classes, args.batch_size))) for _ in range(2)]
    while True:
        yield from pool


def progress(total: int) -> "tqdm":
    """A tqdm bar over the training iterations (on stderr; the summary line comes after)."""
    return tqdm(total=total, unit="it", desc="training", file=sys.stderr, leave=False)


# ----------------------------------------------------------------- max batch
def find_max_batch(args, symbol: mx.sym.Symbol, size: int, contexts) -> Dict[str, int]:
    """Largest batch whose whole footprint (parameters, gradients, SGD momentum, inputs, workspace
    and activations) fits ``--find-max-batch``: plain and one-level searched over real plans,
    executor segments estimated from two probes (their 'min' planning is the slow one)."""
    device = "gpu" if contexts[0].device_type == "gpu" else "cpu"
    options = MirrorOptions.from_args(args).replace(device_memory=None)
    common = dict(optimizer="sgd", optimizer_params={"momentum": 0.9}, device=device, options=options)
    shapes = {"data": (None, 3, size, size), "softmax_label": (None,)}
    found = max_batch(symbol, shapes, args.find_max_batch, variants=("plain", "one-level"), **common)
    estimated = max_batch(symbol, shapes, args.find_max_batch, variants=("segments",), method="slope",
                          **common)
    fits = {**found.fits, **estimated.fits}
    for name, fit in fits.items():
        log.info("largest batch within %s, %s: %d (footprint %s, est. overhead %.1f%%%s)",
                 args.find_max_batch, name, fit.batch,
                 f"{fit.footprint.total:.0f} MB" if fit.footprint else "-", 100 * fit.overhead,
                 ", estimated" if fit.estimated else "")
    batches = {name: fit.batch for name, fit in fits.items()}
    batches["mirrored"] = max(batches["one-level"], batches["segments"])
    return batches


# ---------------------------------------------------------------------- train
def train_module(args, symbol, contexts, data_iter, size) -> Tuple[Optional[object], list, list]:
    module = from_args(args)(symbol, context=contexts)  # MirroredModule, or Module with --no-mirror
    module.bind([("data", (args.batch_size, 3, size, size))], [("softmax_label", (args.batch_size,))])
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": args.lr,
                                                             "momentum": 0.9, "wd": 1e-4})
    metric = mx.metric.create("ce")
    times, losses = [], []
    bar = progress(args.num_batches)
    for _ in range(args.num_batches):
        data, label = next(data_iter)
        tick = time.perf_counter()
        module.forward_backward(mx.io.DataBatch([data], [label]))
        module.update()
        metric.reset()
        module.update_metric(metric, [label])
        mx.nd.waitall()
        times.append(time.perf_counter() - tick)
        losses.append(metric.get()[1])
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update()
    bar.close()
    return getattr(module, "mirror_plan", None), times, losses


def train_gluon(args, contexts, data_iter) -> Tuple[Optional[object], list, list]:
    """An ordinary Gluon loop (gluoncv's): ``mirror(net)`` is the only added line."""
    from gluoncv.model_zoo import get_model

    net = get_model(args.network, pretrained=False, classes=args.classes)
    net.hybridize()
    if args.mirror:
        net = mirror(net, options=MirrorOptions.from_args(args))
    net.initialize(mx.init.Xavier(magnitude=2.0), ctx=contexts)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": args.lr, "momentum": 0.9, "wd": 1e-4})
    train_metric = mx.metric.Accuracy()
    times, losses = [], []
    bar = progress(args.num_batches)
    for _ in range(args.num_batches):
        data, label = next(data_iter)
        tick = time.perf_counter()
        parts = gluon.utils.split_and_load(data, contexts)
        labels = gluon.utils.split_and_load(label, contexts)
        with autograd.record():
            outputs = [net(x) for x in parts]
            per_sample = [loss_fn(yhat, y) for yhat, y in zip(outputs, labels)]
        autograd.backward(per_sample)
        trainer.step(data.shape[0])
        train_metric.update(labels, outputs)  # the real outputs: no extra forward
        value = sum(float(loss.sum().asscalar()) for loss in per_sample) / data.shape[0]
        mx.nd.waitall()
        times.append(time.perf_counter() - tick)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        bar.update()
    bar.close()
    log.info("training accuracy %.4f", train_metric.get()[1])
    state = mirror_state(net)
    return (state.last_plan if state is not None else None), times, losses


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size = args.image_size or default_image_size(args.network)
    contexts = [mx.gpu(int(i)) for i in args.gpus.split(",") if i.strip()] or [mx.cpu()]
    if args.find_max_batch:
        symbol, _ = gluon_symbol(args.network, classes=args.classes)
        return find_max_batch(args, symbol, size, contexts)
    data_iter = batches(args, size)
    if args.mode == "module":
        symbol, _ = gluon_symbol(args.network, classes=args.classes)
        plan, times, losses = train_module(args, symbol, contexts, data_iter, size)
    else:
        plan, times, losses = train_gluon(args, contexts, data_iter)
    steady = times[1:] or times  # the first iteration includes one-off setup
    throughput = args.batch_size * len(steady) / sum(steady)
    summary = {
        "network": args.network, "mode": args.mode, "batch_size": args.batch_size,
        "image_size": size, "mirror": args.mirror, "iterations": len(times),
        "samples_per_second": throughput, "final_loss": losses[-1],
        "baseline_mb": plan.baseline_mb if plan else None,
        "planned_mb": plan.planned_mb if plan else None,
    }
    log.info("summary: %s (%s, %s), batch %d, %.1f samples/s, loss %.3f%s", args.network,
             args.mode, "mirrored" if args.mirror else "plain", args.batch_size, throughput,
             losses[-1], f", memory plan {plan.baseline_mb:.0f} -> {plan.planned_mb:.0f} MB "
             f"({plan.ratio:.2f}x)" if plan else "")
    return summary


if __name__ == "__main__":
    main()
