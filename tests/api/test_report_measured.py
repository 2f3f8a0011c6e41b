"""``mxnet-mirror report --measured``: one training iteration plain and with the plan, each in a
fresh process under MXNet's storage profiler, drawn over the predicted footprint's parts."""
from __future__ import annotations

import contextlib
import io
import re

import mxnet as mx
import pytest

from mxnet_mirror_hook import MirrorOptions, plan_mirror
from mxnet_mirror_hook.mx.profile import END, PHASES, MemoryTimeline
from mxnet_mirror_hook.testing.models import small_resnet
from mxnet_mirror_hook.tools.cli import main
from mxnet_mirror_hook.tools.memory_picture import (PHASE_WIDTHS, aligned_positions, split_inputs,
                                                    write_measured_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = [("data", (16, 3, 32, 32)), ("softmax_label", (16,))]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """small_resnet planned under 'min' (about a third of the plain activations), both runs profiled."""
    folder = tmp_path_factory.mktemp("measured")
    symbol = small_resnet(num_blocks=6, channels=16)
    options = MirrorOptions(memory_budget="min", cache_dir=str(folder / "plans"))
    data, labels = split_inputs(SHAPES)
    plan = plan_mirror(symbol, data, labels, options=options)
    path = str(folder / "measured.png")
    return write_measured_report(symbol, SHAPES, plan, options, "small_resnet", path), plan, path


def test_the_measured_picture_is_a_non_empty_png(measured):
    _, _, path = measured
    with open(path, "rb") as handle:
        content = handle.read()
    assert content.startswith(PNG_MAGIC) and len(content) > 10_000


def test_both_runs_have_a_timeline_with_a_peak_and_every_phase_in_order(measured):
    report, _, _ = measured
    for timeline in (report.plain, report.mirrored):
        assert timeline.peak_mb > 0
        assert len(timeline.mb) == len(timeline.times_ms) > 10
        assert list(timeline.times_ms) == sorted(timeline.times_ms)
        assert [name for name, _ in timeline.phases] == list(PHASES) + [END]
        assert [t for _, t in timeline.phases] == sorted(t for _, t in timeline.phases)


def test_the_mirrored_peak_is_below_the_plain_peak_when_the_plan_saves_memory(measured):
    report, plan, _ = measured
    assert plan.planned_mb < 0.6 * plan.baseline_mb
    assert report.mirrored.peak_mb < report.plain.peak_mb
    assert report.mirrored.planned_mb == pytest.approx(plan.planned_mb)
    # The parts a plan cannot change are predicted alike for both runs.
    assert report.mirrored_footprint.beside_activations == pytest.approx(
        report.plain_footprint.beside_activations)
    assert report.mirrored_footprint.total < report.plain_footprint.total


def test_phases_line_up_on_one_axis_whatever_each_run_allocates():
    short = MemoryTimeline("a", times_ms=(0.0, 1.0, 2.0, 3.0), mb=(1.0, 2.0, 3.0, 4.0),
                           phases=tuple(zip(PHASES + (END,), (0.0, 0.5, 1.5, 2.5, 3.5, 4.0))))
    long = MemoryTimeline("b", times_ms=tuple(float(t) for t in range(12)), mb=tuple(range(12)),
                          phases=tuple(zip(PHASES + (END,), (0.0, 1.0, 2.0, 8.0, 11.0, 12.0))))
    (xs_short, xs_long), phases = aligned_positions([short, long])
    starts = dict(phases)
    assert starts[END] == pytest.approx(sum(PHASE_WIDTHS))
    # Each run's first event of backward sits at backward's start; events never go backwards.
    assert xs_short[3] == pytest.approx(starts["backward"]) == xs_long[8]
    assert xs_long == sorted(xs_long) and max(xs_long) < starts[END]


def test_the_command_line_writes_the_measured_picture_and_prints_both_peaks(tmp_path):
    data = mx.sym.var("data")
    hidden = data
    for index in range(4):
        hidden = mx.sym.Activation(mx.sym.FullyConnected(hidden, num_hidden=1024, name=f"fc{index}"),
                                   act_type="relu", name=f"relu{index}")
    net = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(hidden, num_hidden=10, name="out"), name="softmax")
    symbol_file = str(tmp_path / "mlp-symbol.json")
    net.save(symbol_file)
    output = str(tmp_path / "mlp.png")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["report", symbol_file, "--shape", "data=64,1024", "--shape", "softmax_label=64",
                     "--measured", "--memory-budget", "min", "--cache-dir", str(tmp_path / "plans"),
                     "-o", output])
    assert code == 0
    found = re.search(r"measured peak (\d+) MB plain, (\d+) MB mirrored", printed.getvalue())
    assert found and int(found.group(1)) > 0 and int(found.group(2)) > 0
    with open(output, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC
