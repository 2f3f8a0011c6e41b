#!/usr/bin/env python
"""Planning latency: cold (fresh process, cache disabled, worker start included), warm, cache hit.

Writes the ``latency`` section of ``bench/RESULTS.md``.  Each network is
planned in a fresh Python process, so the cold figure includes starting the
measuring worker processes (and their MXNet import).  The machine is shared:
read the figures as this machine's, not as a promise.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

log = logging.getLogger("bench.latency")

CLASSIFIERS = ["resnet50_v1b", "resnet152_v1b", "inceptionv3", "densenet121", "mobilenetv2_1.0"]
BUCKETS = [10, 20, 30, 40, 50, 60]


def build(name):
    """Symbol and input shapes of a bench network, or the list of bucket symbols."""
    import mxnet as mx

    from mxnet_mirror_hook.testing.models import default_image_size, gluon_symbol, lstm_language_model

    if name == "mnist_mlp":
        data = mx.sym.Variable("data")
        net = mx.sym.FullyConnected(mx.sym.Flatten(data), num_hidden=128, name="fc1")
        net = mx.sym.Activation(net, act_type="relu")
        net = mx.sym.FullyConnected(net, num_hidden=64, name="fc2")
        net = mx.sym.Activation(net, act_type="relu")
        net = mx.sym.FullyConnected(net, num_hidden=10, name="fc3")
        return [(mx.sym.SoftmaxOutput(net, name="softmax"), {"data": (100, 1, 28, 28)})]
    if name == "lstm_buckets":
        return [(lstm_language_model(length), {"data": (32, length), "softmax_label": (32, length)})
                for length in BUCKETS]
    size = default_image_size(name)
    return [(gluon_symbol(name)[0], {"data": (32, 3, size, size)})]


def _print_row(name, cold, warm, cached, plans, again):
    """The JSON row a ``--one`` child prints (its last line)."""
    print(json.dumps({"name": name, "cold": cold, "warm": warm, "cached": cached,
                      "baseline_mb": [p.baseline_mb for p in plans],
                      "planned_mb": [p.planned_mb for p in plans],
                      "same_plan_twice": all(a.mirrored == b.mirrored for a, b in zip(plans, again))}))


def one(name):
    """Runs in a fresh process: cold, warm and cached planning of ``name``; prints JSON."""
    from mxnet_mirror_hook import cache, plan_mirror

    jobs = build(name)

    def plan_all(cache_dir):
        cache._CACHES.clear()  # no plan from the in-memory cache either
        started = time.perf_counter()
        plans = [plan_mirror(symbol, [(k, v) for k, v in shapes.items() if k == "data"],
                             [(k, v) for k, v in shapes.items() if k != "data"] or None,
                             cache_dir=cache_dir) for symbol, shapes in jobs]
        return time.perf_counter() - started, plans

    cold, plans = plan_all(False)
    warm, again = plan_all(False)
    with tempfile.TemporaryDirectory() as directory:
        plan_all(directory)
        cache._CACHES.clear()
        started = time.perf_counter()
        for symbol, shapes in jobs:
            plan_mirror(symbol, [(k, v) for k, v in shapes.items() if k == "data"],
                        [(k, v) for k, v in shapes.items() if k != "data"] or None,
                        cache_dir=directory)
        cached = time.perf_counter() - started
    _print_row(name, cold, warm, cached, plans, again)


def one_fit(name):
    """Runs in a fresh process: the six buckets as ``MirroredBucketingModule.fit`` plans them
    (the default bucket at bind, the others up front with ``prepare_buckets``); prints JSON."""
    import mxnet as mx

    from mxnet_mirror_hook import cache
    from mxnet_mirror_hook.bucketing import MirroredBucketingModule
    from mxnet_mirror_hook.testing.models import lstm_language_model

    default = BUCKETS[-1]
    data = [("data", (32, default))]
    labels = [("softmax_label", (32, default))]

    def sym_gen(key):
        return lstm_language_model(key), ("data",), ("softmax_label",)

    def plan_all(cache_dir):
        cache._CACHES.clear()
        started = time.perf_counter()
        module = MirroredBucketingModule(sym_gen, default_bucket_key=default, context=mx.cpu(),
                                         cache_dir=cache_dir)
        module.bind(data, labels)
        plans = module.prepare_buckets(BUCKETS, data, labels)
        return time.perf_counter() - started, [plans[key] for key in BUCKETS]

    cold, plans = plan_all(False)
    warm, again = plan_all(False)
    with tempfile.TemporaryDirectory() as directory:
        plan_all(directory)
        cached, _ = plan_all(directory)
    _print_row(name, cold, warm, cached, plans, again)


def measure(name):
    output = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def one_min_auto(name):
    """Runs in a fresh process: one cold plan of ``name`` under ``memory_budget='min'``,
    ``backend='auto'`` (cache off, workers started by it); prints JSON."""
    import mxnet_mirror_hook
    from mxnet_mirror_hook import plan_mirror

    jobs = build(name)
    started = time.perf_counter()
    plans = [plan_mirror(symbol, [(k, v) for k, v in shapes.items() if k == "data"],
                         [(k, v) for k, v in shapes.items() if k != "data"] or None,
                         cache_dir=False, memory_budget="min", backend="auto") for symbol, shapes in jobs]
    print(json.dumps({"name": name, "cold": time.perf_counter() - started,
                      "planned_mb": [p.planned_mb for p in plans], "backend": [p.backend for p in plans],
                      "plans": [plan_digest(p) for p in plans], "workers": _worker_stats(),
                      "package": os.path.dirname(mxnet_mirror_hook.__file__)}))


def _worker_stats():
    """The measuring workers' processes, requests and CPU seconds (None in a checkout without them)."""
    from mxnet_mirror_hook.mx import worker

    return worker.worker_stats() if hasattr(worker, "worker_stats") else None


def plan_digest(plan):
    """What makes two plans the same: planned MB, backend, the mirrored nodes and the segment plan
    (cuts, per-segment mirrored nodes, match ranges...), hashed."""
    segments = plan.segment_plan.to_dict() if plan.segment_plan is not None else None
    text = json.dumps([plan.planned_mb, plan.backend, sorted(plan.mirrored), segments], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure_min_auto(name, root):
    """:func:`one_min_auto` in a fresh process, importing the package from ``root``."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, os.path.abspath(__file__), "--one-min-auto", name, "--root", root]
    used = _children_cpu()
    load = os.getloadavg()[0]
    output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root, env=env).stdout
    # CPU seconds of the planning process and its measuring workers (waited for at its exit):
    # the work, which other processes on a shared machine do not inflate as they do the wall time.
    return dict(json.loads(output.strip().splitlines()[-1]), cpu=_children_cpu() - used,
                load=[load, os.getloadavg()[0]])


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_min_auto(rows, path, before_label, note="", after_label="this checkout"):
    """The ``latency-min-auto`` section: cold seconds and planned MB, before and after."""
    from bench.sections import replace_section

    lines = ["## Planning time under `memory_budget='min'`, `backend='auto'` (issue 22, item 5)", "",
             f"Generated by `bench/bench_latency.py --min-auto` on {datetime.date.today().isoformat()}, "
             f"{os.cpu_count()} CPU cores shared with other work (the load was not ours alone: see "
             "*load*). Each cell: one cold `plan_mirror` in a fresh process (cache off, "
             "worker processes started by it), *before* and *after* run one after the other per network; "
             "*CPU s*: CPU seconds of the planning process and its measuring workers together (the work, "
             "which the load does not inflate as it does wall seconds). "
             f"*before*: {before_label}; *after*: {after_label}. *same plans*: every plan's MB, backend, "
             "mirrored nodes and segment plan (cuts, per-segment mirrored nodes, match ranges) hashed "
             "alike before and after; *load*: the one-minute load average when the before and after "
             "runs started; *binds after*: requests the measuring workers answered (binds and captures) "
             "and their CPU seconds.", "",
             "| network | before s | after s | before CPU s | after CPU s | after / before (CPU) | "
             "before MB | after MB | backend after | same plans | load | binds after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for row in rows:
        old, new = row["before"], row["after"]
        old_mb, new_mb = ("+".join(f"{v:.0f}" for v in r["planned_mb"]) for r in (old, new))
        cpu = (f"{old['cpu']:.1f} | {new['cpu']:.1f} | {new['cpu'] / old['cpu']:.2f}"
               if "cpu" in old and "cpu" in new else "- | - | -")
        same = str(old["plans"] == new["plans"]) if "plans" in old and "plans" in new else "-"
        load = "/".join(f"{r['load'][0]:.1f}" for r in (old, new)) if "load" in old and "load" in new else "-"
        workers = list((new.get("workers") or {}).values())
        binds = (f"{sum(w['answered'] for w in workers)} ({sum(w['cpu_seconds'] for w in workers):.1f} s)"
                 if workers else "-")
        lines.append(f"| {row['name']} | {old['cold']:.1f} | {new['cold']:.1f} | {cpu} | {old_mb} | "
                     f"{new_mb} | {'/'.join(sorted(set(new['backend'])))} | {same} | {load} | {binds} |")
    if note:
        lines += ["", note]
    replace_section(path, "latency-min-auto", "\n".join(lines))


def write(rows, path, label, before=None, before_label=""):
    from bench.sections import replace_section

    earlier = {row["name"]: row for row in before or []}

    lines = [
        "## Planning latency",
        "",
        f"Generated by `bench/bench_latency.py` on {datetime.date.today().isoformat()} ({label}), "
        f"{os.cpu_count()} CPU cores shared with other work. *cold*: the first `plan_mirror` in a "
        "fresh process with the cache disabled, worker processes started by it; *warm*: the same "
        "again in that process (workers running, cache disabled); *cached*: a plan read from the "
        "disk cache. Seconds; the LSTM row is the six buckets of MXNet's `lstm_bucketing.py` "
        "(lengths 10-60, 2x200 LSTM, vocabulary 10000, batch 32) planned one after the other by "
        "`plan_mirror`; *lstm_buckets_fit* is the same six as `MirroredBucketingModule.fit` plans them: "
        "the default bucket (60) at `bind`, the others up front with `prepare_buckets` (two at a "
        "time), before the first batch.",
        "",
        f"Columns marked *before* were measured right before, in the same conditions, on "
        f"{before_label}." if before else "",
        "",
        "| network | cold s | warm s | cached s | baseline MB | planned MB | same plan twice |"
        + (" before: cold s | before: warm s | before: planned MB | before: same plan twice |"
           if before else ""),
        "|---|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|---|" if before else ""),
    ]
    for row in rows:
        base = "+".join(f"{v:.0f}" for v in row["baseline_mb"])
        planned = "+".join(f"{v:.0f}" for v in row["planned_mb"])
        line = (f"| {row['name']} | {row['cold']:.2f} | {row['warm']:.2f} | "
                f"{row['cached']:.3f} | {base} | {planned} | {row['same_plan_twice']} |")
        old = earlier.get(row["name"])
        if old is not None:
            line += (f" {old['cold']:.2f} | {old['warm']:.2f} | "
                     f"{'+'.join(f'{v:.0f}' for v in old['planned_mb'])} | {old['same_plan_twice']} |")
        elif before:
            line += " - | - | - | - |"
        lines.append(line)
    colds = sorted(r["cold"] for r in rows if r["name"] in CLASSIFIERS)
    if colds:
        lines += ["", f"Classification networks, cold: median {colds[len(colds) // 2]:.2f} s, "
                      f"largest {colds[-1]:.2f} s."]
    replace_section(path, "latency", "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--networks", nargs="*", default=CLASSIFIERS + ["mnist_mlp", "lstm_buckets",
                                                                   "lstm_buckets_fit"])
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--before", help="rows of an earlier run (--json) to show beside these")
    parser.add_argument("--before-label", default="the previous main")
    parser.add_argument("--min-auto", action="store_true",
                        help="cold 'min' + 'auto' planning, this checkout against --before-root")
    parser.add_argument("--before-root", help="a checkout of the code to compare with (--min-auto)")
    parser.add_argument("--after-root", default=ROOT, help="the checkout measured as after (--min-auto)")
    parser.add_argument("--after-label", default="this checkout", help="what --after-root holds (--min-auto)")
    parser.add_argument("--note", default="", help="a paragraph under the table (--min-auto)")
    parser.add_argument("--one-min-auto", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one or args.one_min_auto:
        logging.basicConfig(level=logging.WARNING)
        if args.one_min_auto:
            sys.path.insert(0, args.root)
            one_min_auto(args.one_min_auto)
        else:
            (one_fit if args.one == "lstm_buckets_fit" else one)(args.one)
        return
    if args.min_auto:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        rows = json.load(open(args.json, encoding="utf-8")) if args.json and os.path.exists(args.json) else []
        for name in args.networks:
            if name in {row["name"] for row in rows} or name == "lstm_buckets_fit":
                continue
            rows.append({"name": name, "before": measure_min_auto(name, args.before_root),
                         "after": measure_min_auto(name, args.after_root)})
            log.info("%s", rows[-1])
            if args.json:
                with open(args.json, "w", encoding="utf-8") as handle:
                    json.dump(rows, handle, indent=1)
        write_min_auto(rows, args.output, args.before_label, args.note, args.after_label)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for name in args.networks:
        rows.append(measure(name))
        log.info("%s", rows[-1])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    before = json.load(open(args.before, encoding="utf-8")) if args.before else None
    write(rows, args.output, args.label, before, args.before_label)


if __name__ == "__main__":
    main()
