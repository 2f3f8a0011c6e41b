#!/usr/bin/env python
"""memonger parity: the seed's search against ``mxnet_mirror_hook.memonger``, side by side.

Runs what memonger's ResNet example does (``search_plan``, then ``get_cost`` of the
plain and the planned symbol) with the seed (``../shared/seed/memonger.py``, its
``mx.gpu()`` bind redirected to the CPU) and with our compatibility module, each run
in a fresh process, alternating, and writes a table between
``<!-- memonger:begin -->`` and ``<!-- memonger:end -->`` in ``bench/RESULTS.md``
(replaced in place; appended when absent).  It also checks that both print the same
progress lines and find the same MB.  Timings on a shared machine move; compare the
ratios, not the seconds.

Every run has its own process because every in-process bind leaves native memory
behind (MXNet 1.9.1; about 120 MB per bind of this network, for the seed as for us):
a few dozen runs in one process would exhaust the machine.

    python bench/bench_memonger.py [--layers 152] [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from paths import SHARED  # noqa: E402

SEED = os.path.join(SHARED, "seed", "memonger.py")
BEGIN, END = "<!-- memonger:begin -->", "<!-- memonger:end -->"
#: The implementations compared, with the environment of their runs.
IMPLEMENTATIONS = {"seed": {}, "ours": {}, "ours, worker processes": {"MXNET_MIRROR_HOOK_MEASURE": "worker"}}


def child(name: str, seed_path: str, layers: int, batch: int) -> None:
    """One run in this (fresh) process; prints a JSON line with the search's seconds and output."""
    import mxnet as mx

    from mxnet_mirror_hook.testing.models import memonger_resnet

    if name == "seed":
        mx.gpu = lambda *args: mx.cpu()  # the seed binds on mx.gpu()
        spec = importlib.util.spec_from_file_location("seed_memonger", seed_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        extra = {}
    else:
        from mxnet_mirror_hook import memonger as module
        extra = {"ctx": mx.cpu()}
    symbol = memonger_resnet(layers)
    shapes = {"data": (batch, 3, 224, 224)}
    stream = io.StringIO()
    tick = time.perf_counter()
    with contextlib.redirect_stdout(stream):
        planned = module.search_plan(symbol, **extra, **shapes)
        before = module.get_cost(symbol, **extra, **shapes)
        after = module.get_cost(planned, **extra, **shapes)
    seconds = time.perf_counter() - tick
    sys.stdout.write(json.dumps({"seconds": seconds, "lines": stream.getvalue().splitlines(),
                                 "before": before, "after": after}) + "\n")


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
    parser.add_argument("--child", default=None, choices=list(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.seed_path, args.layers, args.batch)
        return 0
    if not os.path.exists(args.seed_path):
        sys.stderr.write(f"no seed script at {args.seed_path}; nothing to compare, skipping\n")
        return 0
    search = {name: [] for name in IMPLEMENTATIONS}
    whole = {name: [] for name in IMPLEMENTATIONS}
    outputs = {}
    for _ in range(args.repeats):
        for name, variables in IMPLEMENTATIONS.items():
            command = [sys.executable, os.path.abspath(__file__), "--child", name, "--layers",
                       str(args.layers), "--batch", str(args.batch), "--seed-path", args.seed_path]
            env = {k: v for k, v in os.environ.items() if k != "MXNET_MIRROR_HOOK_MEASURE"}
            env.update(variables)
            tick = time.perf_counter()
            result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            whole[name].append(time.perf_counter() - tick)
            report = json.loads(result.stdout.strip().splitlines()[-1])
            search[name].append(report["seconds"])
            outputs[name] = report
    seed_search, seed_whole = statistics.median(search["seed"]), statistics.median(whole["seed"])
    lines = [
        "## memonger parity (`bench/bench_memonger.py`)",
        "",
        f"memonger's ResNet example (`search_plan`, then `get_cost` before and after) on "
        f"`memonger_resnet({args.layers})` at batch {args.batch}, CPU binds; each run in a fresh "
        f"process, {args.repeats} alternating runs of each (medians). *search*: the example's "
        f"three calls; *script*: the whole process (MXNet import, symbol building, worker start).",
        "",
        "| implementation | search s | x seed | script s | x seed | progress lines as the seed's "
        "| MB before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in IMPLEMENTATIONS:
        report = outputs[name]
        same = "yes" if report["lines"] == outputs["seed"]["lines"] else "NO"
        found, total = statistics.median(search[name]), statistics.median(whole[name])
        lines.append(f"| {name} | {found:.2f} | {found / seed_search:.2f} | {total:.2f} | "
                     f"{total / seed_whole:.2f} | {same} | {report['before']} -> {report['after']} |")
    lines += ["", "Seed's lines: " + " / ".join(f"`{line}`" for line in outputs["seed"]["lines"])]
    section = "\n".join(lines)
    replace_section(args.output, section)
    sys.stdout.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
