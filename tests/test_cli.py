"""The mxnet-mirror command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mxnet_mirror_hook.cli import main
from mxnet_mirror_hook.models import small_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
