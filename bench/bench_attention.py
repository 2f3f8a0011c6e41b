#!/usr/bin/env python
"""Fused recomputation (issue 22): BERT-base MLM, static and real memory, time.

For ``bert_mlm`` (seq 512, batch 8) without dropout and with dropout 0.1 (``recompute_dropout``):
MXNet's static plan of the user's symbol; of the rewritten symbol (each core attention, each
LayerNorm and GELU read by a FullyConnected one ``Custom`` operator that keeps only its input and
recomputes in its backward: mx/fused.py), with what the operators keep outside MXNet's plan
(their buffers, the kept dropout masks as bits); and of ``plan_fused`` under ``max_overhead``
0.05 and 0.08 (the rewritten symbol planned by MXNet's one-level mirror with what the fused
operators leave of the limit).  Real peaks: MXNet's
storage profiler over one training iteration (bind, init, forward, backward, SGD update) of a
plain ``Module`` of the user's symbol and of the plan's symbol, each in a fresh process.  Time: a
training iteration of ``Module`` binding the plan's symbol (what ``MirroredModule`` binds) against
plain ``Module`` in one process, interleaved rounds, median (``--iterations``), at seq 512 and
``--timing-batch`` (NOTE [ timing without planning in the process ]).

Writes the section between ``<!-- attention:begin -->`` and ``<!-- attention:end -->`` of
``bench/RESULTS.md``.  Run ``nice -n 10 python bench/bench_attention.py`` (one heavy process).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_segments import _interleaved_seconds  # noqa: E402
from bench.sections import replace_section  # noqa: E402
from mxnet_mirror_hook.core.attention import core_attention_workspace  # noqa: E402
from mxnet_mirror_hook.core.fused import fused_counts, fused_outside_bytes  # noqa: E402
from mxnet_mirror_hook.core.units import to_mb  # noqa: E402
from mxnet_mirror_hook.mx.fused import fuse_for_recomputation  # noqa: E402 (registers every fused operator)
from mxnet_mirror_hook.options import MirrorOptions  # noqa: E402
from mxnet_mirror_hook.planning.fused import plan_fused  # noqa: E402
from mxnet_mirror_hook.planning.setup import PlanRequest  # noqa: E402
from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes  # noqa: E402

log = logging.getLogger("bench_attention")

#: case -> (description, dropout, target ratio, target overhead)
CASES = {
    "no_dropout": ("BERT-base MLM, seq 512, batch 8, no dropout", 0.0, 0.5, 0.05),
    "dropout": ("the same with dropout 0.1 (`recompute_dropout=True`)", 0.1, 0.5, 0.08),
}
LIMITS = (0.05, 0.08)
SEQ, BATCH = 512, 8


def _options(dropout: float, limit: float) -> MirrorOptions:
    return MirrorOptions(cache_dir=False, max_overhead=limit, recompute_dropout=dropout > 0)


def plan_rows(case: str, symbols: str) -> dict:
    """Static figures of one case: plain, rewritten (+ outside), the plans within each limit; the
    plain symbol and the first limit's plan symbol saved in ``symbols`` for :func:`peak_rows`."""
    _, dropout, _, _ = CASES[case]
    symbol = bert_mlm(seq_len=SEQ, dropout=dropout)
    data, label = bert_mlm_shapes(BATCH, SEQ)
    setup = PlanRequest(data, label).prepare(symbol, _options(dropout, LIMITS[0]))
    row = {"case": case, "plain_mb": setup.measure(frozenset())}
    rewritten = PlanRequest(data, label).prepare(fuse_for_recomputation(symbol, with_dropout=dropout > 0),
                                                 _options(dropout, LIMITS[0]))
    _, masks = core_attention_workspace(rewritten.graph)
    buffers = fused_outside_bytes(rewritten.graph) - masks
    row.update(rewritten_mb=rewritten.measure(frozenset()), temporaries_mb=to_mb(buffers),
               masks_mb=to_mb(masks), fused=fused_counts(rewritten.graph))
    for limit in LIMITS:
        started = time.perf_counter()
        plan = plan_fused(setup, _options(dropout, limit))
        row[f"plan_{limit}"] = {"planned_mb": plan.planned_mb, "outside_mb": plan.outside_plan_mb,
                                "overhead": plan.overhead, "mirrored": len(plan.mirrored),
                                "seconds": time.perf_counter() - started,
                                "rewritten_dropouts": "_mask_draw" in plan.symbol.tojson()}
        if limit == LIMITS[0]:
            symbol.save(_symbol_path(symbols, case, "plain"))
            plan.symbol.save(_symbol_path(symbols, case, "plan"))
    log.info("%s", row)
    return row


def _symbol_path(folder: str, case: str, which: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{case}-{which}-symbol.json")


def peak_rows(case: str, symbols: str) -> dict:
    """Real peaks of the plain symbol and of the plan within the first limit (saved by :func:`plan_rows`)."""
    data, label = bert_mlm_shapes(BATCH, SEQ)
    return {"case": case, "peaks": {which: _peak(_symbol_path(symbols, case, which), data, label, which)
                                    for which in ("plain", "plan")}}


def _peak(path: str, data, label, name: str) -> dict:
    """The storage profiler's peak over one training iteration of a plain Module of the symbol saved
    at ``path``, in a fresh process that has the fused operator registered."""
    with tempfile.TemporaryDirectory(prefix="bench-attention-") as folder:
        request = {"symbol": path, "data": data, "labels": label, "trace": os.path.join(folder, "trace.json"),
                   "label": name}
        done = subprocess.run([sys.executable, __file__, "--profile", json.dumps(request)],
                              capture_output=True, text=True, cwd=ROOT, timeout=3600)
        if done.returncode:
            log.warning("%s: profiled iteration failed: %s", name, done.stderr[-2000:])
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        return json.loads(done.stdout.strip().splitlines()[-1])


def profile_main(request: dict) -> None:
    """The subprocess of :func:`_peak`: one profiled plain iteration; prints its figures as JSON."""
    from mxnet_mirror_hook.mx.profile import train_one_iteration

    symbol = mx.sym.load(request["symbol"])
    shapes = [(n, tuple(s)) for n, s in request["data"]], [(n, tuple(s)) for n, s in request["labels"]]
    found = train_one_iteration(symbol, shapes[0], shapes[1], request["trace"], label=request["label"])
    print(json.dumps({"peak_mb": found.peak_mb, "planned_mb": found.planned_mb}))


class _CpuClocked:
    """A module whose iterations (``forward_backward`` to the end of ``update``) are also timed on
    the process's CPU clock, which other processes on the machine disturb less than the wall."""

    def __init__(self, module) -> None:
        self.module, self.cpu_seconds, self._started = module, [], 0.0

    def forward_backward(self, batch) -> None:
        mx.nd.waitall()
        self._started = time.process_time()
        self.module.forward_backward(batch)

    def update(self) -> None:
        self.module.update()
        mx.nd.waitall()
        self.cpu_seconds.append(time.process_time() - self._started)


def time_rows(case: str, batch: int, iterations: int, symbols: str) -> dict:
    """Median seconds of plain ``Module`` and of ``Module`` binding the plan's symbol (what
    ``MirroredModule`` binds; saved by :func:`plan_rows`), interleaved.

    # NOTE [ timing without planning in the process ]
    # Planning a symbol with Custom operators binds its candidates in this process (the workers
    # cannot run the operator), and those binds leave engine work pending that allocates every
    # candidate's arrays at the next synchronisation: BERT-base at seq 512, batch 2, grew past
    # 14 GB and was killed (a ``mx.nd.waitall()`` after each bind keeps it at 0.9 GB).  The
    # timing process therefore loads the plan's symbol instead of planning.
    """
    _, dropout, _, _ = CASES[case]
    data, label = bert_mlm_shapes(batch, SEQ)
    names = [n for n, _ in data]
    modules = {which: _CpuClocked(mx.mod.Module(mx.sym.load(_symbol_path(symbols, case, which)),
                                                data_names=names)) for which in ("plain", "plan")}
    rng = np.random.RandomState(0)
    arrays = [rng.randint(0, 1000, (batch, SEQ)), np.zeros((batch, SEQ)),
              np.stack([rng.choice(SEQ, 80, replace=False) for _ in range(batch)])]
    batch_data = mx.io.DataBatch([mx.nd.array(a) for a in arrays],
                                 [mx.nd.array(rng.randint(0, 1000, (batch, 80)))])
    for module in (clocked.module for clocked in modules.values()):
        module.bind(data, label)
        module.init_params(mx.init.Xavier())
        module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01, "momentum": 0.9})
    load = os.getloadavg()[0]
    rounds: dict = {}
    seconds = _interleaved_seconds(modules, batch_data, iterations, rounds)
    cpu = {which: clocked.cpu_seconds[1:] for which, clocked in modules.items()}
    return {"case": case, "timing_batch": batch, "plain_s": seconds["plain"],
            "attention_s": seconds["plan"], "ratio": seconds["plan"] / seconds["plain"],
            "round_ratios": rounds["plan"], "load_before": load, "load_after": os.getloadavg()[0],
            "plain_cpu_s": float(np.median(cpu["plain"])), "plan_cpu_s": float(np.median(cpu["plan"])),
            "cpu_ratio": float(np.median(cpu["plan"]) / np.median(cpu["plain"])),
            "cpu_round_ratios": [v / p for v, p in zip(cpu["plan"], cpu["plain"])]}


def _ratio(mb: float, plain: float) -> str:
    return f"{mb:.0f} MB ({mb / plain:.2f}x)"


def _plan_cell(plan: dict, plain: float) -> str:
    total = plan["planned_mb"] + plan["outside_mb"]
    return (f"{plan['planned_mb']:.0f} + {plan['outside_mb']:.0f} = {_ratio(total, plain)}, "
            f"est. +{100 * plan['overhead']:.1f}%, {plan['mirrored']} mirrored")


def _verdict(row: dict, timed: Optional[dict], case: tuple) -> str:
    """Whether the timed plan (within the first limit) meets the case's target ratio (outside memory
    counted) and measured overhead (CPU clock)."""
    description, _, target_ratio, target_overhead = case
    plan = row[f"plan_{LIMITS[0]}"]
    ratio = (plan["planned_mb"] + plan["outside_mb"]) / row["plain_mb"]
    measured = (f"measured +{100 * (timed['cpu_ratio'] - 1):.0f}% CPU / +{100 * (timed['ratio'] - 1):.0f}% "
                f"wall" if timed else "time not measured")
    met = ratio <= target_ratio and timed is not None and timed["cpu_ratio"] - 1 <= target_overhead
    return (f"{description.split(',')[-1].strip()}: {ratio:.2f}x (plan within {LIMITS[0]:g}), "
            f"{measured} ({'met' if met else 'not met'})")


def _time_cell(timed: dict) -> str:
    def rounds(values: list) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    return (f"wall {timed['ratio']:.3f}x (rounds {rounds(timed['round_ratios'])}), CPU "
            f"{timed['cpu_ratio']:.3f}x (rounds {rounds(timed['cpu_round_ratios'])}); batch "
            f"{timed['timing_batch']}, {timed['plain_s']:.1f} s plain; load {timed['load_before']:.1f}/"
            f"{timed['load_after']:.1f}")


def write_section(rows: list, path: str) -> None:
    """The ``attention`` section of ``path`` from ``rows``."""
    plans = {r["case"]: r for r in rows if "plain_mb" in r}
    times = {r["case"]: r for r in rows if "ratio" in r}
    measured = {r["case"]: r["peaks"] for r in rows if "peaks" in r}
    lines = ["## Fused recomputation: core attention, LayerNorms and GELUs (issue 22)", "",
             "`bench/bench_attention.py`: in `bert_mlm` each core attention (query-key product, softmax, "
             "attention Dropout, product with the values; `mx/attention.py`), each LayerNorm read by a "
             "FullyConnected (`mx/fused_layer_norm.py`) and each GELU read by one "
             "(`mx/fused_activation.py`) replaced by one `Custom` operator that keeps only its input and "
             "recomputes the rest in its backward with MXNet's own backward kernels; the rest planned by "
             "MXNet's one-level mirror within what the fused operators leave of `max_overhead` "
             "(`planning.fused.plan_fused`, what `'auto'` takes under `max_overhead` when lower).  Static "
             "= MXNet's plan; outside = what the operators keep beyond it (their buffers + the kept "
             "dropout masks as bits), counted in every ratio.  Real peak: MXNet's storage profiler over "
             "one training iteration (bind, init, forward, backward, SGD update), plain `Module` of each "
             "symbol, "
             "fresh process, MKLDNN on.", "",
             "| case | plain static | rewritten, unmirrored: static + outside | plan within 0.05 | "
             "plan within 0.08 | real peak plain -> plan (0.05) | measured time, median (plan / plain) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for case, (description, _, target_ratio, target_overhead) in CASES.items():
        row, timed = plans.get(case), times.get(case)
        if row is None:
            continue
        plain = row["plain_mb"]
        rewritten = row["rewritten_mb"] + row["temporaries_mb"] + row["masks_mb"]
        peaks = measured.get(case, {})
        peak = (f"{peaks['plain']['peak_mb']:.0f} -> {peaks['plan']['peak_mb']:.0f} MB "
                f"({peaks['plan']['peak_mb'] / peaks['plain']['peak_mb']:.2f}x)"
                if "peak_mb" in peaks.get("plain", {}) and "peak_mb" in peaks.get("plan", {}) else "n/a")
        when = _time_cell(timed) if timed else "not timed"
        lines.append(f"| {description} (target <= {target_ratio}x at <= +{100 * target_overhead:.0f}%) | "
                     f"{plain:.0f} MB | {row['rewritten_mb']:.0f} + {row['temporaries_mb']:.0f} + "
                     f"{row['masks_mb']:.0f} = {_ratio(rewritten, plain)} | "
                     + " | ".join(_plan_cell(row[f"plan_{limit}"], plain) for limit in LIMITS)
                     + f" | {peak} | {when} |")
    verdicts = [_verdict(plans[c], times.get(c), CASES[c]) for c in CASES if c in plans]
    lines += ["", "Targets: " + "; ".join(verdicts) + ".", "",
              "Load: the machine has 2 cores, shared with other work during these runs (load averages in "
              "the time column), so a time ratio is good to a few percent only.  "
              "Why fused operators and not MXNet's mirror: NOTE [ planning the fused "
              "variant ] in planning/fused.py."]
    replace_section(path, "attention", "\n".join(lines))


def _kind(row: dict) -> str:
    return "plan" if "plain_mb" in row else "peak" if "peaks" in row else "time"


def run_phase(phase: str, cases: list, args) -> None:
    """One phase for ``cases``, each case's row replacing its row of that phase in ``args.rows``
    (written after each case)."""
    for case in cases:
        if phase == "plan":
            row = plan_rows(case, args.symbols)
        elif phase == "peak":
            row = peak_rows(case, args.symbols)
        else:
            row = time_rows(case, args.timing_batch, args.iterations, args.symbols)
        rows = json.load(open(args.rows)) if os.path.exists(args.rows) else []
        rows = [r for r in rows if not (r["case"] == case and _kind(r) == phase)] + [row]
        with open(args.rows, "w") as handle:
            json.dump(rows, handle, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--phases", default="plan,peak,time",
                        help="plan (static figures), peak (storage profiler), time; each in its own process")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--timing-batch", type=int, default=2)
    parser.add_argument("--symbols", default=os.path.join(tempfile.gettempdir(), "bench_attention_symbols"))
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--rows", default=os.path.join(ROOT, "bench", "attention_rows.json"))
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        profile_main(json.loads(args.profile))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    phases = [p for p in args.phases.split(",") if p]
    cases = args.cases.split(",")
    if len(phases) == 1 and len(cases) == 1 and phases[0] != "write":
        run_phase(phases[0], cases, args)
        return  # the section is written by the process that ran every phase (or by --phases write)
    else:  # each phase and case in a fresh process: binds leave native memory behind
        for phase in (p for p in phases if p != "write"):
            for case in cases:
                command = [sys.executable, __file__, "--phases", phase] + _passed(args, case)
                subprocess.run(command, check=True)
    rows = json.load(open(args.rows)) if os.path.exists(args.rows) else []
    write_section(rows, args.output)


def _passed(args, case: str) -> list:
    return ["--cases", case, "--iterations", str(args.iterations), "--timing-batch",
            str(args.timing_batch), "--symbols", args.symbols, "--output", args.output, "--rows", args.rows]


if __name__ == "__main__":
    main()
