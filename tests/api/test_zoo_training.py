"""Networks of every failure class the zoo sweep found train through ``MirroredModule`` exactly as
through plain ``mx.mod.Module``: repeated operator names (a video network, Xception), the gradient-sum
cap MXNet cannot bind (a residual-attention network), a wide ResNet, and an unrolled language model
whose input is split into more than 64 steps.  One-level plans (``backend='mirror'``), two SGD steps,
parameters, BatchNorm statistics and gradients compared bit for bit, each network in a fresh process
with MKLDNN off (MXNet 1.9.1's MKLDNN cannot hand out the 3-D convolution's gradient views that the
comparison reads: 'Check failed: !is_view', plain Module included)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mxnet_mirror_hook import MirroredModule
from mxnet_mirror_hook.testing.models import gluon_symbol, lstm_language_model
from tests.api.test_equivalence import SyncedModule, train_and_capture
from tests.paths import ROOT


def _zoo(network, shape, **kwargs):
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gluoncv's parameter warnings
            symbol, _ = gluon_symbol(network, classes=10, **kwargs)
        return symbol, shape, (shape[0],)
    return build


def _language_model():
    symbol = lstm_language_model(seq_len=100, vocab=200, num_embed=64, num_hidden=128, num_layers=1)
    return symbol, (16, 100), (16, 100)


NETWORKS = {
    "r2plus1d_resnet18 (repeated names)": _zoo("r2plus1d_resnet18_kinetics400", (1, 3, 4, 32, 32)),
    "xception (repeated names)": _zoo("xception", (1, 3, 64, 64)),
    "cifar_residualattentionnet56 (no bind under the cap)":
        _zoo("cifar_residualattentionnet56", (2, 3, 32, 32)),
    "cifar_wideresnet16_10 (wide)": _zoo("cifar_wideresnet16_10", (2, 3, 32, 32)),
    "LSTM LM, 100 steps (SliceChannel of 100 outputs)": _language_model,
}


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_a_network_of_each_failure_class_trains_bit_identical_to_module(network):
    code = f"from tests.api.test_zoo_training import compare; compare({network!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, MXNET_MKLDNN_ENABLED="0", PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout


def compare(network: str) -> None:
    """Train ``network`` plainly and mirrored in this process; raise unless bit-identical."""
    symbol, data_shape, label_shape = NETWORKS[network]()
    classes = 200 if "LSTM" in network else 10
    plain = train_and_capture(SyncedModule(symbol), data_shape, label_shape, steps=2, classes=classes)
    module = MirroredModule(symbol, backend="mirror", memory_budget="min", cache_dir=False)
    mirrored = train_and_capture(module, data_shape, label_shape, steps=2, classes=classes)
    plan = module.mirror_plan
    assert plan.mirrored and plan.planned_mb < plan.baseline_mb and plan.fallback is None
    for what, left, right in zip(("parameter", "statistic", "gradient"), plain, mirrored):
        assert sorted(left) == sorted(right)
        for name in left:
            np.testing.assert_array_equal(right[name], left[name], err_msg=f"{what} {name} differs")
    print(f"identical: {plan.summary()}")
