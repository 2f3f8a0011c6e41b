"""A plan's whole footprint, ``device_memory`` and the largest batch (issue 21 items 1-3)."""
from __future__ import annotations

import json

import mxnet as mx
import pytest

from mxnet_mirror_hook import (BudgetUnreachableError, DeviceMemoryError, MirroredModule, MirrorOptions,
                               OptionError, max_batch, plan_mirror)
from mxnet_mirror_hook.options import option_parser
from mxnet_mirror_hook.tools.cli import main as cli_main

from ..helpers import batches

DATA, LABEL = "data", "softmax_label"


def conv_net(depth: int = 6, channels: int = 16) -> "mx.sym.Symbol":
    """A plain conv/BN/ReLU stack whose activations dominate its footprint."""
    x = mx.sym.var(DATA)
    for i in range(depth):
        x = mx.sym.Convolution(x, num_filter=channels, kernel=(3, 3), pad=(1, 1), name=f"conv{i}")
        x = mx.sym.BatchNorm(x, name=f"bn{i}")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{i}")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=10, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax")


def _plan(batch: int = 32, **kwargs):
    return plan_mirror(conv_net(), [(DATA, (batch, 3, 32, 32))], [(LABEL, (batch,))], **kwargs)


def test_a_plan_counts_its_whole_footprint_and_says_the_total_beside_activations():
    plan = _plan()
    found = plan.footprint
    assert found.activations == plan.planned_mb
    assert found.total > found.activations and found.parameters > 0 and found.inputs > 0
    assert found.optimizer_state == pytest.approx(found.parameters, rel=1e-6)  # SGD momentum assumed
    assert plan.optimizer_label == "sgd momentum 0.9 (assumed)"
    assert f"whole footprint {found.total:.0f} MB with sgd momentum 0.9 (assumed)" in plan.summary()
    assert plan.to_dict()["footprint"]["total"] == pytest.approx(found.total)
    adam = _plan(optimizer="adam")
    assert adam.footprint.optimizer_state == pytest.approx(2 * found.parameters, rel=1e-6)
    assert adam.optimizer_label == "adam"


def test_device_memory_picks_the_least_recomputation_whose_footprint_fits():
    plain = _plan(planner="none").footprint
    roomy = _plan(device_memory=f"{int(plain.total) + 8}MB")
    assert roomy.mirrored == () and roomy.footprint.total <= plain.total + 8
    least = _plan(memory_budget="min").footprint
    device_mb = int((plain.total + least.total) / 2)
    tight = _plan(device_memory=f"{device_mb}MB")
    assert tight.mirrored, "the plain footprint does not fit, so something is recomputed"
    assert tight.footprint.total <= device_mb
    assert f"device {device_mb} MB" in tight.summary()


def test_device_memory_refuses_in_one_line_with_the_smallest_footprint_and_a_batch_that_fits():
    least = _plan(memory_budget="min").footprint
    with pytest.raises(DeviceMemoryError) as caught:
        _plan(device_memory=f"{int(least.total) - 4}MB")
    error = caught.value
    assert isinstance(error, BudgetUnreachableError)
    text = str(error)
    assert "\n" not in text and "smallest footprint reachable" in text and "largest batch" in text
    assert error.footprint_mb == pytest.approx(least.total, abs=2)
    assert error.batch == 32 and 0 < error.largest_batch < 32
    smaller = _plan(batch=error.largest_batch, memory_budget="min")
    assert smaller.footprint.total <= error.device_mb


def test_device_memory_is_a_size_and_not_given_with_an_activation_budget():
    with pytest.raises(OptionError, match="not both"):
        MirrorOptions(device_memory="16GB", memory_budget="4GB")
    with pytest.raises(OptionError, match="size such as '16GB'"):
        MirrorOptions(device_memory=0.5)
    args = option_parser(switch=False).parse_args(["--device-memory", "16GB"])
    assert MirrorOptions.from_args(args).device_memory_mb == 16 * 1024


def test_fit_plans_with_the_optimizer_it_is_given():
    module = MirroredModule(conv_net(depth=3), context=mx.cpu())
    module.fit(mx.io.NDArrayIter(*_arrays(16), batch_size=8), num_epoch=1, optimizer="adam",
               optimizer_params={"learning_rate": 0.001})
    found = module.mirror_plan.footprint
    assert module.mirror_plan.optimizer_label == "adam"
    assert found.optimizer_state == pytest.approx(2 * found.parameters, rel=1e-6)


def _arrays(count: int):
    batch = batches(1, (count, 3, 32, 32), 10)[0]
    return batch.data[0], batch.label[0]


SHAPES = {DATA: (None, 3, 32, 32), LABEL: (None,)}


def _total_at(batch: int, variant_options: dict) -> float:
    plan = plan_mirror(conv_net(), [(DATA, (batch, 3, 32, 32))], [(LABEL, (batch,))], **variant_options)
    return plan.footprint.total


def test_max_batch_fits_at_the_batch_found_and_not_one_above_and_grows_with_the_memory():
    small = max_batch(conv_net(), SHAPES, "120MB", variants=("plain", "one-level"))
    large = max_batch(conv_net(), SHAPES, "240MB", variants=("plain", "one-level"))
    for variant, options in (("plain", {"planner": "none"}), ("one-level", {"memory_budget": "min"})):
        fit = small.fits[variant]
        assert fit.exact and fit.batch > 0
        assert fit.footprint.total == pytest.approx(_total_at(fit.batch, options))
        assert _total_at(fit.batch, options) <= 120 < _total_at(fit.batch + 1, options)
        assert large.fits[variant].batch >= fit.batch
    assert small.fits["one-level"].batch > small.fits["plain"].batch
    assert small.ratio("one-level") > 1


def test_max_batch_command_prints_one_json_object(tmp_path, capsys):
    path = str(tmp_path / "net-symbol.json")
    conv_net(depth=3).save(path)
    code = cli_main(["max-batch", path, "--shape", "data=B,3,32,32", "--shape", "softmax_label=B",
                     "--device-memory", "200MB", "--optimizer", "sgd", "--method", "slope", "--json"])
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    assert set(found) >= {"plain", "one-level", "segments"}
    assert found["optimizer"] == "sgd momentum 0.9"
    for variant in ("plain", "one-level", "segments"):
        assert found[variant]["batch"] > 0 and found[variant]["footprint_mb"] <= 200


def test_mirrored_trainer_plans_count_its_optimizer_and_the_head_gradient():
    from mxnet import gluon

    from mxnet_mirror_hook.gluon import MirroredTrainer

    net = gluon.nn.HybridSequential()
    for _ in range(3):
        net.add(gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
    net.add(gluon.nn.Dense(10))
    net.initialize()
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), "adam", {"learning_rate": 1e-3})
    batch = batches(1, (8, 3, 16, 16), 10)[0]
    trainer.step(batch.data[0], batch.label[0])
    found = trainer.mirror_plan.footprint
    assert trainer.mirror_plan.optimizer_label == "adam"
    assert found.optimizer_state == pytest.approx(2 * found.parameters, rel=1e-6)
    assert found.parameter_copies == 0 and found.head_gradients > 0  # Gluon's, not Module's


def test_the_slope_estimate_is_near_the_search_and_marked_estimated():
    searched = max_batch(conv_net(), SHAPES, "150MB", variants=("plain",))
    estimated = max_batch(conv_net(), SHAPES, "150MB", variants=("plain", "segments"), method="slope")
    assert estimated.fits["plain"].estimated and not searched.fits["plain"].estimated
    # MXNet reports whole MB, so two small probes give the slope to a few percent only.
    assert estimated.fits["plain"].batch == pytest.approx(searched.fits["plain"].batch, rel=0.1)
    segments = estimated.fits["segments"]
    assert segments.batch > 0 and segments.footprint.total <= 150 and segments.steps == 2


def test_an_optimizer_the_footprint_does_not_know_leaves_the_summary_readable():
    plan = _plan().with_footprint(optimizer="notanoptimizer")
    with pytest.raises(ValueError, match="unknown optimizer"):
        plan.footprint
    assert "whole footprint unknown (unknown optimizer 'notanoptimizer'" in plan.summary()
