"""Mirrored training with MXNet's parameter server on 127.0.0.1 (scheduler, server, 2 workers)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.paths import ROOT  # noqa: E402
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kvstore, surface", [("dist_sync", "module"),
                                              ("dist_device_sync", "module"),
                                              ("dist_sync", "gluon")])
def test_two_workers_train_a_mirrored_model_to_identical_parameters(kvstore, surface, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, DMLC_PS_ROOT_URI="127.0.0.1",
               DMLC_PS_ROOT_PORT=str(_free_port()), DMLC_NUM_SERVER="1", DMLC_NUM_WORKER="2",
               DMLC_INTERFACE="lo", PS_VERBOSE="0")
    roles = [("scheduler", [sys.executable, "-c", "import mxnet"]),
             ("server", [sys.executable, "-c", "import mxnet"]),
             ("worker", [sys.executable, WORKER, kvstore, str(tmp_path), surface]),
             ("worker", [sys.executable, WORKER, kvstore, str(tmp_path), surface])]
    processes = [subprocess.Popen(command, env=dict(env, DMLC_ROLE=role), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for role, command in roles]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for (role, _), process, output in zip(roles, processes, outputs):
        assert process.returncode == 0, f"{role} failed:\n{output[-3000:]}"
    params = [np.load(tmp_path / f"params-{rank}.npz") for rank in (0, 1)]
    plans = [json.loads((tmp_path / f"plan-{rank}.json").read_text()) for rank in (0, 1)]
    assert plans[0]["workers"] == 2
    assert plans[0]["mirrored"] and plans[0]["mirrored"] == plans[1]["mirrored"]
    assert plans[0]["planned_mb"] < plans[0]["baseline_mb"]
    assert sorted(params[0].files) == sorted(params[1].files)
    for name in params[0].files:
        np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
