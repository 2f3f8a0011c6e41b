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
