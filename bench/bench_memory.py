#!/usr/bin/env python
"""Memory benchmark: baseline, the seed's search, MXNET_BACKWARD_DO_MIRROR=1, and ours.

Writes ``bench/RESULTS.md``.  Every figure is MXNet's own planned memory
(``Total N MB allocated``), measured on the CPU, where a bind plans the same
graph as a GPU bind without allocating it.  Run with ``make bench``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The memonger compat binds in the calling process unless told otherwise; this bench runs its
# search on many big networks, so its binds go to the recycled worker processes as before.
os.environ.setdefault("MXNET_MIRROR_HOOK_MEASURE", "worker")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from mxnet_mirror_hook import MirroredModule, memonger, plan_mirror  # noqa: E402
from mxnet_mirror_hook.testing.models import (default_image_size, gluon_symbol,  # noqa: E402
                                              last_output_lstm, preact_resnet_cifar, unet)
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph  # noqa: E402
from mxnet_mirror_hook.mx.convert import MIRROR_ATTR  # noqa: E402
from mxnet_mirror_hook.mx.measure import builtin_mirror_mb  # noqa: E402
from mxnet_mirror_hook.mx.timing import iteration_seconds  # noqa: E402
from bench.sections import sections_of  # noqa: E402

log = logging.getLogger("bench")

GLUON_MODELS = ["resnet50_v1b", "resnet152_v1b", "inceptionv3", "densenet121", "mobilenetv2_1.0"]


def with_cut_point_stages(symbol, shapes):
    """A copy of ``symbol`` with ``mirror_stage='True'`` on every cut point (what a careful
    memonger user would annotate by hand)."""
    graph = symbol_to_graph(symbol, normalize_inputs(list(shapes.items())))
    cuts = set(graph.cut_points())
    document = json.loads(symbol.tojson())
    for node in document["nodes"]:
        if node["name"] in cuts:
            node.setdefault("attrs", {})["__mirror_stage__"] = "True"
    return mx.sym.load_json(json.dumps(document))


BUDGETS = (("min", "min"), ("default", None), ("0.6", 0.6))


def seed_cut_symbol(symbol, shapes):
    """The seed's search with cut-point stages: the mirrored symbol it returns."""
    staged = with_cut_point_stages(symbol, shapes)
    return memonger.search_plan(staged, ctx=mx.cpu(), **shapes)


def bench_model(name, symbol, shapes):
    """Memory of every approach at one input shape, and our planning time per budget."""
    row = {"model": name, "shape": "x".join(map(str, shapes["data"]))}
    for key, budget in BUDGETS:
        started = time.perf_counter()
        try:
            plan = plan_mirror(symbol, list(shapes.items()), memory_budget=budget, cache_dir=False)
        except ValueError as error:  # an unreachable budget is a result too
            log.warning("%s at budget %s: %s", name, key, error)
            row[key] = None
            continue
        row[key] = {"mb": plan.planned_mb, "overhead": plan.overhead,
                    "planning_s": time.perf_counter() - started}
        row["baseline"] = plan.baseline_mb
    row["seed_raw"] = memonger.get_cost(memonger.search_plan(symbol, ctx=mx.cpu(), **shapes),
                                        ctx=mx.cpu(), **shapes)
    row["seed_cut"] = memonger.get_cost(seed_cut_symbol(symbol, shapes), ctx=mx.cpu(), **shapes)
    row["do_mirror"] = builtin_mirror_mb(symbol, mx.cpu(), shapes)
    log.info("%s", row)
    return row


def overhead_check(name, symbol, shapes, repeats=3):
    """Estimated against measured CPU overhead of our plans ('min' and 0.6) and the seed's.

    Plans are made for the (small) timing shapes; plain and mirrored executors
    are stepped in turn in one process.
    """
    plans = {}
    for key, budget in BUDGETS:
        if key == "default":
            continue
        try:
            plans[key] = plan_mirror(symbol, list(shapes.items()), memory_budget=budget,
                                     cache_dir=False)
        except ValueError as error:  # unreachable at this budget
            log.warning("%s at budget %s: %s", name, key, error)
    seed = seed_cut_symbol(symbol, shapes)
    graph = symbol_to_graph(symbol, normalize_inputs(list(shapes.items())))
    seed_mirrored = frozenset(name for name, attrs in seed.attr_dict().items()
                              if attrs.get(MIRROR_ATTR) == "True")
    from mxnet_mirror_hook.core.cost import recompute_overhead

    keys = list(plans)
    symbols = [symbol] + [plans[key].symbol for key in keys] + [seed]
    seconds = iteration_seconds(symbols, shapes, repeats=repeats)
    result = {"model": name, "shape": "x".join(map(str, shapes["data"])), "plain_s": seconds[0],
              "min": None, "0.6": None}
    for index, key in enumerate(keys, start=1):
        result[key] = {"estimated": plans[key].overhead, "measured": seconds[index] / seconds[0] - 1,
                       "mb": plans[key].planned_mb}
    result["seed"] = {"estimated": recompute_overhead(graph, seed_mirrored),
                      "measured": seconds[-1] / seconds[0] - 1}
    log.info("%s", result)
    return result


def cached_rebind_seconds(cache_dir):
    """Plan the deep ResNet once, then time plan + bind in a fresh process (cache hit)."""
    script = f"""
import time, json
t0 = time.perf_counter()
import mxnet as mx
from mxnet_mirror_hook import MirroredModule
from mxnet_mirror_hook.testing.models import preact_resnet_cifar
symbol = preact_resnet_cifar(1001)
t1 = time.perf_counter()
module = MirroredModule(symbol, cache_dir={cache_dir!r})
module.bind([('data', (64, 3, 32, 32))], [('softmax_label', (64,))])
t2 = time.perf_counter()
plain = mx.mod.Module(symbol)
plain.bind([('data', (64, 3, 32, 32))], [('softmax_label', (64,))])
t3 = time.perf_counter()
print(json.dumps({{"plan_s": module.mirror_plan.planning_seconds, "bind_s": t2 - t1,
                   "plain_bind_s": t3 - t2, "from_cache": module.mirror_plan.from_cache}}))
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    result = subprocess.run([sys.executable, "-c", script], check=True, env=env,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


LEAK_SCRIPT = """
import json, sys
import mxnet as mx
from mxnet_mirror_hook.mx.bind import planned_mb_in_process, resident_bytes
from mxnet_mirror_hook.mx.measure import planned_mb
x = mx.sym.var("data")
for i in range(4):
    x = mx.sym.Activation(mx.sym.FullyConnected(x, num_hidden=2048, name="fc%d" % i),
                          act_type="relu", name="relu%d" % i)
symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=10, name="out"), name="softmax")
measure = planned_mb_in_process if sys.argv[1] == "inprocess" else planned_mb
shapes = {"data": (32, 2048)}
measure(symbol, mx.cpu(), shapes)
before = resident_bytes()
for _ in range(12):
    measure(symbol, mx.cpu(), shapes)
print(json.dumps((resident_bytes() - before) / 2 ** 20))
"""


def bind_growth_mb():
    """Resident growth of the planning process over 12 binds: in-process vs worker processes."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    growth = {}
    for mode in ("inprocess", "worker"):
        result = subprocess.run([sys.executable, "-c", LEAK_SCRIPT, mode], check=True, env=env,
                                capture_output=True, text=True)
        growth[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return growth


def iteration_ratio(network="resnet50_v1b", batch=8, size=224, iterations=6):
    """CPU iteration time of MirroredModule training at each budget against plain Module,
    measured alternately in one run."""
    symbol, _ = gluon_symbol(network)
    rng = np.random.RandomState(0)
    batch_data = mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, (batch, 3, size, size)))],
                                 [mx.nd.array(rng.randint(0, 1000, batch))])
    modules = {}
    for label, module in [("plain", mx.mod.Module(symbol))] + [
            (key, MirroredModule(symbol, cache_dir=False, memory_budget=budget))
            for key, budget in BUDGETS if key != "default"]:
        module.bind([("data", (batch, 3, size, size))], [("softmax_label", (batch,))])
        module.init_params(mx.init.Xavier())
        module.init_optimizer(optimizer_params={"learning_rate": 0.01, "momentum": 0.9})
        for _ in range(2):  # warm-up (MKLDNN primitive creation)
            module.forward_backward(batch_data)
            module.update()
        mx.nd.waitall()
        modules[label] = module
    times = {label: [] for label in modules}
    for _ in range(iterations):
        for label, module in modules.items():
            tick = time.perf_counter()
            module.forward_backward(batch_data)
            module.update()
            mx.nd.waitall()
            times[label].append(time.perf_counter() - tick)
    plain = float(np.median(times["plain"]))
    return {"network": network, "batch": batch, "plain_s": plain, "iterations": iterations,
            "budgets": {label: {"s": float(np.median(times[label])),
                                "ratio": float(np.median(times[label])) / plain,
                                "estimated": modules[label].mirror_plan.overhead,
                                "mb": modules[label].mirror_plan.planned_mb,
                                "baseline_mb": modules[label].mirror_plan.baseline_mb}
                        for label in modules if label != "plain"}}


def _mb(entry):
    return "unreachable" if entry is None else f"{entry['mb']:.0f}"


def worker_startup_seconds():
    """Plan a tiny network once: starts the measuring and capturing worker processes, so
    the planning times below are per plan, not per process.  Returns that first plan's time."""
    data = mx.sym.var("data")
    body = mx.sym.Activation(mx.sym.Convolution(data, num_filter=8, kernel=(3, 3), pad=(1, 1),
                                                name="warm_conv"), act_type="relu", name="warm_relu")
    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(body, num_hidden=4, name="warm_fc"),
                                  name="softmax")
    started = time.perf_counter()
    plan_mirror(symbol, [("data", (2, 3, 16, 16))], cache_dir=False)
    return time.perf_counter() - started


def write_results(rows, checks, rebind, timing, growth, path, startup=None):
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `bench/bench_memory.py` on {datetime.date.today().isoformat()}, "
        f"MXNet {mx.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores. "
        "All memory figures are MXNet's own static plan for one training iteration "
        "(`Total N MB allocated`, intermediate storage for forward and backward, excluding "
        "weights and gradients), measured by a CPU bind.",
        "",
        "## Planned memory (MB), batch 32 for ImageNet models and the LSTM, 64 for the CIFAR "
        "ResNet, 16 for the U-Net",
        "",
        "| model | input | baseline | seed, raw symbol | `DO_MIRROR=1` | seed, cut-point stages "
        "| ours `'min'` | ours default | ours `0.6` (est. overhead) | min / baseline "
        "| min / seed cut-point | est. overhead at min | planning s (min / default / 0.6) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low = r["min"]
        point6 = r["0.6"]
        point6_text = (_mb(point6) if point6 is None
                       else f"{point6['mb']:.0f} ({point6['overhead']:.1%})")
        seconds = " / ".join("-" if r[k] is None else f"{r[k]['planning_s']:.1f}"
                             for k in ("min", "default", "0.6"))
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['baseline']:.0f} | {r['seed_raw']:.0f} | "
            f"{r['do_mirror']:.0f} | {r['seed_cut']:.0f} | **{_mb(low)}** | {_mb(r['default'])} | "
            f"{point6_text} | {low['mb'] / r['baseline']:.2f} | {low['mb'] / r['seed_cut']:.2f} | "
            f"{low['overhead']:.1%} | {seconds} |")
    lines += [
        "",
        "- *seed, raw symbol*: the seed's `search_plan` on the symbol as gluoncv makes it "
        "(no `mirror_stage` marks), as a new user would run it; above baseline means it made "
        "memory worse.",
        "- *`DO_MIRROR=1`*: MXNet's own `MXNET_BACKWARD_DO_MIRROR=1` (keeps convolutions, dense "
        "layers and concatenations, recomputes the rest). In MXNet 1.9 the gradient of a kept "
        "node reads the forward outputs of its inputs, so recomputing a ReLU that feeds a kept "
        "convolution frees nothing (NOTE [ what backward keeps ] in `core/liveness.py`).",
        "- *seed, cut-point stages*: the same search after marking every node that all "
        "paths from data to loss pass through (what a careful memonger user would mark by hand).",
        "- *ours*: `plan_mirror` with `memory_budget='min'`, `None` (the default: lowest memory "
        "within one extra forward pass; MXNet replays each mirrored node at most once, so every "
        "plan qualifies and it equals `'min'`) and `0.6` (the least estimated recomputation "
        "under 0.6 x baseline, from the least-compute dynamic program). For `'min'` and the "
        "default, candidates are ranked on the allocator model (MXNet's executed graph from one "
        "unmirrored bind, nnvm's allocator replayed; NOTE [ replaying MXNet's memory plan ]) and "
        "a search of a fixed number of evaluations (about 2 s here; the same plan on every "
        "machine) walks from the best; MXNet binds the searched plan and the two best "
        "candidates and its figure decides. Graphs over 2000 operators (the LSTM, the "
        "1001-layer ResNet) bind every candidate instead.",
        "- *est. overhead*: the cost model's extra compute as a fraction of one plain training "
        "iteration (one extra forward pass is about 33%).",
        "- *planning s*: planning time of `plan_mirror` (cache disabled) in a process whose "
        "worker processes (two measuring, one capturing the executed graph) are already "
        "running; starting them is a one-time cost per process"
        + (f" (this run: the first plan, of a tiny network, took {startup:.1f} s)."
           if startup is not None else "."),
        "",
        "## Cost model against measured CPU time",
        "",
        "Plans made for these (smaller) inputs; plain, ours at `'min'`, ours at `0.6` and the "
        f"seed's (cut-point stages) executors stepped in turn in one process, medians of "
        f"{checks[0]['repeats'] if checks else 0} rounds after 2 warm-up rounds. Overhead = "
        "extra time of a forward+backward iteration over the plain one.",
        "",
        "| model | input | plain s/iter | ours min: est. / measured | ours 0.6: est. / measured "
        "| seed cut-point: est. / measured |",
        "|---|---|---:|---:|---:|---:|",
    ]
    errors = []
    gaps = []
    for c in checks:
        cells = []
        for key in ("min", "0.6", "seed"):
            if c[key] is None:
                cells.append("unreachable")
                continue
            cells.append(f"{c[key]['estimated']:.1%} / {c[key]['measured']:.1%}")
            errors.append(c[key]["measured"] - c[key]["estimated"])
            gaps.append((abs(errors[-1]), errors[-1], c["model"], key))
        lines.append(f"| {c['model']} | {c['shape']} | {c['plain_s']:.3f} | " + " | ".join(cells) + " |")
    if errors:
        mean_abs = sum(abs(e) for e in errors) / len(errors)
        lines += ["", f"Measured minus estimated overhead over the {len(errors)} plans: mean "
                  f"{sum(errors) / len(errors):+.1%}, mean absolute {mean_abs:.1%}; largest gaps: "
                  + ", ".join(f"{model} at {key} ({gap:+.1%})"
                              for _, gap, model, key in sorted(gaps, reverse=True)[:3])
                  + ". The model counts operations, not time; single timings on this shared "
                  "2-core machine vary by a few percent."]
    lines += [
        "",
        "## Training iteration time at each budget (MirroredModule against Module)",
        "",
        f"{timing['network']}, batch {timing['batch']}, CPU: plain Module and MirroredModule at "
        f"each budget trained (forward, backward, SGD update) in turn in one process; medians of "
        f"{timing['iterations']} iterations after two warm-up iterations. Plain: "
        f"{timing['plain_s']:.3f} s/iter.",
        "",
        "| budget | planned MB (baseline) | est. overhead | s/iter | measured / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, entry in timing["budgets"].items():
        lines.append(f"| {label} | {entry['mb']:.0f} ({entry['baseline_mb']:.0f}) | "
                     f"{entry['estimated']:.1%} | {entry['s']:.3f} | {entry['ratio']:.2f} |")
    lines += [
        "",
        "## Cached re-bind in a new process (1001-layer CIFAR ResNet, batch 64)",
        "",
        f"`plan_mirror` from the disk cache: **{rebind['plan_s']:.2f} s** (from cache: "
        f"{rebind['from_cache']}). The whole `MirroredModule.bind` took {rebind['bind_s']:.2f} s, "
        f"of which most is MXNet creating the executor: a plain `Module.bind` of the same network "
        f"in the same process took {rebind['plain_bind_s']:.2f} s.",
        "",
        "## Resident memory of the planning process over 12 binds",
        "",
        "An MLP with 64 MB of weights (4 x 2048 dense layers, batch 32), bound 12 times after one "
        "warm-up bind, each executor deleted and `gc.collect()` run after it:",
        "",
        "| where the binds run | growth of the planning process |",
        "|---|---:|",
        f"| in the planning process (`MXNET_MIRROR_HOOK_MEASURE=inprocess`) | "
        f"{growth['inprocess']:.0f} MB |",
        f"| in recycled worker processes (default) | {growth['worker']:.0f} MB |",
        "",
        "MXNet 1.9.1 keeps native memory per bind that no Python-side release frees; how much "
        "varies with the machine's state (50-80 MB per bind usually, much less in rare runs).",
        "",
    ]
    # Sections other bench scripts own (bench/sections.py) are kept as they are.
    kept = sections_of(open(path, encoding="utf-8").read()) if os.path.exists(path) else []
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines).rstrip("\n") + "\n")
        for section in kept:
            handle.write("\n" + section)


MODELS = GLUON_MODELS + ["preact_resnet1001", "lstm_2x512_t100", "unet"]


def model_and_shapes(name, batch=None):
    """A bench model and its input shapes (``batch`` overrides the default batch)."""
    if name == "preact_resnet1001":
        return preact_resnet_cifar(1001), {"data": (batch or 64, 3, 32, 32)}
    if name == "lstm_2x512_t100":
        return last_output_lstm(), {"data": (batch or 32, 100, 512)}
    if name == "unet":
        b = batch or 16
        return unet(), {"data": (b, 3, 256, 256), "softmax_label": (b, 256, 256)}
    size = default_image_size(name)
    return gluon_symbol(name)[0], {"data": (batch or 32, 3, size, size)}


#: Batch sizes for the CPU timing runs (small enough for a 2-core machine).
TIMING_BATCH = {"preact_resnet1001": 8, "lstm_2x512_t100": 32, "unet": 2}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--timing-models", nargs="*", default=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mxnet_mirror_hook").setLevel(logging.WARNING)
    logging.getLogger("mxnet_mirror_hook.core.planners.auto").setLevel(logging.INFO)
    startup = worker_startup_seconds()
    rows = [bench_model(name, *model_and_shapes(name)) for name in args.models]
    checks = []
    for name in args.timing_models:
        check = overhead_check(name, *model_and_shapes(name, TIMING_BATCH.get(name, 4)),
                               repeats=args.repeats)
        check["repeats"] = args.repeats
        checks.append(check)
    timing = iteration_ratio()
    with tempfile.TemporaryDirectory() as cache_dir:
        rebind = cached_rebind_seconds(cache_dir)
    growth = bind_growth_mb()
    write_results(rows, checks, rebind, timing, growth, args.output, startup)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
