"""The examples run (smoke tests, small sizes, CPU), and the report picture is drawn."""
from __future__ import annotations

import os
import struct
import sys

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.tools.cli import main as cli_main
from mxnet_mirror_hook.testing.models import small_resnet

from tests.paths import ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "examples"))

SMALL = ["--network", "resnet18_v1b", "--batch-size", "4", "--image-size", "64",
         "--num-batches", "2", "--classes", "10"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["module", "gluon"])
def test_train_resnet_mirrored_and_plain_report_a_summary(mode):
    import train_resnet

    mirrored = train_resnet.main(SMALL + ["--mode", mode, "--mirror"])
    plain = train_resnet.main(SMALL + ["--mode", mode, "--no-mirror"])
    assert mirrored["mirror"] and not plain["mirror"]
    assert mirrored["planned_mb"] < mirrored["baseline_mb"]
    assert plain["planned_mb"] is None
    assert mirrored["samples_per_second"] > 0 and np.isfinite(mirrored["final_loss"])


def _write_rec(path, count=8, size=72):
    import cv2  # noqa: F401  (pack_img needs OpenCV)

    writer = mx.recordio.MXRecordIO(str(path), "w")
    rng = np.random.RandomState(0)
    for i in range(count):
        image = rng.randint(0, 255, (size, size, 3)).astype(np.uint8)
        header = mx.recordio.IRHeader(0, float(i % 10), i, 0)
        writer.write(mx.recordio.pack_img(header, image, quality=90, img_fmt=".jpg"))
    writer.close()


@pytest.mark.slow
def test_train_resnet_reads_a_recordio_file(tmp_path):
    import train_resnet

    rec = tmp_path / "tiny.rec"
    _write_rec(rec)
    summary = train_resnet.main(SMALL + ["--rec", str(rec)])
    assert summary["iterations"] == 2 and np.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_find_max_batch_fits_more_with_mirroring():
    import train_resnet

    found = train_resnet.main(["--network", "resnet18_v1b", "--image-size", "64", "--classes", "10",
                               "--find-max-batch", "300MB"])
    assert 1 <= found["plain"] < found["mirrored"]


@pytest.mark.slow
def test_lstm_bucketing_example_trains_every_bucket():
    import train_lstm_bucketing

    summary = train_lstm_bucketing.main(["--sentences", "256", "--num-hidden", "64",
                                         "--num-embed", "32", "--num-layers", "1"])
    assert summary["buckets"] == [8, 16, 24, 32]
    assert np.isfinite(summary["perplexity"]) and summary["perplexity"] < 200  # it learned


def test_report_draws_a_png(tmp_path, capsys):
    symbol_file = tmp_path / "net-symbol.json"
    small_resnet(4, 16).save(str(symbol_file))
    out = tmp_path / "report.png"
    assert cli_main(["report", str(symbol_file), "--shape", "data=16,3,64,64", "-o", str(out)]) == 0
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width >= 800 and height >= 400
    assert "->" in capsys.readouterr().out


def test_timeline_model_recomputes_only_in_backward_and_peaks_lower():
    from mxnet_mirror_hook.core.timeline import simulate_timeline
    from tests.graphs import residual

    graph = residual(6)
    mirrored = frozenset(n for n in graph.mirrorable_names if not n.endswith("_out"))
    baseline, planned = simulate_timeline(graph, frozenset()), simulate_timeline(graph, mirrored)
    last_forward = max(i for i, p in enumerate(planned) if p.phase == "forward")
    recomputes = [i for i, p in enumerate(planned) if p.phase == "recompute"]
    assert recomputes and min(recomputes) > last_forward
    assert max(p.live_bytes for p in planned) < max(p.live_bytes for p in baseline)
    assert baseline[-1].live_bytes == 0 and planned[-1].live_bytes == 0
