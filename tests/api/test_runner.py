"""Switching mirroring on in unmodified scripts, and the --mirror flag helpers."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import pytest

from mxnet_mirror_hook import MirroredBucketingModule, MirroredModule, add_arguments, from_args
from mxnet_mirror_hook.runner import mirrored_modules

from tests.paths import ROOT  # noqa: E402

SCRIPT = textwrap.dedent("""
    # An ordinary Module training script: it knows nothing about mirroring.
    import json, sys
    import mxnet as mx
    from mxnet_mirror_hook.testing.models import preact_resnet_cifar
    symbol = preact_resnet_cifar(164)
    module = mx.mod.Module(symbol, context=mx.cpu())
    module.bind([("data", (32, 3, 32, 32))], [("softmax_label", (32,))])
    module.init_params(mx.init.Xavier())
    module.init_optimizer()
    batch = mx.io.DataBatch([mx.nd.ones((32, 3, 32, 32))], [mx.nd.ones((32,))])
    module.forward_backward(batch)
    module.update()
    mx.nd.waitall()
    print(json.dumps({"class": type(module).__name__, "planned_mb": module._total_exec_bytes,
                      "argv": sys.argv[1:]}))
""")


def _run(args, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    command = [sys.executable] + [a if a != "SCRIPT" else str(script) for a in args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_module_flag_at_least_halves_an_unmodified_deep_resnet_script(tmp_path):
    plain = _run(["SCRIPT", "--epochs", "1"], tmp_path)
    mirrored = _run(["-m", "mxnet_mirror_hook", "--memory-budget", "min", "SCRIPT", "--epochs", "1"],
                    tmp_path)
    assert plain["class"] == "Module" and mirrored["class"] == "MirroredModule"
    assert mirrored["argv"] == ["--epochs", "1"]  # the script's own arguments pass through
    assert mirrored["planned_mb"] <= 0.5 * plain["planned_mb"]


def test_runner_reports_a_missing_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mxnet_mirror_hook", str(tmp_path / "nope.py")],
                            capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode != 0 and "no training script" in result.stderr


def test_patch_is_undone_after_the_block_and_passes_options():
    original = mx.mod.Module
    with mirrored_modules(memory_budget="min", cache_dir=False):
        assert issubclass(mx.mod.Module, MirroredModule)
        assert issubclass(mx.mod.BucketingModule, MirroredBucketingModule)
        symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3),
                                      name="softmax")
        assert mx.mod.Module(symbol).mirror_options.memory_budget == "min"
    assert mx.mod.Module is original


def test_add_arguments_and_from_args():
    parser = add_arguments(argparse.ArgumentParser())
    assert from_args(parser.parse_args([])) is mx.mod.Module
    assert from_args(parser.parse_args([]), bucketing=True) is mx.mod.BucketingModule
    factory = from_args(parser.parse_args(["--mirror", "--memory-budget", "0.5"]))
    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3),
                                  name="softmax")
    module = factory(symbol, context=mx.cpu())
    assert isinstance(module, MirroredModule) and module.mirror_options.memory_budget == "0.5"
    with pytest.raises(ValueError):
        from_args(parser.parse_args(["--mirror", "--memory-budget", "lots"]))


# ------------------------------------------------------------- the script's logging
SMALL_SCRIPT = textwrap.dedent("""
    import logging
    import mxnet as mx
    from mxnet_mirror_hook.testing.models import small_resnet
    {configure}
    logging.debug("script's own debug line")
    module = mx.mod.Module(small_resnet(), context=mx.cpu())
    module.bind([("data", (16, 3, 64, 64))], [("softmax_label", (16,))])
    print("bound", type(module).__name__)
""")


def _run_small(tmp_path, runner_args, configure=""):
    script = tmp_path / "small.py"
    script.write_text(SMALL_SCRIPT.format(configure=configure))
    command = [sys.executable, "-m", "mxnet_mirror_hook", "--no-cache"] + runner_args + [str(script)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT,
                                   MXNET_MIRROR_HOOK_CACHE_DIR=str(tmp_path / "cache")))


def test_runner_keeps_the_scripts_logging_format_and_level(tmp_path):
    result = _run_small(tmp_path, ["--memory-budget", "60%"],
                        "logging.basicConfig(format='CUSTOM %(message)s', level=logging.DEBUG)")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert "CUSTOM script's own debug line" in lines  # the script's level (DEBUG) and format
    assert any(line.startswith("CUSTOM mirror plan [auto, budget 0.6 of baseline") for line in lines)
    assert not any(line.startswith("INFO mxnet_mirror_hook") for line in lines)  # no second handler
    assert "bound MirroredModule" in result.stdout


def test_runner_shows_the_plan_line_when_the_script_configures_no_logging(tmp_path):
    result = _run_small(tmp_path, [])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "INFO mxnet_mirror_hook.plan: mirror plan [auto" in result.stderr
    assert "script's own debug line" not in result.stderr  # root stays at its default level


def test_runner_respects_a_scripts_quieter_level(tmp_path):
    result = _run_small(tmp_path, [], "logging.basicConfig(format='CUSTOM %(message)s', "
                                      "level=logging.WARNING)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mirror plan" not in result.stderr


def test_unreachable_budget_through_the_runner_is_one_line_and_exit_2(tmp_path):
    result = _run_small(tmp_path, ["--memory-budget", "1MB"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "smallest reachable" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m mxnet_mirror_hook: error: memory budget")
    assert "bound" not in result.stdout


def test_nonsense_budget_is_a_usage_error_before_the_script_runs(tmp_path):
    result = _run_small(tmp_path, ["--memory-budget", "lots"])
    assert result.returncode == 2 and "memory_budget 'lots'" in result.stderr
    assert "Traceback" not in result.stderr and "bound" not in result.stdout


def test_logging_is_put_back_after_the_runner(tmp_path):
    import logging

    from mxnet_mirror_hook.runner import script_logging

    package = logging.getLogger("mxnet_mirror_hook")
    before = package.level, package.propagate, list(package.handlers)
    with script_logging():
        assert not package.propagate
    assert (package.level, package.propagate, list(package.handlers)) == before
