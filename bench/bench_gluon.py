#!/usr/bin/env python
"""Gluon benchmark: ``mirror(net)`` against plain hybridized Gluon.

For each network: MXNet's planned memory (``Total N MB allocated``, measured on
the CPU) of the executor a mirrored block binds at batch 32, against the same
executor unmirrored; and the CPU time of one Gluon training step
(``autograd.record`` forward + loss, ``autograd.backward``, ``Trainer.step``)
mirrored against plain hybridized Gluon, both in this process, interleaved
step by step, at a small batch.  A sequence row (``--sequence``, on by default)
does the same for an unrolled 2x512 LSTM HybridBlock with four arms: plain
hybridized Gluon, ``mirror(net)`` (one level), ``mirror(net,
backend='segments')`` (executor segments) and ``mirror(net, planner='none')``
(the path alone), in a child process started with
``MXNET_EXEC_INPLACE_GRAD_SUM_CAP=2`` as ``bench/bench_segments.py`` does.
Writes the section between ``<!-- gluon:begin -->`` and ``<!-- gluon:end -->``
of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

from mxnet_mirror_hook.gluon import mirror, mirror_state, plan_block  # noqa: E402
from mxnet_mirror_hook.testing.models import default_image_size  # noqa: E402

log = logging.getLogger("bench_gluon")

BEGIN, END = "<!-- gluon:begin -->", "<!-- gluon:end -->"
NETWORKS = ["resnet50_v1b", "inceptionv3"]
CAP_ENV = "MXNET_EXEC_INPLACE_GRAD_SUM_CAP"
#: The sequence row: layers, hidden units, steps, classes (bench_segments' "bench LSTM").
LSTM_SHAPE = (2, 512, 100, 1000)


class UnrolledLSTM(gluon.HybridBlock):
    """``layers`` LSTM cells unrolled ``steps`` steps over (batch, steps, features), classified
    from the last output: bench_segments' bench LSTM as a Gluon HybridBlock."""

    def __init__(self, layers: int, hidden: int, steps: int, classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        with self.name_scope():
            self.stack = gluon.rnn.HybridSequentialRNNCell()
            for _ in range(layers):
                self.stack.add(gluon.rnn.LSTMCell(hidden, input_size=hidden))
            self.fc = gluon.nn.Dense(classes, in_units=hidden)

    def hybrid_forward(self, F, x):
        outputs, _ = self.stack.unroll(self.steps, x, layout="NTC", merge_outputs=False)
        return self.fc(outputs[-1])


def _net(name: str, classes: int, params: str = None) -> gluon.HybridBlock:
    from gluoncv.model_zoo import get_model

    net = get_model(name, pretrained=False, classes=classes)
    if params:
        net.load_parameters(params)
    else:
        net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize(static_alloc=True)
    return net


def _step(net, trainer, loss_fn, data, label) -> float:
    tick = time.perf_counter()
    with autograd.record():
        loss = loss_fn(net(data), label)
    autograd.backward([loss])
    trainer.step(data.shape[0])
    mx.nd.waitall()  # timing only: the loop itself needs no wait
    return time.perf_counter() - tick


def bench_network(name: str, args, workdir: str) -> dict:
    size = default_image_size(name)
    classes = 1000
    log.info("%s: planning at batch %d", name, args.plan_batch)
    planning = _net(name, classes)
    planning(mx.nd.zeros((1, 3, size, size)))
    plan = plan_block(planning, (args.plan_batch, 3, size, size), cache_dir=args.cache_dir)
    path = os.path.join(workdir, f"{name}.params")
    planning.save_parameters(path)

    plain = _net(name, classes, path)
    mirrored = mirror(_net(name, classes, path), cache_dir=args.cache_dir)
    # the same Gluon path through an executor that recomputes nothing: the path's own cost
    unplanned = mirror(_net(name, classes, path), cache_dir=args.cache_dir, planner="none")
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    optimizer = {"learning_rate": 0.01, "momentum": 0.9, "wd": 1e-4}
    trainers = {id(net): gluon.Trainer(net.collect_params(), "sgd", optimizer)
                for net in (plain, mirrored, unplanned)}
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.uniform(-1, 1, (args.time_batch, 3, size, size)))
    label = mx.nd.array(rng.randint(0, classes, args.time_batch))
    times = {"plain": [], "mirrored": [], "unplanned": []}
    arms = [("plain", plain), ("mirrored", mirrored), ("unplanned", unplanned)]
    for i in range(args.warmup + args.steps):
        order = arms[i % 3:] + arms[:i % 3]  # rotate which runs first
        for key, net in order:
            seconds = _step(net, trainers[id(net)], loss_fn, data, label)
            if i >= args.warmup:
                times[key].append(seconds)
    small_plan = mirror_state(mirrored).last_plan
    ratios = [m / p for m, p in zip(times["mirrored"], times["plain"])]
    path_ratios = [u / p for u, p in zip(times["unplanned"], times["plain"])]
    return {
        "network": name, "size": size, "baseline_mb": plan.baseline_mb, "planned_mb": plan.planned_mb,
        "mirrored": len(plan.mirrored), "overhead": plan.overhead,
        "plain_s": statistics.median(times["plain"]), "mirrored_s": statistics.median(times["mirrored"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "unplanned_s": statistics.median(times["unplanned"]), "path_ratio": statistics.median(path_ratios),
        "small_baseline_mb": small_plan.baseline_mb, "small_planned_mb": small_plan.planned_mb,
    }


def bench_sequence(args) -> dict:
    """The LSTM row: plans at ``--sequence-batch`` and interleaved step times (child process)."""
    layers, hidden, steps, classes = LSTM_SHAPE
    shape = (args.sequence_batch, steps, hidden)
    with tempfile.TemporaryDirectory() as workdir:
        cache = os.path.join(workdir, "cache")
        mx.random.seed(0)
        source = UnrolledLSTM(*LSTM_SHAPE)
        source.initialize(mx.init.Xavier())
        path = os.path.join(workdir, "lstm.params")
        source.save_parameters(path)
        nets = {}
        arms = (("plain", None, None), ("mirror", "mirror", None), ("segments", "segments", None),
                ("unplanned", "mirror", "none"))
        for arm, backend, planner in arms:
            net = UnrolledLSTM(*LSTM_SHAPE)
            net.load_parameters(path)
            net.hybridize(static_alloc=True)
            if backend:
                mirror(net, cache_dir=cache, backend=backend, planner=planner)
            nets[arm] = net
        log.info("LSTM: planning one level at batch %d", shape[0])
        one_level = plan_block(nets["mirror"], shape)  # worker processes, started without the cap
        # NOTE [ the gradient-sum cap is read once per process ] (mx/segments.py): set before this
        # process builds any gradient graph, so every arm (plain included) runs with it.
        os.environ[CAP_ENV] = "2"
        log.info("LSTM: planning segments at batch %d", shape[0])
        segments = plan_block(nets["segments"], shape)
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        trainers = {arm: gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
                    for arm, net in nets.items()}
        rng = np.random.RandomState(0)
        data = mx.nd.array(rng.uniform(-1, 1, shape))
        label = mx.nd.array(rng.randint(0, classes, shape[0]))
        times = {arm: [] for arm in nets}
        order = list(nets)
        for i in range(args.warmup + args.sequence_steps):
            for arm in order[i % len(order):] + order[:i % len(order)]:
                seconds = _step(nets[arm], trainers[arm], loss_fn, data, label)
                if i >= args.warmup:
                    times[arm].append(seconds)
        used = mirror_state(nets["segments"]).last_plan
    ratios = {arm: [t / p for t, p in zip(times[arm], times["plain"])]
              for arm in ("mirror", "segments", "unplanned")}
    return {"description": f"LSTM {layers}x{hidden}, {steps} steps, last output, {classes} classes",
            "batch": shape[0], "baseline_mb": one_level.baseline_mb, "mirror_mb": one_level.planned_mb,
            "segments_mb": segments.planned_mb, "segment_count": segments.segment_count,
            "segments_backend": used.backend, "used_count": used.segment_count,
            "plain_s": statistics.median(times["plain"]),
            "mirror_ratio": statistics.median(ratios["mirror"]),
            "segments_ratio": statistics.median(ratios["segments"]),
            "segments_min": min(ratios["segments"]), "segments_max": max(ratios["segments"]),
            "path_ratio": statistics.median(ratios["unplanned"]),
            "steps": args.sequence_steps}


def _sequence_row(args) -> dict:
    """:func:`bench_sequence` in a child process (the cap must be set before any graph is built)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(CAP_ENV, None)
    command = [sys.executable, os.path.abspath(__file__), "--sequence-child",
               "--sequence-batch", str(args.sequence_batch), "--sequence-steps",
               str(args.sequence_steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(rows, args, sequence=None) -> str:
    lines = [
        BEGIN,
        "## Gluon: `mirror(net)` against plain hybridized Gluon",
        "",
        f"Generated by `bench/bench_gluon.py` on {datetime.date.today()} ({platform.machine()}, "
        f"MXNet {mx.__version__}, {os.cpu_count()} CPUs shared with other jobs). Memory: MXNet's planned "
        f"MB (`debug_str`, CPU-measured) of the executor a mirrored block binds at batch "
        f"{args.plan_batch} (its outputs' head gradient comes from autograd; no loss in the graph), "
        f"mirrored vs the same executor unmirrored. Time: one Gluon training step (record, loss, "
        f"`autograd.backward`, `Trainer.step`, then `waitall` for the clock) at batch {args.time_batch}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, three arms interleaved step by step in "
        f"one process (rotating which runs first): plain hybridized Gluon, `mirror(net)`, and "
        f"`mirror(net, planner='none')` (the same Gluon-to-executor path recomputing nothing: the path's "
        f"own cost); ratios are medians of per-step ratios to plain (min-max for the mirrored one).",
        "",
        f"| network (input) | unmirrored MB, batch {args.plan_batch} | mirrored MB | ratio | "
        f"recomputed nodes | est. overhead | plain s/step, batch {args.time_batch} | mirrored s/step | "
        f"time ratio (min-max) | path only, no recompute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} ({r['size']}x{r['size']}) | {r['baseline_mb']:.0f} | {r['planned_mb']:.0f} | "
            f"{r['planned_mb'] / r['baseline_mb']:.2f} | {r['mirrored']} | {r['overhead']:.0%} | "
            f"{r['plain_s']:.2f} | {r['mirrored_s']:.2f} | {r['ratio']:.2f}x "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['path_ratio']:.2f}x |")
    if sequence is not None:
        r = sequence
        lines += [
            "",
            f"Executor segments behind `mirror(net, backend='segments')`: the unrolled {r['description']} "
            f"as a Gluon HybridBlock (`gluon.rnn.LSTMCell` x2, `unroll`), batch {r['batch']}, plans and "
            f"time at that batch, in a child process with `{CAP_ENV}=2` (as `bench/bench_segments.py`; "
            f"one-level plans are made in worker processes without it); time: median of {r['steps']} "
            f"steps after {args.warmup} warm-up, four arms interleaved (plain hybridized Gluon, "
            f"`mirror(net)`, `mirror(net, backend='segments')`, `mirror(net, planner='none')`: the "
            f"path only), ratios are medians of per-step ratios to plain.",
            "",
            f"| network (batch {r['batch']}) | unmirrored MB | one-level MB | segments MB (k) | "
            f"plain s/step | one-level time | segments time (min-max) | path only, no recompute |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {r['description']} | {r['baseline_mb']:.0f} | {r['mirror_mb']:.0f} "
            f"({r['mirror_mb'] / r['baseline_mb']:.2f}x) | {r['segments_mb']:.0f} "
            f"({r['segments_mb'] / r['baseline_mb']:.2f}x, {r['segment_count']}) | {r['plain_s']:.2f} | "
            f"{r['mirror_ratio']:.2f}x | {r['segments_ratio']:.2f}x "
            f"({r['segments_min']:.2f}-{r['segments_max']:.2f}) | {r['path_ratio']:.2f}x |",
        ]
    lines += [
        "",
        "The time ratio includes what the Gluon path adds to the executor's recomputation (the "
        "last column alone): copying the inputs into the executor and its outputs out, and "
        "waiting (on the main thread) for autograd to "
        "reach the block's outputs before the executor's backward is pushed. At the timing batch the "
        "plans were " + ", ".join(
            f"{r['network']} {r['small_baseline_mb']:.0f} -> {r['small_planned_mb']:.0f} MB" for r in rows)
        + ".",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(section: str, path: str) -> None:
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as handle:
        handle.write(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=NETWORKS)
    parser.add_argument("--plan-batch", type=int, default=32)
    parser.add_argument("--time-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--no-sequence", dest="sequence", action="store_false",
                        help="skip the LSTM row (one-level vs executor segments)")
    parser.add_argument("--sequence-batch", type=int, default=32)
    parser.add_argument("--sequence-steps", type=int, default=5)
    parser.add_argument("--sequence-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.sequence_child:
        print(json.dumps(bench_sequence(args)))
        return
    sequence = _sequence_row(args) if args.sequence else None
    with tempfile.TemporaryDirectory() as workdir:
        rows = [bench_network(name, args, workdir) for name in args.networks]
    section = render(rows, args, sequence)
    write_section(section, args.output)
    log.info("wrote %s:\n%s", args.output, section)


if __name__ == "__main__":
    main()
