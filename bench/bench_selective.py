#!/usr/bin/env python
"""Selective segment plans under ``max_overhead`` (issue 22): the targets table.

For each target network: MXNet's planned MB of the plain symbol, the selective plan under the
target's ``max_overhead`` (static MB as NOTE [ static memory of a segment plan ] counts it, kept
pools included; the dynamic program's estimated overhead; planning seconds), a frontier of
``max_overhead`` values (static MB), and for BERT the hand-made Megatron cut set (core attention
re-run, everything else kept) measured the same way.  Time: a training iteration (forward,
backward, SGD update) of ``MirroredModule(max_overhead=...)`` against plain ``Module`` in one
process, interleaved rounds, median (``--iterations``), at the smaller timing size of each row.

Writes the section between ``<!-- selective:begin -->`` and ``<!-- selective:end -->`` of
``bench/RESULTS.md``.  Run ``nice -n 10 python bench/bench_selective.py`` (one heavy process).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_segments import _interleaved_seconds  # noqa: E402
from bench.sections import replace_section  # noqa: E402
from mxnet_mirror_hook import MirroredModule, plan_mirror  # noqa: E402
from mxnet_mirror_hook.options import MirrorOptions  # noqa: E402

log = logging.getLogger("bench_selective")

#: case -> (description, target ratio, target overhead, dropout)
CASES = {
    "bert_base": ("BERT-base MLM (`bert_mlm`), seq 512, batch 8, no dropout", 0.5, 0.05, 0.0),
    "bert_base_dropout": ("the same with dropout 0.1 (`recompute_dropout=True`)", 0.5, 0.08, 0.1),
    "resnet50_v1b": ("resnet50_v1b, batch 32", 0.6, 0.06, 0.0),
}
FRONTIER = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


def _network(case: str, timing: bool = False):
    """(symbol, data shapes, label shapes) at the plan size, or at the timing size."""
    from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes, gluon_symbol

    if case.startswith("bert"):
        seq = 128 if timing else 512
        symbol = bert_mlm(seq_len=seq, dropout=CASES[case][3])
        return (symbol,) + tuple(bert_mlm_shapes(8, seq))
    batch = 8 if timing else 32
    symbol, _ = gluon_symbol(case)
    return symbol, [("data", (batch, 3, 224, 224))], [("softmax_label", (batch,))]


def _options(case: str, overhead: float) -> MirrorOptions:
    return MirrorOptions(max_overhead=overhead, backend="segments", cache_dir=False,
                         recompute_dropout=CASES[case][3] > 0)


def plan_row(case: str) -> dict:
    """Static figures: the target plan, the frontier and (BERT) the Megatron cut set."""
    symbol, data, labels = _network(case)
    started = time.perf_counter()
    plan = plan_mirror(symbol, data, labels, options=_options(case, CASES[case][2]))
    seconds = time.perf_counter() - started
    row = {"case": case, "baseline_mb": plan.baseline_mb, "planned_mb": plan.planned_mb,
           "overhead": plan.overhead, "count": plan.segment_plan.count if plan.segment_plan else 1,
           "kept": len(plan.segment_plan.kept) if plan.segment_plan else 0, "plan_seconds": seconds,
           "frontier": []}
    for overhead in FRONTIER:
        point = plan_mirror(symbol, data, labels, options=_options(case, overhead))
        row["frontier"].append((overhead, point.planned_mb / point.baseline_mb, point.overhead))
    if case.startswith("bert"):
        row["megatron_mb"] = megatron_mb(symbol, data, labels, CASES[case][3] > 0)
    return row


def megatron_mb(symbol, data, labels, replay: bool) -> float:
    """Static MB of the cut set at each layer's query/key/value projection and attention output,
    the core attention re-run and everything else kept."""
    from mxnet_mirror_hook.core.segments import segment_plan_for_cuts
    from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
    from mxnet_mirror_hook.mx.segments import segment_planned_mb

    graph = symbol_to_graph(symbol, normalize_inputs(data) + normalize_inputs(labels, "label"))
    late = graph.as_late_as_possible()
    position = {node.name: p for p, node in enumerate(late.nodes)}
    layers = sorted({n.name.split("_")[0] for n in graph.op_nodes if n.name.endswith("_qkv")})
    cuts = []
    for layer in layers:
        cuts += [position[f"{layer}_qkv"], position[f"{layer}_context"]]
    plan = segment_plan_for_cuts(graph, sorted(cuts))
    plan = plan.with_kept(range(0, plan.count - 1, 2)).with_replay_random(replay)
    shapes = dict(data + labels)
    requests = {n: ("null" if n in shapes else "write") for n in symbol.list_arguments()}
    mb, _ = segment_planned_mb(symbol, plan, mx.cpu(), shapes, {k: np.dtype("float32") for k in shapes},
                               requests)
    return mb


def _batch(data, labels, vocabulary: int = 30522) -> mx.io.DataBatch:
    rng = np.random.RandomState(0)
    arrays = []
    for name, shape in data:
        if name == "masked_positions":
            arrays.append(np.stack([rng.choice(data[0][1][1], shape[1], replace=False)
                                    for _ in range(shape[0])]))
        elif name == "token_types":
            arrays.append(rng.randint(0, 2, shape))
        elif name == "data" and len(shape) == 2:
            arrays.append(rng.randint(0, vocabulary, shape))
        else:
            arrays.append(rng.uniform(-1, 1, shape))
    classes = vocabulary if len(data[0][1]) == 2 else 1000
    label = [rng.randint(0, classes, shape) for _, shape in labels]
    return mx.io.DataBatch([mx.nd.array(a) for a in arrays], [mx.nd.array(a) for a in label])


def time_row(case: str, iterations: int) -> dict:
    """Median iteration seconds of plain ``Module`` and the selective plan, interleaved."""
    symbol, data, labels = _network(case, timing=True)
    names = [n for n, _ in data]
    modules = {"plain": mx.mod.Module(symbol, data_names=names),
               "selective": MirroredModule(symbol, data_names=names,
                                           options=_options(case, CASES[case][2]))}
    for module in modules.values():
        module.bind(data, labels)
        module.init_params(mx.init.Xavier())
        module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01})
    rounds: dict = {}
    seconds = _interleaved_seconds(modules, _batch(data, labels), iterations, rounds)
    plan = modules["selective"].mirror_plan
    ratios = rounds["selective"]
    return {"plain_seconds": seconds["plain"], "time_ratio": seconds["selective"] / seconds["plain"],
            "ratio_range": (min(ratios), max(ratios)), "timing_mb_ratio": plan.ratio,
            "timing_kept": len(plan.segment_plan.kept) if plan.segment_plan else 0,
            "timing_count": plan.segment_plan.count if plan.segment_plan else 1,
            "timing_overhead": plan.overhead, "load": os.getloadavg()[0]}


def write_section(rows: list, path: str) -> None:
    """The targets table, the frontiers and the Megatron cut figures."""
    lines = ["## Selective segments under `max_overhead` (issue 22)", "",
             "Static MB: MXNet's figures on the CPU as NOTE [ static memory of a segment plan ] counts "
             "them, each kept segment's own pool added to the shared pool (NOTE [ selective segments ]). "
             "Time: training iteration (forward, backward, SGD) of `MirroredModule(max_overhead=...)` "
             "against plain `Module`, one process, interleaved rounds, median (range of the per-round "
             "ratios in brackets), at the timing size (BERT seq 128 batch 8, resnet50 batch 8); the "
             "plan there is again chosen by the program (its shape in the last column).", "",
             "| network | plain MB | selective MB (ratio) | est. overhead | segments (kept) | planned in "
             "| measured time | timing plan | target | met |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for row in rows:
        description, ratio, overhead, _ = CASES[row["case"]]
        timed = (f"{row['time_ratio']:.2f}x ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})"
                 if "time_ratio" in row else "-")
        timing_plan = (f"{row['timing_mb_ratio']:.2f}x, {row['timing_count']} ({row['timing_kept']} kept), "
                       f"est. +{row['timing_overhead']:.1%}" if "time_ratio" in row else "-")
        lines.append(f"| {description} | {row['baseline_mb']:.0f} | {row['planned_mb']:.0f} "
                     f"({row['planned_mb'] / row['baseline_mb']:.2f}x) | +{row['overhead']:.1%} | "
                     f"{row['count']} ({row['kept']}) | {row['plan_seconds']:.0f} s | {timed} | "
                     f"{timing_plan} | <= {ratio}x at <= +{overhead:.0%} | {_met(row, ratio, overhead)} |")
    loads = [f"{r['case']} {r['load']:.1f}" for r in rows if "load" in r]
    if loads:
        lines += ["", "Load average of the two-core machine when each row was timed (other jobs were "
                  "running; a ratio measured under such load is not to be trusted to a few percent): "
                  + ", ".join(loads) + "."]
    lines += ["", "Frontier (static ratio at est. overhead, per `max_overhead`):", ""]
    for row in rows:
        points = ", ".join(f"{limit:g}: {r:.2f}x at +{o:.1%}" for limit, r, o in row["frontier"])
        lines.append(f"- {row['case']}: {points}")
    megatron = [r for r in rows if "megatron_mb" in r]
    if megatron:
        lines += ["", "Megatron cut set by hand (cuts at each layer's query/key/value projection and "
                  "attention output; core attention re-run, everything else kept): "
                  + ", ".join(f"{r['case']} {r['megatron_mb']:.0f} MB "
                              f"({r['megatron_mb'] / r['baseline_mb']:.2f}x)" for r in megatron)
                  + ". Kept executors cannot share a pool (their activations live from forward to "
                  "backward), so each holds its own backward workspace; with the boundary copies "
                  "this is above the plain plan."]
    lines += ["", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
              "`bench/bench_selective.py`."]
    replace_section(path, "selective", "\n".join(lines))


def _met(row: dict, ratio: float, overhead: float) -> str:
    """Whether the static ratio and the measured time meet the target ('-' when not timed)."""
    memory = row["planned_mb"] / row["baseline_mb"] <= ratio
    if "time_ratio" not in row:
        return "memory " + ("yes" if memory else "no") + ", time not measured"
    return "yes" if memory and row["time_ratio"] <= 1 + overhead else "no"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--no-time", dest="time", action="store_false")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--rows", default=os.path.join(ROOT, "bench", "selective_rows.json"))
    parser.add_argument("--write-only", action="store_true", help="write the section from --rows")
    parser.add_argument("--time-only", action="store_true",
                        help="keep the static figures of --rows, measure the time again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = json.load(open(args.rows)) if os.path.exists(args.rows) else []
    for case in ([] if args.write_only else args.cases.split(",")):
        old = [r for r in rows if r["case"] == case]
        rows = [r for r in rows if r["case"] != case]
        # --time-only: the static figures of the last run, timed again in a fresh process (the
        # planning binds of a seq-512 BERT leave native memory a second network may need).
        row = old[0] if args.time_only and old else plan_row(case)
        if args.time:
            row.update(time_row(case, args.iterations))
        log.info("%s", row)
        rows.append(row)
        with open(args.rows, "w") as handle:
            json.dump(rows, handle, indent=1)
    rows.sort(key=lambda r: list(CASES).index(r["case"]))
    write_section(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
