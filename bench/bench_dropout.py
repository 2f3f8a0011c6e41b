#!/usr/bin/env python
"""Recomputable dropout benchmark (issue 11): MXNet's planned MB with the option off and on.

For a transformer encoder of the project's own (dropout on the attention
probabilities and after each sublayer) and a dropout MLP, under
``memory_budget='min'``: the unmirrored plan and the mirrored plan of the
network as written, and of the network with every Dropout rewritten
(:func:`~mxnet_mirror_hook.mx.dropout.recomputable_dropout`), planned directly
(``plan_mirror`` with the option on returns the lower of the two: NOTE [
recomputable dropout, both ways ] in plan.py).  Static figures only (MXNet's
``Total N MB allocated``).

Writes the section between ``<!-- dropout:begin -->`` and ``<!-- dropout:end -->``
of ``bench/RESULTS.md``.  Run ``python bench/bench_dropout.py`` (``--quick``
for smaller shapes, ``--no-write`` to print only).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402

log = logging.getLogger("bench_dropout")


def dropout_transformer(layers: int = 4, hidden: int = 256, heads: int = 4, p: float = 0.1,
                        classes: int = 10) -> "mx.sym.Symbol":
    """Post-norm transformer encoder layers with Dropout on the attention probabilities and after
    each sublayer (BERT's placement), mean-pooled into a classifier.  Input (batch, length, hidden);
    ``p=0`` leaves the Dropout nodes out."""
    x = mx.sym.var("data")
    for i in range(layers):
        pre = f"l{i}_"

        def split(t: "mx.sym.Symbol", name: str) -> "mx.sym.Symbol":
            t = mx.sym.reshape(t, shape=(0, 0, heads, -1))
            t = mx.sym.transpose(t, axes=(0, 2, 1, 3))
            return mx.sym.reshape(t, shape=(-3, 0, 0), name=pre + name + "_split")

        def drop(t: "mx.sym.Symbol", name: str) -> "mx.sym.Symbol":
            return mx.sym.Dropout(t, p=p, name=pre + name) if p else t

        q, k, v = (split(mx.sym.FullyConnected(x, num_hidden=hidden, flatten=False, name=pre + n), n)
                   for n in ("q", "k", "v"))
        scores = mx.sym.batch_dot(q, k, transpose_b=True, name=pre + "scores")
        probs = mx.sym.softmax(scores * (1.0 / (hidden // heads) ** 0.5), axis=-1, name=pre + "probs")
        context = mx.sym.batch_dot(drop(probs, "att_drop"), v, name=pre + "context")
        context = mx.sym.reshape(context, shape=(-4, -1, heads, 0, 0))
        context = mx.sym.reshape(mx.sym.transpose(context, axes=(0, 2, 1, 3)), shape=(0, 0, -3))
        out = mx.sym.FullyConnected(context, num_hidden=hidden, flatten=False, name=pre + "o")
        x = mx.sym.LayerNorm(x + drop(out, "o_drop"), name=pre + "ln1")
        ffn = mx.sym.FullyConnected(x, num_hidden=4 * hidden, flatten=False, name=pre + "ff1")
        ffn = mx.sym.Activation(ffn, act_type="relu", name=pre + "ff_relu")
        ffn = mx.sym.FullyConnected(ffn, num_hidden=hidden, flatten=False, name=pre + "ff2")
        x = mx.sym.LayerNorm(x + drop(ffn, "ff_drop"), name=pre + "ln2")
    pooled = mx.sym.mean(x, axis=1, name="pool")
    return mx.sym.SoftmaxOutput(mx.sym.FullyConnected(pooled, num_hidden=classes, name="fc"),
                                name="softmax")


def rows(quick: bool = False, backends=("mirror",)):
    """(label, backend, baseline MB, off MB, rewritten baseline MB, rewritten MB) per network."""
    from mxnet_mirror_hook import plan_mirror
    from mxnet_mirror_hook.mx.dropout import recomputable_dropout
    from tests.helpers import dropout_mlp

    seq, batch = (64, 4) if quick else (128, 8)
    width, mlp_batch = (1024, 256) if quick else (2048, 512)
    networks = [
        (f"transformer 4 x 256, 4 heads, seq {seq}, batch {batch}, dropout 0.1",
         dropout_transformer(4, 256, 4, 0.1), [("data", (batch, seq, 256))]),
        (f"transformer 4 x 128, 4 heads, seq {2 * seq}, batch {batch}, dropout 0.1",
         dropout_transformer(4, 128, 4, 0.1), [("data", (batch, 2 * seq, 128))]),
        (f"dropout MLP 6 x {width}, batch {mlp_batch}, p 0.3",
         dropout_mlp(6, hidden=width), [("data", (mlp_batch, 1024))]),
    ]
    for label, symbol, shapes in networks:
        for backend in backends:
            try:
                off = plan_mirror(symbol, shapes, memory_budget="min", cache_dir=False, backend=backend)
                on = plan_mirror(recomputable_dropout(symbol), shapes, memory_budget="min",
                                 cache_dir=False, backend=backend)
            except Exception as error:  # a backend that fails is reported, not fatal
                log.warning("%s, %s: %s", label, backend, error)
                continue
            log.info("%s [%s]: off %.0f -> %.0f MB, rewritten %.0f -> %.0f MB", label, backend,
                     off.baseline_mb, off.planned_mb, on.baseline_mb, on.planned_mb)
            yield label, backend, off.baseline_mb, off.planned_mb, on.baseline_mb, on.planned_mb


def table(results) -> str:
    """The Markdown section."""
    lines = [
        "## Recomputable dropout (`recompute_dropout=True`), `memory_budget='min'`",
        "",
        "MXNet's static plan (MB, CPU) of each network as written and with every Dropout rewritten "
        "(`bench/bench_dropout.py`). With the option on, `plan_mirror` plans both and keeps the lower, "
        "so the option's figure is min(off, rewritten).",
        "",
        "| network | backend | baseline | planned (off) | rewritten baseline | rewritten planned "
        "| rewritten / off | option on |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, backend, base, off, rbase, on in results:
        lines.append(f"| {label} | {backend} | {base:.0f} | {off:.0f} | {rbase:.0f} | {on:.0f} "
                     f"| {on / off:.2f}x | {min(on, off):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--backend", action="append", choices=("mirror", "segments"),
                        help="backends to plan (default mirror). Segments refuse the networks "
                             "here (they draw random numbers and the rewrite is planned with the "
                             "option off); with recompute_dropout segments replay the user's "
                             "Dropout instead: see bench_segments.py's BERT rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = table(list(rows(args.quick, tuple(args.backend or ("mirror",)))))
    sys.stdout.write(text)
    if not args.no_write:
        from bench.sections import replace_section
        replace_section(os.path.join(ROOT, "bench", "RESULTS.md"), "dropout", text)


if __name__ == "__main__":
    main()
