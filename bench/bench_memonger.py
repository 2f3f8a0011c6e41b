#!/usr/bin/env python
"""memonger parity: the seed's search against ``mxnet_mirror_hook.memonger``, side by side.

Runs what memonger's ResNet example does (``search_plan``, then ``get_cost`` of the
plain and the planned symbol) with the seed (``../shared/seed/memonger.py``, its
``mx.gpu()`` bind redirected to the CPU) and with our compatibility module, in one
process, alternating, and writes a table between ``<!-- memonger:begin -->`` and
``<!-- memonger:end -->`` in ``bench/RESULTS.md`` (replaced in place; appended when
absent).  It also checks that both print the same progress lines and find the same
MB.  Timings on a shared machine move; compare the ratio, not the seconds.

    python bench/bench_memonger.py [--layers 152] [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mxnet as mx  # noqa: E402

from mxnet_mirror_hook import memonger  # noqa: E402
from mxnet_mirror_hook.mx.measure import MEASURE_MODE_ENV  # noqa: E402
from mxnet_mirror_hook.testing.models import memonger_resnet  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
from paths import SHARED  # noqa: E402

SEED = os.path.join(SHARED, "seed", "memonger.py")
BEGIN, END = "<!-- memonger:begin -->", "<!-- memonger:end -->"


def load_seed(path: str):
    """The seed module, binding on the CPU where it asks for ``mx.gpu()``."""
    spec = importlib.util.spec_from_file_location("seed_memonger", path)
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    seed.mx = _CpuMx()
    return seed


class _CpuMx:
    """``mx`` as the seed sees it: everything of MXNet, with ``gpu()`` giving the CPU."""

    def __getattr__(self, name):
        return getattr(mx, name)

    @staticmethod
    def gpu(*args):
        return mx.cpu()


def example_run(module, symbol, shapes, **extra):
    """memonger's example: search, then the cost before and after; (seconds, lines, before, after)."""
    stream = io.StringIO()
    tick = time.perf_counter()
    with contextlib.redirect_stdout(stream):
        planned = module.search_plan(symbol, **extra, **shapes)
        before = module.get_cost(symbol, **extra, **shapes)
        after = module.get_cost(planned, **extra, **shapes)
    return time.perf_counter() - tick, stream.getvalue().splitlines(), before, after


def replace_section(path: str, section: str) -> None:
    """Put ``section`` between the markers of ``path`` (appended when they are absent)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=152, help="memonger_resnet depth")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--seed-path", default=SEED)
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    args = parser.parse_args(argv)
    if not os.path.exists(args.seed_path):
        sys.stderr.write(f"no seed script at {args.seed_path}; nothing to compare\n")
        return 1
    seed = load_seed(args.seed_path)
    symbol = memonger_resnet(args.layers)
    shapes = {"data": (args.batch, 3, 224, 224)}
    runs = {"seed": [], "ours": [], "ours, worker processes": []}
    outputs = {}
    for _ in range(args.repeats):
        for name in runs:
            if name == "seed":
                result = example_run(seed, symbol, shapes)
            else:
                saved = os.environ.get(MEASURE_MODE_ENV)
                if name.endswith("processes"):
                    os.environ[MEASURE_MODE_ENV] = "worker"
                try:
                    result = example_run(memonger, symbol, shapes, ctx=mx.cpu())
                finally:
                    if saved is None:
                        os.environ.pop(MEASURE_MODE_ENV, None)
                    else:
                        os.environ[MEASURE_MODE_ENV] = saved
            runs[name].append(result[0])
            outputs[name] = result[1:]
    seed_seconds = statistics.median(runs["seed"])
    lines = [
        "## memonger parity (`bench/bench_memonger.py`)",
        "",
        f"memonger's ResNet example (`search_plan`, then `get_cost` before and after) on "
        f"`memonger_resnet({args.layers})` at batch {args.batch}, CPU binds, in one process, "
        f"{args.repeats} alternating runs each (median; the first worker run includes starting the "
        f"worker processes).",
        "",
        "| implementation | median s | x seed | progress lines as the seed's | MB before -> after |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in runs.items():
        printed, before, after = outputs[name]
        same = "yes" if printed == outputs["seed"][0] else "NO"
        median = statistics.median(seconds)
        lines.append(f"| {name} | {median:.2f} | {median / seed_seconds:.2f} | {same} | "
                     f"{before} -> {after} |")
    lines += ["", "Seed's lines: " + " / ".join(f"`{line}`" for line in outputs["seed"][0])]
    section = "\n".join(lines)
    replace_section(args.output, section)
    sys.stdout.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
