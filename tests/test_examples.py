"""The examples run (smoke tests, small sizes, CPU)."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@pytest.mark.slow
def test_train_resnet_mirrored_and_plain_report_a_summary():
    import train_resnet

    common = ["--network", "resnet18_v1b", "--batch-size", "4", "--image-size", "64",
              "--num-batches", "2", "--classes", "10"]
    mirrored = train_resnet.main(common + ["--mirror"])
    plain = train_resnet.main(common + ["--no-mirror"])
    assert mirrored["mirror"] and not plain["mirror"]
    assert mirrored["planned_mb"] < mirrored["baseline_mb"]
    assert plain["planned_mb"] is None
    assert mirrored["samples_per_second"] > 0 and plain["samples_per_second"] > 0
