"""The zoo sweep's table and summary line for ``bench/RESULTS.md`` (rows from ``bench_zoo.py``)."""
from __future__ import annotations

import collections
import re
import statistics
import time
from typing import Dict, List, Sequence

__all__ = ["cell", "format_section", "summarize"]

#: A plan more than this many MB above the unmirrored one counts as above it.  Zero: MXNet's
#: one-level figures are whole MB (rounded down) while segment figures are exact, so a segment plan
#: a fraction of a MB above a rounded baseline is flagged too (the rows keep both numbers).
ABOVE_TOLERANCE_MB = 0.0
#: The one error the sweep allows: a numeric budget below the least plan (issue 20).
UNREACHABLE = "BudgetUnreachableError"


def summarize(rows: Sequence[dict]) -> Dict[str, object]:
    """Counts of the sweep: networks, runs, failures by class (build failures apart), fallbacks,
    plans above the unmirrored one, and planning seconds (median and max of the planned runs)."""
    planned = [row for row in rows if row.get("status") == "ok"]
    failures = collections.Counter(row["error_class"] for row in rows
                                   if row.get("status") in ("error", "timeout")
                                   and row["error_class"] != UNREACHABLE)
    build = collections.Counter(row["error_class"] for row in rows if row.get("status") == "build-error")
    seconds = [row["seconds"] for row in planned]
    return {
        "networks": len({row["network"] for row in rows}),
        "runs": len(rows),
        "planned": len(planned),
        "failures": dict(failures.most_common()),
        "build_failures": {name: count // 4 for name, count in build.most_common()},
        "unreachable": sum(row.get("error_class") == UNREACHABLE for row in rows),
        "skipped": sum(row.get("status") == "skipped" for row in rows),
        "fallbacks": [f"{row['network']} ({row['options']})" for row in planned if row.get("fell_back")],
        "above": [f"{row['network']} ({row['options']})" for row in planned
                  if row["planned_mb"] > row["baseline_mb"] + ABOVE_TOLERANCE_MB],
        "seconds_median": statistics.median(seconds) if seconds else 0.0,
        "seconds_max": max(seconds) if seconds else 0.0,
        "slowest": max(planned, key=lambda r: r["seconds"])["network"] if planned else "",
    }


def cell(row: dict) -> str:
    """One run in the table: ``planned MB backend[xk] seconds`` or the error class."""
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return f"**{row.get('error_class', row.get('status'))}**"
    backend = "seg" if row["backend"] == "segments" else row["backend"]
    count = f"x{row['segments']}" if row["backend"] == "segments" else ""
    flag = " (fell back)" if row.get("fell_back") else ""
    return f"{row['planned_mb']:.0f} {backend}{count}{flag} {row['seconds']:.1f}s"


def _table(rows: Sequence[dict], labels: Sequence[str]) -> List[str]:
    by_network: Dict[str, Dict[str, dict]] = collections.defaultdict(dict)
    for row in rows:
        by_network[row["network"]][row["options"]] = row
    lines = ["| network | family | input | nodes | plain MB | " + " | ".join(labels) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(labels)]
    order = sorted(by_network, key=lambda name: (next(iter(by_network[name].values())).get("family", ""),
                                                 name))
    for name in order:
        runs = by_network[name]
        first = next(iter(runs.values()))
        baseline = next((r["baseline_mb"] for r in runs.values() if r.get("status") == "ok"), None)
        lines.append(f"| {name} | {first.get('family', '?')} | {first.get('input', '')} | "
                     f"{first.get('nodes', '')} | {'' if baseline is None else f'{baseline:.0f}'} | "
                     + " | ".join(cell(runs.get(label)) for label in labels) + " |")
    return lines


def _errors(rows: Sequence[dict]) -> List[str]:
    """One line per distinct (stage, error class, message with numbers as N, place) with the runs
    it stopped."""
    groups: Dict[tuple, List[str]] = collections.defaultdict(list)
    for row in rows:
        if row.get("status") not in ("ok", None):
            message = re.sub(r"\d+", "N", row.get("error", ""))
            where = re.sub(r"^.*site-packages/", "", row.get("where", ""))
            key = (row.get("stage", row["status"]), row.get("error_class", ""), message, where,
                   row.get("detail", ""))
            groups[key].append(f"{row['network']} ({row['options']})")
    lines = []
    for (stage, error_class, message, where, detail), runs in sorted(groups.items()):
        shown = ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")
        place = f" (`{where}`)" if where else ""
        more = f" [{detail}]" if detail else ""
        lines.append(f"- {stage}: `{error_class}: {message}`{more}{place} -- {shown}")
    return lines


def _codes(rows: Sequence[dict]) -> str:
    """Which code planned which rows: ``rows planned at <code>: N networks (M runs), ...``, the
    code with the most networks first (a partial re-sweep leaves rows of several commits)."""
    networks: Dict[str, set] = collections.defaultdict(set)
    runs: Dict[str, int] = collections.Counter()
    for row in rows:
        code = row.get("code") or "unrecorded code"
        networks[code].add(row["network"])
        runs[code] += 1
    parts = [f"{code}: {len(names)} networks ({runs[code]} runs)"
             for code, names in sorted(networks.items(), key=lambda item: -len(item[1]))]
    return "rows planned at " + ", ".join(parts)


def format_section(rows: Sequence[dict], labels: Sequence[str], excluded: Sequence) -> str:
    """The zoo section of RESULTS.md (without its markers)."""
    facts = summarize(rows)
    failures = ", ".join(f"{name} {count}" for name, count in facts["failures"].items()) or "none"
    build = ", ".join(f"{name} {count}" for name, count in facts["build_failures"].items()) or "none"
    lines = [
        "## Zoo sweep (issue 20)", "",
        "Every network of gluoncv 0.10.5's model zoo that builds offline and gluonnlp 0.10's models "
        "(`bench/zoo_networks.py`: random weights, hybridized, traced, a loss on top), planned by "
        "`plan_mirror` (`cache_dir=False`, each option set from an empty plan cache) in one fresh "
        "worker process per network, one at a time. A cell: planned MB, backend (`seg`xk: k "
        "executor segments), wall seconds of `plan_mirror`; or the error class (listed below). "
        "MB are MXNet's static figures on the CPU.", "",
        f"**Summary:** {facts['networks']} networks, {facts['runs']} runs, {facts['planned']} planned; "
        f"failures: {failures}; {UNREACHABLE} (allowed): {facts['unreachable']}; networks that do "
        f"not build offline: {build}; work-bound skips: {facts['skipped']}; "
        f"fallbacks: {len(facts['fallbacks'])}"
        + (f" ({', '.join(facts['fallbacks'][:8])})" if facts["fallbacks"] else "")
        + f"; plans above the unmirrored one: {len(facts['above'])}"
        + (f" ({', '.join(facts['above'])})" if facts["above"] else "")
        + f"; planning seconds median {facts['seconds_median']:.1f}, max {facts['seconds_max']:.1f} "
        f"({facts['slowest']}); {_codes(rows)}.", "",
    ]
    lines += _table(rows, labels)
    errors = _errors(rows)
    if errors:
        lines += ["", "Errors (stage: error -- runs):", ""] + errors
    if excluded:
        reasons = collections.Counter(net.input for net in excluded)
        lines += ["", f"Left out of the zoo ({len(excluded)} entries): "
                  + "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common()) + "."]
    lines += ["", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
              "`bench/bench_zoo.py`."]
    return "\n".join(lines)
