"""The mxnet-mirror command line."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from mxnet_mirror_hook.tools.cli import main
from mxnet_mirror_hook.testing.models import small_resnet

from tests.paths import ROOT  # noqa: E402


@pytest.fixture
def symbol_file(tmp_path):
    path = tmp_path / "net-symbol.json"
    small_resnet(4, 16).save(str(path))
    return str(path)


def test_plan_json_reports_memory_overhead_and_mirrored_nodes(symbol_file, capsys):
    assert main(["plan", symbol_file, "--shape", "data=16,3,64,64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("baseline_mb", "planned_mb", "overhead", "mirrored", "planner"):
        assert key in report
    assert report["planner"] == "auto"
    assert report["planned_mb"] < report["baseline_mb"]
    assert report["mirrored"] and 0 < report["overhead"] < 0.34


def test_plan_text_output_and_saved_symbol(symbol_file, tmp_path, capsys):
    out = str(tmp_path / "mirrored.json")
    code = main(["plan", symbol_file, "--shape", "data=16,3,64,64", "--shape",
                 "softmax_label=16", "--budget", "min", "-o", out])
    assert code == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "planned" in text and "x baseline" in text
    assert "__force_mirroring__" in open(out).read()


@pytest.mark.parametrize("args, message", [
    (["--shape", "data=16,64,64"], "rank"),
    (["--shape", "data=16,3,64,64", "--budget", "lots"], "memory_budget"),
    (["--shape", "data=16,3,64,64", "--budget", "1MB"], "smallest reachable"),
])
def test_bad_input_exits_2_with_a_message(symbol_file, caplog, args, message):
    assert main(["plan", symbol_file] + args) == 2
    assert message in caplog.text


@pytest.mark.parametrize("prefix", [["-m", "mxnet_mirror_hook"], ["-m", "mxnet_mirror_hook.tools.cli"]])
def test_unreachable_budget_is_one_line_on_stderr_and_exit_2(symbol_file, prefix):
    result = subprocess.run([sys.executable] + prefix + ["plan", symbol_file, "--shape", "data=16,3,64,64",
                                                         "--memory-budget", "1MB", "--no-cache"],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "smallest reachable" in line]
    assert len(errors) == 1 and errors[0].count("MB") == 4  # budget, smallest, unmirrored, "at least"


def test_percentage_budget_plans(symbol_file, capsys):
    assert main(["plan", symbol_file, "--shape", "data=16,3,64,64", "--budget", "60%", "--json",
                 "--no-cache"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget"] == "0.6 of baseline" and report["planned_mb"] <= 0.6 * report["baseline_mb"]


def test_unknown_planner_and_malformed_shape_are_usage_errors(symbol_file, capsys):
    with pytest.raises(SystemExit) as error:
        main(["plan", symbol_file, "--shape", "data=16,3,64,64", "--planner", "magic"])
    assert error.value.code == 2
    with pytest.raises(SystemExit):
        main(["plan", symbol_file, "--shape", "data:16"])
    assert "NAME=D1,D2" in capsys.readouterr().err


def test_missing_symbol_file_is_reported(tmp_path, caplog):
    assert main(["plan", str(tmp_path / "absent.json"), "--shape", "data=1,3,8,8"]) == 2
    assert "cannot load symbol" in caplog.text


def test_module_entry_point_runs(symbol_file):
    result = subprocess.run([sys.executable, "-m", "mxnet_mirror_hook", "plan", symbol_file,
                             "--shape", "data=8,3,64,64", "--json", "--no-cache"],
                            capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["planned_mb"] > 0


def _rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_pareto_writes_csv_and_png_with_ours_the_seed_and_mxnets_rule(symbol_file, tmp_path, capsys):
    csv_path, png_path = str(tmp_path / "p.csv"), str(tmp_path / "p.png")
    assert main(["pareto", symbol_file, "--shape", "data=8,3,32,32", "--csv", csv_path,
                 "--png", png_path]) == 0
    rows = _rows(csv_path)
    sources = {row["source"] for row in rows}
    assert sources == {"ours", "seed, raw symbol", "seed, cut-point stages",
                       "MXNET_BACKWARD_DO_MIRROR=1", "max_overhead"}
    limited = [row for row in rows if row["source"] == "max_overhead"]
    assert 1 <= len(limited) <= 4   # one per default limit a plan meets
    for row in limited:             # each plan's estimate within its limit
        limit = float(row["label"].split("=")[1].split(" ")[0])
        assert float(row["estimated_overhead"]) <= limit + 1e-4
        assert 0 < float(row["ratio"]) <= 1.0 + 1e-6
    ours = [row for row in rows if row["source"] == "ours"]
    front = [row for row in ours if row["on_front"] == "True"]
    # The front runs from no recomputation (the baseline) to less memory at more overhead.
    assert any(float(row["estimated_overhead"]) == 0.0 for row in front)
    assert min(float(r["planned_mb"]) for r in front) < max(float(r["planned_mb"]) for r in front)
    by_memory = sorted(front, key=lambda r: float(r["planned_mb"]))
    overheads = [float(r["estimated_overhead"]) for r in by_memory]
    assert overheads == sorted(overheads, reverse=True)
    assert all(row["measured_overhead"] == "" for row in rows)
    with open(png_path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Pareto front" in capsys.readouterr().out


def test_pareto_measure_times_the_front_against_the_plain_symbol(symbol_file, tmp_path):
    csv_path = str(tmp_path / "p.csv")
    assert main(["pareto", symbol_file, "--shape", "data=4,3,32,32", "--measure", "--repeats", "1",
                 "--limits", "0.1", "--csv", csv_path, "--png", str(tmp_path / "p.png")]) == 0
    rows = _rows(csv_path)
    timed = [row for row in rows if row["measured_overhead"] != ""]
    assert any(row["source"] == "MXNET_BACKWARD_DO_MIRROR=1" for row in timed)
    assert any(row["source"] == "ours" and row["on_front"] == "True" and int(row["mirrored_count"])
               for row in timed)
    assert [row["source"] for row in rows].count("max_overhead") == 1
    assert any(row["source"] == "max_overhead" for row in timed)
    for row in timed:
        assert float(row["measured_overhead"]) > -0.9  # a time ratio, not garbage


def test_pareto_refuses_limits_that_are_not_fractions(symbol_file, capsys):
    with pytest.raises(SystemExit):
        main(["pareto", symbol_file, "--shape", "data=4,3,32,32", "--limits", "0.05,fast"])
    assert "--limits takes fractions" in capsys.readouterr().err


def test_max_batch_command_warns_of_nothing_the_user_did_not_ask_for(tmp_path, capsys, caplog):
    """max-batch plans backend='segments' itself at every probe; the segments planner's warning
    for a user who asked for them ("backend='segments' was asked for") is not shown."""
    from .test_device_memory import conv_net

    path = str(tmp_path / "net-symbol.json")
    conv_net(depth=6).save(path)
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook"):
        code = main(["max-batch", path, "--shape", "data=B,3,32,32", "--shape", "softmax_label=B",
                     "--device-memory", "150MB", "--method", "slope", "--no-cache"])
    assert code == 0 and "segments   batch" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # Held back, they are counted in one INFO line (this network's segment plans are above its
    # one-level plans at small batches: the planner warns at each; tests/api/test_max_batch_search.py
    # holds a warning at every plan whatever the planner decides).
    held = [r.getMessage() for r in caplog.records if "held back during max_batch's probes" in r.getMessage()]
    assert len(held) <= 1 and all("was asked for" in line for line in held)
