#!/usr/bin/env python
"""Executor-segments benchmark: planned and profiled memory, and iteration time.

For each network: MXNet's planned MB of the plain symbol and of today's
one-level plan (``plan_mirror``, default budget), the segment plan's static MB
(NOTE [ static memory of a segment plan ] in ``mx/segments/measure.py``), the storage
profiler's peak of one training iteration for all three (each in its own
process: parameters, gradients, data and the bound executors included), and
the CPU iteration time of one-level and segment training against a plain
``Module`` (same process, iterations interleaved, median).

Writes the section between ``<!-- segments:begin -->`` and ``<!-- segments:end -->``
of ``bench/RESULTS.md`` (appended when absent).  Run ``python bench/bench_segments.py``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402

from mxnet_mirror_hook import MirroredModule, plan_mirror  # noqa: E402
from mxnet_mirror_hook.mx.profile import profiler_peak_mb, start_storage_profiler  # noqa: E402
from mxnet_mirror_hook.testing.models import last_output_lstm, lstm_language_model  # noqa: E402

log = logging.getLogger("bench_segments")

BEGIN, END = "<!-- segments:begin -->", "<!-- segments:end -->"
CAP_ENV = "MXNET_EXEC_INPLACE_GRAD_SUM_CAP"


def language_model(vocabulary: int, hidden: int = 512, layers: int = 2, steps: int = 100):
    """example/rnn/bucketing/lstm_bucketing.py's network: every step into one softmax."""
    return lstm_language_model(steps, vocab=vocabulary, num_embed=hidden, num_hidden=hidden,
                               num_layers=layers)


#: name -> (description, builder, data shape, label shape, integer vocabulary of the data or 0)
CASES = {
    "lm_lstm_v10000": ("language-model LSTM 2x512, 100 steps, batch 32, vocabulary 10000",
                       lambda: language_model(10000), (32, 100), (32, 100), 10000),
    "lm_lstm_v1000": ("language-model LSTM 2x512, 100 steps, batch 32, vocabulary 1000",
                      lambda: language_model(1000), (32, 100), (32, 100), 1000),
    "bench_lstm": ("bench LSTM 2x512, 100 steps, batch 32 (last output, 1000 classes)",
                   last_output_lstm, (32, 100, 512), (32,), 0),
}


#: Heavy rows: static plans only at the table's batch ('min' budget; a plain run needs ~6.5 GB, more
#: than this shared bench machine can give), time at batch 4; selected with --cases.
STATIC_ONLY = {
    "resnet152_min": ("resnet152_v1b, batch 32, budget 'min' (time at batch 4)",
                      (32, 3, 224, 224)),
}


TIMING_BATCH, TIMING_ITERATIONS = 4, 5

#: BERT rows: name -> (description, dropout).  The project's own BERT-base-shaped
#: masked-LM symbol (``testing.models.bert_mlm``: 12 x 768, 12 heads, FFN 3072, fused GELU, tied
#: decoder over 80 masked positions per sequence), seq 512, batch 8, all plans under 'min';
#: with dropout 0.1 both one-level and segment plans have ``recompute_dropout`` on.
BERT_CASES = {
    "bert_base_dropout": ("BERT-base MLM, seq 512, batch 8, dropout 0.1 (recompute_dropout on), "
                          "budget 'min'", 0.1),
    "bert_base": ("BERT-base MLM, seq 512, batch 8, no dropout, budget 'min'", 0.0),
}
BERT_BATCH, BERT_SEQ, BERT_MASKED = 8, 512, 80


def _bert(case: str):
    from mxnet_mirror_hook.options import MirrorOptions
    from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes

    dropout = BERT_CASES[case][1]
    symbol = bert_mlm(dropout=dropout, seq_len=BERT_SEQ, masked=BERT_MASKED)
    data, labels = bert_mlm_shapes(BERT_BATCH, BERT_SEQ, BERT_MASKED)
    options = MirrorOptions(memory_budget="min", cache_dir=False, recompute_dropout=dropout > 0)
    return symbol, data, labels, options


def measure_bert(case: str) -> dict:
    """Static plans of a BERT row: plain, one-level and segments (MXNet's figures)."""
    symbol, data, labels, options = _bert(case)
    one_level = plan_mirror(symbol, data, labels, options=options)
    os.environ[CAP_ENV] = "2"  # NOTE [ the gradient-sum cap is read once per process ]
    seg = plan_mirror(symbol, data, labels, options=options.replace(backend="segments"))
    return {"case": case, "description": BERT_CASES[case][0], "baseline_mb": one_level.baseline_mb,
            "mirror_mb": one_level.planned_mb, "segments_mb": seg.planned_mb,
            "segment_count": seg.segment_count, "segment_overhead": seg.overhead,
            "mirror_overhead": one_level.overhead,
            "mirror_rewritten": "_mask_draw" in one_level.symbol.tojson()}


def profile_bert(case: str, config: str) -> dict:
    """Storage profiler peak (MB) and seconds of bind + one forward/backward of a BERT row, in
    this (fresh) process."""
    symbol, data, labels, options = _bert(case)
    names = [name for name, _ in data]
    options = options.replace(backend="segments" if config == "segments" else "mirror")
    if config != "plain":
        # Planned before the profiler starts (its in-process binds are not training memory);
        # the module's bind then takes the plan from the process's memory cache.
        plan_mirror(symbol, data, labels, options=options)
    rng = np.random.RandomState(0)
    values = [rng.randint(0, 30522, (BERT_BATCH, BERT_SEQ)), rng.randint(0, 2, (BERT_BATCH, BERT_SEQ)),
              np.stack([rng.choice(BERT_SEQ, BERT_MASKED, replace=False) for _ in range(BERT_BATCH)])]
    batch = mx.io.DataBatch([mx.nd.array(v) for v in values],
                            [mx.nd.array(rng.randint(0, 30522, (BERT_BATCH, BERT_MASKED)))])
    path = os.path.join(tempfile.mkdtemp(), "profile.json")
    start_storage_profiler(path)
    module = (mx.mod.Module(symbol, data_names=names) if config == "plain"
              else MirroredModule(symbol, data_names=names, options=options))
    module.bind(data, labels)
    if config != "plain":
        assert module.mirror_plan.from_cache, "the profiled bind planned again"
    module.init_params(mx.init.Xavier())
    started = time.perf_counter()
    module.forward_backward(batch)
    mx.nd.waitall()
    seconds = time.perf_counter() - started
    return {"peak": profiler_peak_mb(path), "seconds": seconds}


def measure_static(case: str) -> dict:
    """One-level and segment plans of a heavy row, MXNet's static figures only."""
    from mxnet_mirror_hook.testing.models import gluon_symbol

    description, shape = STATIC_ONLY[case]
    symbol, _ = gluon_symbol(case.split("_")[0] + "_v1b")
    one_level = plan_mirror(symbol, [("data", shape)], memory_budget="min")
    os.environ[CAP_ENV] = "2"
    seg = plan_mirror(symbol, [("data", shape)], memory_budget="min", backend="segments",
                      cache_dir=False)
    row = {"case": case, "description": description, "baseline_mb": one_level.baseline_mb,
           "mirror_mb": one_level.planned_mb, "segments_mb": seg.planned_mb,
           "segment_count": seg.segment_count, "segment_overhead": seg.overhead,
           "mirror_overhead": one_level.overhead}
    # Time at batch 4 (plans made for batch 4), as the segment research measured it.
    small = (TIMING_BATCH,) + tuple(shape[1:])
    modules = {"plain": mx.mod.Module(symbol),
               "mirror": MirroredModule(symbol, memory_budget="min"),
               "segments": MirroredModule(symbol, memory_budget="min", backend="segments")}
    rng = np.random.RandomState(0)
    batch = mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, small))],
                            [mx.nd.array(rng.randint(0, 1000, (TIMING_BATCH,)))])
    for module in modules.values():
        module.bind([("data", small)], [("softmax_label", (TIMING_BATCH,))])
        module.init_params(mx.init.Xavier())
        module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01})
    times = _interleaved_seconds(modules, batch, TIMING_ITERATIONS)
    row.update({"mirror_time": times["mirror"] / times["plain"],
                "segments_time": times["segments"] / times["plain"],
                "time_note": f"batch {TIMING_BATCH}, plans for batch {TIMING_BATCH}"})
    return row


def profile_static(case: str, config: str) -> float:
    """Storage profiler peak (MB) of bind + one forward/backward of a static-only row at its full
    batch, in this (fresh) process; the plan is made (and cached) before the profiler starts."""
    from mxnet_mirror_hook.testing.models import gluon_symbol

    _, shape = STATIC_ONLY[case]
    symbol, _ = gluon_symbol(case.split("_")[0] + "_v1b")
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "profile.json")
    options = dict(memory_budget="min", cache_dir=os.path.join(folder, "plans"),
                   backend="segments" if config == "segments" else "mirror")
    labels = [("softmax_label", (shape[0],))]
    if config != "plain":
        plan_mirror(symbol, [("data", shape)], labels, **options)
        mx.nd.waitall()
        gc.collect()
    rng = np.random.RandomState(0)
    batch = mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, shape))],
                            [mx.nd.array(rng.randint(0, 1000, (shape[0],)))])
    start_storage_profiler(path)
    module = mx.mod.Module(symbol) if config == "plain" else MirroredModule(symbol, **options)
    module.bind([("data", shape)], labels)
    if config != "plain" and not module.mirror_plan.from_cache:
        raise RuntimeError("the profiled bind planned again: its peak would count planning binds")
    module.init_params(mx.init.Xavier())
    module.forward_backward(batch)
    mx.nd.waitall()
    return profiler_peak_mb(path)


def _interleaved_seconds(modules: dict, batch: mx.io.DataBatch, iterations: int,
                         rounds: dict = None) -> dict:
    """Median seconds of a training iteration per module, the modules stepped in turn round
    after round (the first round warms up) so that a noisy machine slows them alike.

    ``rounds``, when given, receives each configuration's per-round ratio to the first
    (plain) configuration of the same round, for the spread."""
    times = {config: [] for config in modules}
    for repeat in range(iterations + 1):
        for config, module in modules.items():
            started = time.perf_counter()
            module.forward_backward(batch)
            module.update()
            mx.nd.waitall()
            if repeat:
                times[config].append(time.perf_counter() - started)
    if rounds is not None:
        first = next(iter(modules))
        for config, values in times.items():
            rounds[config] = [v / p for v, p in zip(values, times[first])]
    return {config: float(np.median(values)) for config, values in times.items()}


def _batch(case: str, seed: int = 0) -> mx.io.DataBatch:
    _, _, data_shape, label_shape, vocabulary = CASES[case]
    rng = np.random.RandomState(seed)
    data = (rng.randint(0, vocabulary, data_shape) if vocabulary
            else rng.uniform(-1, 1, data_shape)).astype("float32")
    classes = vocabulary or 1000
    return mx.io.DataBatch([mx.nd.array(data)], [mx.nd.array(rng.randint(0, classes, label_shape))])


def _module(case: str, config: str, segments: int, cache_dir=False, symbol=None):
    _, build, data_shape, label_shape, _ = CASES[case]
    symbol = build() if symbol is None else symbol
    if config == "plain":
        module = mx.mod.Module(symbol)
    elif config == "mirror":
        module = MirroredModule(symbol, cache_dir=cache_dir)
    else:
        module = MirroredModule(symbol, cache_dir=cache_dir, backend="segments",
                                segments=segments or None)
    module.bind([("data", data_shape)], [("softmax_label", label_shape)])
    module.init_params(mx.init.Xavier())
    return module


def profile_peak(case: str, config: str, segments: int) -> float:
    """Storage profiler peak (MB) of bind + one forward/backward, in this (fresh) process.

    The plan is made first, outside the profiled window (segment planning binds candidates in
    this process, which the profiler would count), and the profiled bind loads it from a cache."""
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "profile.json")
    cache = os.path.join(folder, "plans")
    # One symbol for both binds: a rebuilt one has other automatic node names, another plan key.
    symbol = CASES[case][1]()
    if config != "plain":
        _module(case, config, segments, cache_dir=cache, symbol=symbol)  # plans and caches
        mx.nd.waitall()
        gc.collect()
    batch = _batch(case)
    start_storage_profiler(path)
    module = _module(case, config, segments, cache_dir=cache, symbol=symbol)
    if config != "plain" and not module.mirror_plan.from_cache:
        raise RuntimeError("the profiled bind planned again: its peak would count planning binds")
    module.forward_backward(batch)
    mx.nd.waitall()
    return profiler_peak_mb(path)


def measure_case(case: str, segments: int, iterations: int) -> dict:
    """Plans and timings of one network (run in a child process, see :func:`main`)."""
    _, build, data_shape, label_shape, _ = CASES[case]
    symbol = build()
    shapes, labels = [("data", data_shape)], [("softmax_label", label_shape)]
    # Planning binds run in worker processes started without the cap: today's figures.
    one_level = plan_mirror(symbol, shapes, labels, cache_dir=False)
    os.environ[CAP_ENV] = "2"  # NOTE [ the gradient-sum cap is read once per process ]
    seg = plan_mirror(symbol, shapes, labels, cache_dir=False, backend="segments",
                      segments=segments or None)
    result = {"case": case, "baseline_mb": one_level.baseline_mb, "mirror_mb": one_level.planned_mb,
              "segments_mb": seg.planned_mb, "segment_count": seg.segment_count,
              "segment_overhead": seg.overhead, "mirror_overhead": one_level.overhead}
    modules = {config: _module(case, config, segments) for config in ("plain", "mirror", "segments")}
    for module in modules.values():
        module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01})
    batch = _batch(case)
    rounds: dict = {}
    times = _interleaved_seconds(modules, batch, iterations, rounds)
    result.update({"plain_seconds": times["plain"],
                   "mirror_time": times["mirror"] / times["plain"],
                   "segments_time": times["segments"] / times["plain"],
                   "segments_time_rounds": rounds["segments"], "mirror_time_rounds": rounds["mirror"],
                   "head_chunks": seg.segment_plan.head_chunks if seg.segment_plan else 0})
    return result


def _child(args: list, cap: bool) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(CAP_ENV, None)
    if cap:
        env[CAP_ENV] = "2"
    done = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1]


def _time(row: dict, config: str) -> str:
    """Median time ratio, with the range of the per-round ratios when recorded."""
    rounds = row.get(f"{config}_time_rounds")
    text = f"{row[f'{config}_time']:.2f}x"
    if rounds:
        text += f" ({min(rounds):.2f}-{max(rounds):.2f}, {len(rounds)} rounds)"
    return text


def write_section(rows: list, path: str) -> None:
    """Replace (or append) the segments section of RESULTS.md."""
    lines = [BEGIN, "## Executor segments (issue 11)", "",
             "Plan MB: MXNet's static figures on the CPU (segments: the memory pool the segments' "
             "executors share, as MXNet builds it from each segment's planned blocks in the chain's "
             "bind order (NOTE [ the shared pool's union ]), + the boundary tensors (value and the "
             "producer's head-gradient copy each, gradient arrays once per array boundaries share: "
             "NOTE [ boundary gradients share arrays ]; a step output only the merge of the steps "
             "reads: the copy alone) + the chain's copy of the outputs, or, for a loss head run in "
             "chunks, the head's output and work buffers; NOTE [ static memory of a segment plan ]). "
             "Profiler peak: MXNet's storage "
             "profiler, bind + one forward/backward in a fresh process (parameters, gradients and data "
             "included, so it is above the plan figures). Time: CPU iteration (forward, backward, SGD "
             "update) against plain `Module`, same process, interleaved rounds: ratio of the median "
             "seconds (in brackets the range of the per-round ratios). Segment runs use "
             f"`{CAP_ENV}=2` (set before MXNet builds a graph; plain and one-level timings in the same "
             "process share it). The bench machine is shared (2 cores, other jobs): time ratios of "
             "the same plan moved by up to 0.2 between runs.", "",
             "| network | plain MB | one-level MB | segments MB (k) | ratio "
             "| profiler peak plain / one-level / segments | time one-level | time segments |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["case"] in BERT_CASES:
            peaks = (f"{row['peak_plain']:.0f} / {row['peak_mirror']:.0f} / {row['peak_segments']:.0f}"
                     if "peak_plain" in row else "-")
            times = ("- | - |" if "seconds_plain" not in row else
                     f"{row['seconds_mirror'] / row['seconds_plain']:.2f}x (one run) | "
                     f"{row['seconds_segments'] / row['seconds_plain']:.2f}x (one run) |")
            lines.append(
                f"| {row['description']} | {row['baseline_mb']:.0f} | {row['mirror_mb']:.0f} "
                f"({row['mirror_mb'] / row['baseline_mb']:.2f}x, est. +{row['mirror_overhead']:.0%}) | "
                f"{row['segments_mb']:.0f} ({row['segment_count']}, est. +{row['segment_overhead']:.0%}) "
                f"| {row['segments_mb'] / row['baseline_mb']:.2f}x | {peaks} | {times}")
            continue
        if "peak_plain" not in row:
            lines.append(
                f"| {row['description']} | {row['baseline_mb']:.0f} | {row['mirror_mb']:.0f} "
                f"({row['mirror_mb'] / row['baseline_mb']:.2f}x, est. +{row['mirror_overhead']:.0%}) | "
                f"{row['segments_mb']:.0f} ({row['segment_count']}, est. +{row['segment_overhead']:.0%}) "
                f"| {row['segments_mb'] / row['baseline_mb']:.2f}x | - | "
                + (f"{row['mirror_time']:.2f}x ({row['time_note']}) | {row['segments_time']:.2f}x "
                   f"({row['time_note']}) |" if "segments_time" in row else "- | - |"))
            continue
        head = f", head in {row['head_chunks']} chunks" if row.get("head_chunks") else ""
        lines.append(
            f"| {row['description']} | {row['baseline_mb']:.0f} | {row['mirror_mb']:.0f} "
            f"({row['mirror_mb'] / row['baseline_mb']:.2f}x) | {row['segments_mb']:.0f} "
            f"({row['segment_count']}{head}) | {row['segments_mb'] / row['baseline_mb']:.2f}x | "
            f"{row['peak_plain']:.0f} / {row['peak_mirror']:.0f} / {row['peak_segments']:.0f} | "
            f"{_time(row, 'mirror')} | {_time(row, 'segments')} |")
    timed = [r for r in rows if "plain_seconds" in r]
    berts = [r for r in rows if r["case"] in BERT_CASES and "seconds_plain" in r]
    bert_note = ("" if not berts else
                 " BERT rows: the project's own BERT-base-shaped symbol (`testing.models.bert_mlm`, "
                 "no gluonnlp), plans under `'min'`; the profiler peak and time are of ONE "
                 "forward/backward per configuration, each in its own process (not interleaved), "
                 "plain " + ", ".join(f"{r['case']} {r['seconds_plain']:.0f} s" for r in berts) + ".")
    lines += ["", "Plain iteration: " + ", ".join(f"{r['case']} {r['plain_seconds']:.2f} s" for r in timed)
              + "." + bert_note + f" Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
              "`bench/bench_segments.py`.", END]
    section = "\n".join(lines)
    text = open(path, "r", encoding="utf-8").read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="lm_lstm_v10000,lm_lstm_v1000,bench_lstm",
                        help="comma-separated; also resnet152_min (static plans only, heavy), "
                             "bert_base_dropout and bert_base (static plans, one profiled "
                             "forward/backward per configuration)")
    parser.add_argument("--segments", default="",
                        help="segments per case, e.g. bench_lstm=20 (default: the planner's choice)")
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--rows", default=os.path.join(ROOT, "bench", "segments_rows.json"),
                        help="where the measured rows are kept (JSON)")
    parser.add_argument("--keep-rows", action="store_true",
                        help="keep rows of other networks from the last run's --rows file")
    parser.add_argument("--no-bert-profile", dest="bert_profile", action="store_false",
                        help="BERT rows: static plans only (no profiled forward/backward)")
    parser.add_argument("--no-static-profile", dest="static_profile", action="store_false",
                        help="resnet152_min: no profiled forward/backward at batch 32")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CASE", "SEGMENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        kind, case, segments = args.child
        if kind == "measure":
            print(json.dumps(measure_case(case, int(segments), args.iterations)))
        elif kind == "static":
            print(json.dumps(measure_static(case)))
        elif kind == "static_profile":
            print(json.dumps({"peak": profile_static(case, segments)}))
        elif kind == "bert":
            print(json.dumps(measure_bert(case)))
        elif case in BERT_CASES:
            print(json.dumps(profile_bert(case, kind)))
        else:
            print(json.dumps({"peak": profile_peak(case, kind, int(segments))}))
        return []
    counts = dict(item.split("=") for item in args.segments.split(",") if item)
    rows = []
    previous = {}
    if args.keep_rows and os.path.exists(args.rows):
        with open(args.rows, "r", encoding="utf-8") as handle:
            previous = {row["case"]: row for row in json.load(handle)}
    for case in args.cases.split(","):
        if case in STATIC_ONLY:
            row = json.loads(_child(["--child", "static", case, "0"], cap=False))
            if args.static_profile:
                # One forward/backward at the full batch per configuration, each in its own process.
                for config in ("plain", "mirror", "segments"):
                    row[f"peak_{config}"] = json.loads(_child(
                        ["--child", "static_profile", case, config], cap=config == "segments"))["peak"]
                    log.info("%s %s: profiler peak %.0f MB", case, config, row[f"peak_{config}"])
            rows.append(row)
            log.info("%s", rows[-1])
            continue
        if case in BERT_CASES:
            row = json.loads(_child(["--child", "bert", case, "0"], cap=False))
            if args.bert_profile:
                # One forward/backward per configuration, each in its own process (tens of
                # seconds each on the bench machine), under the cap for the segments.
                for config in ("plain", "mirror", "segments"):
                    found = json.loads(_child(["--child", config, case, "0"],
                                              cap=config == "segments"))
                    row[f"peak_{config}"], row[f"seconds_{config}"] = found["peak"], found["seconds"]
                    log.info("%s %s: profiler peak %.0f MB, %.1f s", case, config, found["peak"],
                             found["seconds"])
            rows.append(row)
            log.info("%s", row)
            continue
        segments = counts.get(case, "0")
        log.info("%s: planning and timing", case)
        row = json.loads(_child(["--iterations", str(args.iterations), "--child", "measure", case,
                                 segments], cap=False))
        # The same request as the measured plan (planning is deterministic), so that the profiled
        # chain is the one in the table.
        for config in ("plain", "mirror", "segments"):
            peak = json.loads(_child(["--child", config, case, segments],
                                     cap=config == "segments"))["peak"]
            row[f"peak_{config}"] = peak
            log.info("%s %s: profiler peak %.0f MB", case, config, peak)
        row["description"] = CASES[case][0]
        rows.append(row)
        log.info("%s", row)
    # Rows measured by earlier runs (--keep-rows) stay in the table unless re-measured.
    measured = {row["case"] for row in rows}
    rows = [row for case, row in previous.items() if case not in measured] + rows
    with open(args.rows, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1)
    write_section(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
