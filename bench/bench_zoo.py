#!/usr/bin/env python
"""Zoo sweep (issue 20): every network of gluoncv's model zoo that builds offline, and gluonnlp's
models, planned with ``plan_mirror`` under four option sets.

Each network (``bench/zoo_networks.py``: built with random weights, hybridized, traced, a loss on
top) is planned with the default options, ``backend='auto'``, ``memory_budget='min',
backend='auto'`` and ``memory_budget=0.5`` (``cache_dir=False``), one network per fresh worker
process (MXNet binds keep native memory no Python release frees), one process at a time.  Each run
gives a row: baseline and planned MB, backend chosen, segments, planning seconds, the warnings the
planner logged, and the error class and first line if any.

Rows go to ``bench/zoo_rows.json`` (merged, so a sweep can be resumed or widened) and a table to
the section between ``<!-- zoo:begin -->`` and ``<!-- zoo:end -->`` of ``bench/RESULTS.md``.

Usage::

    python bench/bench_zoo.py --list                      # the networks and their inputs
    python bench/bench_zoo.py --sample                    # one network per family
    python bench/bench_zoo.py --only c3d_kinetics400,xception
    python bench/bench_zoo.py --resume                    # everything not yet in the rows file
    python bench/bench_zoo.py --table                     # rewrite the table from the rows file
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, Iterable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.sections import replace_section  # noqa: E402
from bench.zoo_summary import format_section  # noqa: E402

__all__ = ["OPTION_SETS", "plan_network", "run_sweep", "main"]

log = logging.getLogger("bench_zoo")

ROWS = os.path.join(ROOT, "bench", "zoo_rows.json")
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")

#: The four option sets of the sweep (issue 20), by the label the rows and the table use.
OPTION_SETS: Dict[str, dict] = {
    "default": {},
    "auto": {"backend": "auto"},
    "min+auto": {"memory_budget": "min", "backend": "auto"},
    "0.5": {"memory_budget": 0.5},
}

#: A network whose traced symbol has more nodes than this is not planned (a 'skipped' row): the
#: sweep's work bound per network, deterministic unlike a wall-clock limit.
MAX_NODES = 20000
#: Wall seconds after which a worker is stopped, only so that a hung worker cannot stall the sweep;
#: its unfinished runs become 'timeout' rows.
WORKER_TIMEOUT = 3600


class _Warnings(logging.Handler):
    """Collects the first line of every warning the planner logs during one run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0][:300])


def _forget_plans() -> None:
    """Empty the process's memory-only plan cache, so each option set plans from scratch.

    NOTE [ every option set plans from scratch ]
    With ``cache_dir=False`` plans are still kept in the process's memory cache, and
    ``backend='auto'`` would take the one-level plan the default options just made: its planning
    seconds would then leave that work out.  The sweep measures each option set as a user's first
    bind would meet it, so the cache is emptied between runs (a bench-only reach into the cache).
    """
    from mxnet_mirror_hook.cache import get_cache

    get_cache(False)._memory.clear()


def _where(error: BaseException) -> str:
    """``file:line function`` of the innermost frame of the package (or else the innermost)."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if f"{os.sep}mxnet_mirror_hook{os.sep}" in frame.filename]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return ""
    path = frame.filename
    path = (path.split("site-packages" + os.sep, 1)[1] if "site-packages" + os.sep in path
            else os.path.relpath(path, ROOT))
    return f"{path}:{frame.lineno} {frame.name}"


def _error_row(row: dict, error: BaseException, stage: str) -> dict:
    text = str(error).strip().splitlines()
    row.update(status="error" if stage == "plan" else "build-error", stage=stage,
               error_class=type(error).__name__, error=(text[0] if text else "")[:400],
               where=_where(error), detail=_detail(text[1:]))
    return row


def _detail(lines: List[str]) -> str:
    """The first line of MXNet's own message inside a longer error (``Check failed``...), if any."""
    for line in lines:
        if re.search(r"Check failed|Error in operator|MXNetError|InferShape|InferType", line):
            return line.strip()[:300]
    return ""


def plan_network(name: str, option_label: str, built) -> dict:
    """Plan one built network under one option set; the row (errors caught and recorded)."""
    from mxnet_mirror_hook import plan_mirror

    row = {"network": name, "options": option_label, "input": built.input_text}
    handler = _Warnings()
    package_log = logging.getLogger("mxnet_mirror_hook")
    package_log.addHandler(handler)
    _forget_plans()
    started = time.perf_counter()
    try:
        plan = plan_mirror(built.symbol, built.data_shapes, built.label_shapes, cache_dir=False,
                           **OPTION_SETS[option_label])
    except Exception as error:  # noqa: BLE001 - every failure is a row of the sweep
        _error_row(row, error, "plan")
    else:
        summary = plan.summary() if hasattr(plan, "summary") else ""
        row.update(status="ok", baseline_mb=plan.baseline_mb, planned_mb=plan.planned_mb,
                   backend=plan.backend, segments=plan.segment_count,
                   plan_seconds=plan.planning_seconds)
        # NOTE [ a fallback is read from the plan ]
        # backend='auto' that cannot plan segments returns the one-level plan with
        # ``plan.fallback`` saying why (its warning and summary say "segments failed ... one-level
        # plan used", no "fall" in them); older code only logged it, hence the text match too.
        reason = getattr(plan, "fallback", None)
        row["fell_back"] = reason is not None or any("fall" in text.lower()
                                                     for text in handler.lines + [summary])
        if reason is not None:
            row["fallback"] = str(reason)[:400]
    finally:
        package_log.removeHandler(handler)
    row["seconds"] = time.perf_counter() - started
    row["warnings"] = handler.lines[:5]
    return row


def _worker(name: str, out: str, max_nodes: int, options: Iterable[str]) -> None:
    """Build ``name`` and plan it under each option set, appending each row to ``out`` (JSON lines)."""
    import warnings

    warnings.filterwarnings("ignore")
    from bench.zoo_networks import build_network, find, forbid_network

    forbid_network()
    net = find(name)
    base = {"network": name, "family": net.family}

    def emit(row: dict) -> None:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**base, **row}) + "\n")

    try:
        built = build_network(net)
        nodes = len(json.loads(built.symbol.tojson())["nodes"])
    except Exception as error:  # noqa: BLE001
        for label in options:
            emit(_error_row({"options": label, "input": net.input}, error, "build"))
        return
    for label in options:
        if nodes > max_nodes:
            emit({"options": label, "input": built.input_text, "nodes": nodes, "status": "skipped",
                  "error_class": "WorkBound", "error": f"{nodes} nodes > {max_nodes}"})
            continue
        emit({**plan_network(name, label, built), "nodes": nodes})


# ----------------------------------------------------------------------------- the parent
def load_rows(path: str = ROWS) -> Dict[str, dict]:
    """The rows file as ``{"network|options": row}`` (empty if missing)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return {f"{row['network']}|{row['options']}": row for row in json.load(handle)}


def save_rows(rows: Dict[str, dict], path: str = ROWS) -> None:
    """Write the rows (sorted by network, then option set) atomically."""
    order = list(OPTION_SETS)
    ranked = sorted(rows.values(), key=lambda r: (r["network"], order.index(r["options"])
                                                  if r["options"] in order else len(order)))
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(ranked, handle, indent=1)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def _run_worker(name: str, family: str, max_nodes: int, timeout: float) -> List[dict]:
    """Run one network's worker process (niced); its rows, with 'timeout' or 'crash' rows for the
    option sets it did not finish."""
    out = tempfile.mktemp(prefix=f"zoo_{name}_", suffix=".jsonl")
    command = ["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "--worker", name,
               "--out", out, "--max-nodes", str(max_nodes)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    started = time.perf_counter()
    status, detail = "crash", ""
    # Its own process group, so that a hung worker is stopped with the measuring processes it started.
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
        tail = [line for line in stderr.strip().splitlines() if line.strip()]
        status, detail = ("ok" if process.returncode == 0 else "crash",
                          f"exit {process.returncode}: {tail[-1][:300] if tail else ''}")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        status, detail = "timeout", f"worker stopped after {timeout:.0f} s"
    rows = []
    if os.path.exists(out):
        with open(out, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        os.remove(out)
    done_labels = {row["options"] for row in rows}
    for label in OPTION_SETS:
        if label not in done_labels:
            rows.append({"network": name, "family": family, "options": label,
                         "status": "timeout" if status == "timeout" else "error",
                         "stage": "worker", "error_class": "Timeout" if status == "timeout"
                         else "WorkerCrash", "error": detail,
                         "seconds": time.perf_counter() - started})
    return rows


def run_sweep(names: List[str], resume: bool, max_nodes: int, timeout: float,
              code: str = "") -> Dict[str, dict]:
    """Plan every network of ``names`` in its own worker, one at a time; the merged rows."""
    from bench.zoo_networks import catalogue

    families = {net.name: net.family for net in catalogue()}
    rows = load_rows()
    for index, name in enumerate(names):
        if resume and all(f"{name}|{label}" in rows for label in OPTION_SETS):
            continue
        started = time.perf_counter()
        for row in _run_worker(name, families.get(name, "?"), max_nodes, timeout):
            rows[f"{row['network']}|{row['options']}"] = dict(row, code=code) if code else row
        save_rows(rows)
        states = [rows[f"{name}|{label}"].get("error_class") or "ok" for label in OPTION_SETS]
        log.info("[%d/%d] %s: %s (%.0f s)", index + 1, len(names), name, ", ".join(states),
                 time.perf_counter() - started)
    return rows


def _selection(args: argparse.Namespace) -> List[str]:
    from bench.zoo_networks import catalogue

    networks = catalogue(nlp=not args.no_nlp)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        known = {net.name for net in networks}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(f"not in the sweep: {', '.join(unknown)} (see --list)")
        return wanted
    if args.sample:
        seen: Dict[str, str] = {}
        for net in networks:
            seen.setdefault(net.family, net.name)
        return list(seen.values())
    return [net.name for net in networks]


def _list(nlp: bool) -> None:
    from bench.zoo_networks import catalogue

    for net in catalogue(nlp=nlp):
        log.info("%-45s %-16s %s", net.name, net.family, net.input)
    for net in catalogue(nlp=nlp, excluded=True):
        log.info("%-45s %-16s %s", net.name, "(left out)", net.input)


def main(argv: Optional[List[str]] = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the networks and exit")
    parser.add_argument("--only", help="comma-separated network names")
    parser.add_argument("--sample", action="store_true", help="one network per family")
    parser.add_argument("--resume", action="store_true", help="skip networks already in the rows")
    parser.add_argument("--table", action="store_true", help="only rewrite the RESULTS.md section")
    parser.add_argument("--no-nlp", action="store_true", help="leave gluonnlp's models out")
    parser.add_argument("--max-nodes", type=int, default=MAX_NODES, help="work bound per network")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT,
                        help="wall seconds before a hung worker is stopped (a 'timeout' row)")
    parser.add_argument("--code", default="", help="which code was planned (e.g. a commit), kept in the rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.out, args.max_nodes, list(OPTION_SETS))
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if args.list:
        _list(not args.no_nlp)
        return
    rows = load_rows() if args.table else run_sweep(_selection(args), args.resume, args.max_nodes,
                                                     args.timeout, args.code)
    from bench.zoo_networks import catalogue

    replace_section(RESULTS, "zoo", format_section(list(rows.values()), list(OPTION_SETS),
                                                   catalogue(excluded=True)))
    log.info("wrote %s and the zoo section of %s", ROWS, RESULTS)


if __name__ == "__main__":
    main()
