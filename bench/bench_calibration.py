#!/usr/bin/env python
"""Cost model against measured time: estimated overhead before and after calibration (issue 22, item 4).

For each bench network, at a CPU timing batch: the one-level plans at ``'min'``
and ``0.6`` are made, plain and mirrored executors are stepped in turn in one
process (interleaved rounds, medians), and the measured overhead is set beside
the analytic estimate and the estimate from measured operator times
(``mx/calibrate.py``; NOTE [ calibrating the cost model ]).  Writes the
``calibration`` section of ``bench/RESULTS.md``; rows go to a JSON file so the
section can be rewritten without measuring again.

Run it with ``OMP_NUM_THREADS=1`` and the default ``--clock cpu`` on a shared
machine: at a load of 10 on two cores, wall-clock medians of interleaved rounds
put the same resnet50_v1b plan (batch 4, budget 0.6) at +106% one run and the
mobilenet one at -21%, while this process's CPU time repeats within a few points.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

log = logging.getLogger("bench.calibration")

NETWORKS = ["resnet50_v1b", "resnet152_v1b", "inceptionv3", "densenet121", "mobilenetv2_1.0",
            "preact_resnet1001", "lstm_2x512_t100", "unet"]
TIMING_BATCH = {"preact_resnet1001": 8, "lstm_2x512_t100": 32, "unet": 2}
BUDGETS = ("min", 0.6)


def _plans_and_graph(name):
    """The network at its timing batch, its graph, and its one-level plan at each budget."""
    from bench.bench_memory import model_and_shapes
    from mxnet_mirror_hook import plan_mirror
    from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph

    symbol, shapes = model_and_shapes(name, TIMING_BATCH.get(name, 4))
    graph = symbol_to_graph(symbol, normalize_inputs(list(shapes.items())))
    plans = {}
    for budget in BUDGETS:
        try:
            plans[budget] = plan_mirror(symbol, list(shapes.items()), memory_budget=budget, cache_dir=False)
        except ValueError as error:
            log.warning("%s at %s: %s", name, budget, error)
    return symbol, shapes, graph, plans


def estimates(name, table_dir, clock):
    """The estimates of each budget's plan: analytic, operators timed alone, operators inside the
    graph (the calibration planning uses by default)."""
    import mxnet as mx

    from mxnet_mirror_hook.core.cost import recompute_overhead
    from mxnet_mirror_hook.mx.calibrate import calibrate, calibrated_costs

    symbol, shapes, graph, plans = _plans_and_graph(name)
    started = time.perf_counter()
    alone = calibrated_costs(graph, mx.cpu(), table_dir, clock=clock)
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    inside = calibrate(symbol, [(k, v) for k, v in shapes.items()], ctx=mx.cpu(), cache_dir=False)
    inside_s = time.perf_counter() - started
    found = {"calibration_s": inside_s, "alone_s": alone_s, "plans": {}}
    for key, plan in plans.items():
        found["plans"][str(key)] = {"mb": plan.planned_mb,
                                    "analytic": recompute_overhead(graph, plan.mirrored),
                                    "alone": recompute_overhead(graph, plan.mirrored, alone),
                                    "calibrated": recompute_overhead(graph, plan.mirrored, inside)}
    return symbol, shapes, plans, found


def measure(name, repeats, table_dir, clock):
    """Estimated (analytic, calibrated) and measured overhead of each budget's plan of ``name``."""
    from mxnet_mirror_hook.mx.timing import iteration_seconds

    symbol, shapes, plans, found = estimates(name, table_dir, clock)
    keys = list(plans)
    seconds = iteration_seconds([symbol] + [plans[k].symbol for k in keys], shapes, repeats=repeats,
                                clock=clock)
    row = dict(found, name=name, shape="x".join(map(str, shapes["data"])), plain_s=seconds[0],
               repeats=repeats, clock=clock, threads=os.environ.get("OMP_NUM_THREADS", ""))
    for index, key in enumerate(keys, start=1):
        row["plans"][str(key)]["measured"] = seconds[index] / seconds[0] - 1
    log.info("%s", row)
    return row


def refresh_estimates(row, table_dir, clock):
    """``row`` with its estimates made again by this code (its measured times kept)."""
    _, _, _, found = estimates(row["name"], table_dir, clock)
    for key, plan in found["plans"].items():
        if key in row["plans"]:
            plan["measured"] = row["plans"][key]["measured"]
    log.info("%s", found)
    return dict(row, calibration_s=found["calibration_s"], alone_s=found["alone_s"], plans=found["plans"])


def write(rows, path, note=""):
    """The ``calibration`` section of RESULTS.md from ``rows``."""
    from bench.sections import replace_section

    lines = ["## Cost model against measured time, before and after calibration (issue 22, item 4)", "",
             f"Generated by `bench/bench_calibration.py` on {datetime.date.today().isoformat()}, "
             f"{os.cpu_count()} CPU cores shared with other work (load 10-13), one OpenMP thread, every "
             "time read on the process's CPU clock (wall medians were noise at that load). One-level "
             "plans (`backend='mirror'`) made "
             "for the timing batch; plain and mirrored executors stepped in turn in one process, medians "
             "of the rounds given. *analytic*: the operation-count estimate (before); *calibrated*: the "
             "same plan's estimate from each operator's time inside the plain training graph, MXNet's "
             "profiler on this CPU (`calibrate()`, NOTE [ operator times inside the graph ]); *operators "
             "alone*: from each operator bound and timed alone (`method='alone'`, less the cost of a "
             "call); *measured*: extra time of a training iteration over "
             "plain. Percent of a plain iteration." + (f" {note}" if note else ""), "",
             "| network | input | plain s/iter | budget | MB | analytic | operators alone | calibrated | "
             "measured | analytic - measured | alone - measured | calibrated - measured |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gaps = {"analytic": [], "alone": [], "calibrated": []}

    def cell(plan, kind, gap=False):
        if plan.get(kind) is None:
            return "-"
        return f"{plan[kind] - plan['measured']:+.1%}" if gap else f"{plan[kind]:.1%}"

    for row in rows:
        for key, plan in row["plans"].items():
            for kind in gaps:
                if plan.get(kind) is not None:
                    gaps[kind].append(plan[kind] - plan["measured"])
            lines.append(f"| {row['name']} | {row['shape']} | {row['plain_s']:.3f} | {key} | "
                         f"{plan['mb']:.0f} | {cell(plan, 'analytic')} | {cell(plan, 'alone')} | "
                         f"{cell(plan, 'calibrated')} | {plan['measured']:.1%} | "
                         f"{cell(plan, 'analytic', True)} | {cell(plan, 'alone', True)} | "
                         f"{cell(plan, 'calibrated', True)} |")
    for kind, values in gaps.items():
        if values:
            lines.append("")
            lines.append(f"{kind}: mean absolute error {statistics.mean(abs(v) for v in values):.1%} over "
                         f"{len(values)} plans, largest {max(values, key=abs):+.1%}.")
    replace_section(path, "calibration", "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="*", default=NETWORKS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table-dir", default=os.path.join(ROOT, "bench", ".calibration"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "calibration_rows.json"))
    parser.add_argument("--write-only", action="store_true", help="rewrite the section from --json")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="what the operators and iterations are timed by (cpu: this process's CPU time)")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--note", default="", help="a sentence about this run for the section")
    parser.add_argument("--refresh-estimates", action="store_true",
                        help="make the estimates of the rows in --json again, keeping their measured times")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("mxnet_mirror_hook").setLevel(logging.WARNING)
    logging.getLogger("mxnet_mirror_hook.mx.calibrate").setLevel(logging.INFO)
    rows = json.load(open(args.json, encoding="utf-8")) if os.path.exists(args.json) else []
    if args.refresh_estimates:
        for index, row in enumerate(rows):
            if row["name"] in args.networks:
                rows[index] = refresh_estimates(row, args.table_dir, args.clock)
                with open(args.json, "w", encoding="utf-8") as handle:
                    json.dump(rows, handle, indent=1)
    elif not args.write_only:
        for name in args.networks:
            row = measure(name, args.repeats, args.table_dir, args.clock)
            rows = [r for r in rows if r["name"] != name] + [row]
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=1)
    order = {name: i for i, name in enumerate(NETWORKS)}
    write(sorted(rows, key=lambda r: order.get(r["name"], len(order))), args.output, args.note)


if __name__ == "__main__":
    main()
