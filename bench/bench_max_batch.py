"""The largest batch in a device's memory: plain, one-level and segments (issue 21 item 3).

For each network, :func:`mxnet_mirror_hook.max_batch` with ``method='slope'`` (plans at two probe
batches, every part of the footprint extrapolated linearly: NOTE [ the bench's bounded search ]),
and with ``--verify`` the plain and one-level answers planned again at the batch found and one
above.  Writes the ``max-batch`` section of ``bench/RESULTS.md`` and keeps the rows in
``bench/max_batch_rows.json``.  Run ``nice -n 10 python bench/bench_max_batch.py``.

# NOTE [ the bench's bounded search ]
# Planning at large batches is cheap on the CPU (simple_bind allocates lazily), but the
# 'min' executor-segments planner measures tens of candidates, minutes per batch for the
# deep convnets.  The bench therefore plans each kind at two probe batches only and reads
# the answer off the per-sample slope of the footprint (max_batch's 'slope' method); the
# footprint grows with the batch by the activations and inputs on top of a fixed part,
# nearly linearly (MXNet's static plan is a sum of per-sample blocks, rounded by its
# pool).  ``--verify`` checks the plain and one-level answers with real plans at the batch
# found and the next one.
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

from bench.sections import replace_section  # noqa: E402

__all__ = ["CASES", "build", "run_case", "write_section", "main"]

logger = logging.getLogger("bench_max_batch")

SECTION = "max-batch"
#: case -> (description, optimizer, optimizer params, probe batches, recompute_dropout)
CASES = {
    "resnet50_v1b": ("resnet50_v1b 224x224", "sgd", {"momentum": 0.9}, (16, 32), False),
    "resnet152_v1b": ("resnet152_v1b 224x224", "sgd", {"momentum": 0.9}, (16, 32), False),
    "inceptionv3": ("inceptionv3 299x299 (its classifier's Dropout: recompute_dropout)", "sgd",
                    {"momentum": 0.9}, (16, 32), True),
    "bert_base_512": ("`bert_mlm` BERT-base, seq 512, 80 masked, dropout 0.1, recompute_dropout",
                      "adam", {}, (4, 8), True),
    "lstm_lm": ("LSTM language model 2x512, 100 steps, vocabulary 10000", "adam", {}, (16, 32), False),
}


def build(case: str):
    """``(symbol, shapes with None on the batch axis)``."""
    from mxnet_mirror_hook.testing import models

    if case in ("resnet50_v1b", "resnet152_v1b", "inceptionv3"):
        side = models.default_image_size(case)
        symbol, _ = models.gluon_symbol(case)
        return symbol, {"data": (None, 3, side, side), "softmax_label": (None,)}
    if case == "lstm_lm":
        symbol = models.lstm_language_model(100, vocab=10000, num_embed=512, num_hidden=512)
        return symbol, {"data": (None, 100), "softmax_label": (None, 100)}
    symbol = models.bert_mlm(seq_len=512, max_length=512, masked=80)
    data, labels = models.bert_mlm_shapes(batch=1, seq_len=512, masked=80)
    return symbol, {name: (None,) + tuple(shape[1:]) for name, shape in data + labels}


def _verify(symbol, shapes, result, case_options, device_mb) -> dict:
    """Real figures at the batch found and the next: plain and one-level planned there, the segment
    plan (made at the first probe) measured there; their totals (MB)."""
    from mxnet_mirror_hook.planning.batch import _evaluator

    checked = {}
    for variant in ("plain", "one-level", "segments"):
        fit = result.fits[variant]
        if not fit.batch or fit.plan is None:
            continue
        evaluate = _evaluator(symbol, shapes, variant, case_options["options"], "module", "gpu", None,
                              case_options["optimizer"], case_options["optimizer_params"])
        if variant == "segments":
            if fit.plan.segment_plan is None:
                continue
            checked[variant] = {str(b): evaluate.remeasure(fit.plan, b)[0].total
                                for b in (fit.batch, fit.batch + 1)}
        else:
            checked[variant] = {str(b): evaluate(b)[0].total for b in (fit.batch, fit.batch + 1)}
        logger.info("verified %s: %s (device %.0f MB)", variant, checked[variant], device_mb)
    return checked


def run_case(case: str, device_memory: str, verify: bool, exact: bool) -> dict:
    """One row: the largest batch of each kind, its footprint and overhead (``exact``: plain and
    one-level searched over real plans, segments still from the probes)."""
    from mxnet_mirror_hook import MirrorOptions, max_batch

    description, optimizer, params, probes, dropout = CASES[case]
    symbol, shapes = build(case)
    options = MirrorOptions(recompute_dropout=dropout)
    started = time.perf_counter()
    common = dict(optimizer=optimizer, optimizer_params=params, device="gpu", probes=probes, options=options)
    result = max_batch(symbol, shapes, device_memory, method="slope",
                       variants=("plain", "one-level", "segments") if not exact else ("segments",), **common)
    if exact:
        searched = max_batch(symbol, shapes, device_memory, variants=("plain", "one-level"), **common)
        result.fits = {**searched.fits, **result.fits}
    row = {"case": case, "description": description, "optimizer": result.optimizer,
           "probes": list(probes), "seconds": time.perf_counter() - started, **result.to_dict()}
    if verify:
        row["verified"] = _verify(symbol, shapes, result, {"options": options, "optimizer": optimizer,
                                                           "optimizer_params": params}, result.device_mb)
    logger.info("%s\n%s", case, result.summary())
    return row


def _cell(row: dict, variant: str) -> str:
    fit = row[variant]
    if fit.get("error"):
        return "not available"
    if not fit["batch"]:
        return "none fits"
    mark = "" if fit["estimated"] else "*"
    return f"{fit['batch']}{mark} ({fit['footprint_mb']:.0f} MB, est. +{fit['overhead']:.0%})"


def _ratio(row: dict, variant: str) -> str:
    plain = row["plain"]["batch"]
    return f"{row[variant]['batch'] / plain:.2f}x" if plain else "-"


def write_section(rows: list, path: str, device_memory: str) -> None:
    """Replace (or append) the max-batch section of RESULTS.md."""
    lines = [f"## The largest batch in {device_memory} (issue 21)", "",
             "`max_batch(...)` per network: the largest batch whose whole footprint (parameters, "
             "gradients, optimizer state, auxiliary states, inputs, workspace and the plan's activations; "
             "`MirrorPlan.footprint`) fits, counted for a GPU (no `Module` host copies, no MKLDNN "
             "buffers; the im2col column buffer stands in for cuDNN's workspace, which is not modelled). "
             "Activations are MXNet's static plans measured on the CPU (`cost_ctx` cpu), which a GPU's "
             "cuDNN plan may differ from. Plain: the unmirrored plan; one-level: `backend='mirror'`, "
             "`memory_budget='min'`; segments: `backend='segments'`, `'min'`. Segments: the plan made at "
             "the first probe batch, measured again at the second, and the batch read off the "
             "footprint's per-sample slope (NOTE [ the bench's bounded search ]); a batch marked * was "
             "searched over real plans (it fits, the next one does not), the others are read off the "
             "slope the same way. Cells: batch (footprint at that batch, estimated overhead). "
             "Targets (issue 21): 4x resnet50, 6x resnet152, 5x BERT-base over plain.", "",
             "| network | optimizer | plain | one-level | segments | one-level / plain | segments / plain |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['description']} | {row['optimizer']} | {_cell(row, 'plain')} | "
                     f"{_cell(row, 'one-level')} | {_cell(row, 'segments')} | {_ratio(row, 'one-level')} | "
                     f"{_ratio(row, 'segments')} |")
    checked = [row for row in rows if "verified" in row]
    if checked:
        lines += ["", "Checked (whole footprint in MB at the batch found / one above; plain and one-level "
              "planned there, segments: the split made at the first probe measured there):"]
        for row in checked:
            parts = [f"{variant} " + " / ".join(f"{b}: {mb:.0f}" for b, mb in found.items())
                     for variant, found in row["verified"].items()]
            lines.append(f"- {row['case']}: " + "; ".join(parts))
    lines += ["", "Probes: " + ", ".join(f"{r['case']} {r['probes'][0]} and {r['probes'][1]} "
                                         f"({r['seconds']:.0f} s)" for r in rows)
              + f". Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
              "`bench/bench_max_batch.py`."]
    replace_section(path, SECTION, "\n".join(lines))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device-memory", default="16GB")
    parser.add_argument("--verify", action="store_true",
                        help="plan plain and one-level again at the batch found and one above")
    parser.add_argument("--exact", action="store_true",
                        help="search plain and one-level over real plans (segments stay estimated)")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--rows", default=os.path.join(ROOT, "bench", "max_batch_rows.json"))
    parser.add_argument("--write-only", action="store_true", help="write the section from --rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    kept = {}
    if args.write_only:
        rows = json.load(open(args.rows))
        write_section(rows, args.output, args.device_memory)
        return rows
    if os.path.exists(args.rows):
        kept = {row["case"]: row for row in json.load(open(args.rows))}
    for case in args.cases.split(","):
        kept[case] = run_case(case, args.device_memory, args.verify, args.exact)
        rows = [kept[c] for c in CASES if c in kept]
        with open(args.rows, "w") as handle:
            json.dump(rows, handle, indent=1)
        write_section(rows, args.output, args.device_memory)
    return rows


if __name__ == "__main__":
    main()
