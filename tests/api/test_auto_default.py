"""``backend='auto'`` is the default everywhere and decides on the whole footprint (NOTE [ auto
decides on the whole footprint ] in planning/chain_footprint.py)."""
from __future__ import annotations

import dataclasses
import inspect

import mxnet as mx
import pytest

from mxnet_mirror_hook import MirroredBucketingModule, MirroredModule, MirrorOptions, plan_mirror
from mxnet_mirror_hook.gluon import MirroredTrainer, mirror, mirror_state
from mxnet_mirror_hook.options import OPTION_DOCS, option_parser
from mxnet_mirror_hook.planning import chain_footprint
from mxnet_mirror_hook.planning.chain_footprint import (SUMMED_GRADIENT_COPIES, chain_copies_bytes,
                                                       compare_backends, decision_tag, segment_footprint)
from mxnet_mirror_hook.runner import build_parser
from mxnet_mirror_hook.testing.models import lstm_language_model
from mxnet_mirror_hook.tools.cli import build_parser as cli_parser


def _language_model(steps: int = 24) -> "mx.sym.Symbol":
    """An unrolled LSTM language model: the segments' case (every step feeds one softmax).  At
    batch 32 without MKLDNN, 'auto' takes 11 segments (about 5 MB against 10 MB one-level)."""
    return lstm_language_model(steps, vocab=300, num_embed=128, num_hidden=128, num_layers=2)


def _shapes(steps: int = 24):
    return [("data", (32, steps))], [("softmax_label", (32, steps))]


@pytest.fixture
def no_mkldnn(monkeypatch):
    """The decision made as on a CPU without MKLDNN (no copies at the cuts), where the segments of
    :func:`_language_model` win, as the plugin reads it (``env.mkldnn_switched_off``).
    MXNET_MKLDNN_ENABLED itself is left alone: MXNet reads it once per process, and a test must not
    switch MKLDNN off for the tests after it."""
    monkeypatch.setattr(chain_footprint.env, "mkldnn_switched_off", lambda: True)


def _dense_net() -> "mx.gluon.HybridBlock":
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(8, activation="relu"), mx.gluon.nn.Dense(3))
    return net


def test_auto_is_the_default_of_the_options_and_of_their_documentation():
    assert MirrorOptions().backend == "auto"
    text = dict((name, doc) for name, _, doc in OPTION_DOCS)["backend"]
    assert text.startswith("``'auto'`` (the default")
    assert "bit for bit" in text and "``'mirror'``" in text
    assert "the default" in MirrorOptions.__doc__.split("backend : str")[1].split("segments :")[0]


def test_auto_is_the_default_of_every_surface():
    assert MirroredModule(_language_model()).mirror_options.backend == "auto"
    bucketing = MirroredBucketingModule(lambda key: (_language_model(key), ("data",), ("softmax_label",)),
                                        default_bucket_key=24)
    assert bucketing.mirror_options.backend == "auto"
    net = mirror(_dense_net())
    assert mirror_state(net).options.backend == "auto"
    trainer_net = _dense_net()
    trainer_net.initialize()
    MirroredTrainer(trainer_net, mx.gluon.loss.SoftmaxCrossEntropyLoss(), "sgd")
    assert mirror_state(trainer_net).options.backend == "auto"
    for surface in (plan_mirror, mirror, MirroredModule, MirroredBucketingModule, MirroredTrainer):
        assert inspect.signature(surface).parameters["backend"].default is None  # None: the options'


def test_auto_is_the_default_of_the_runner_and_the_command_line():
    args = build_parser().parse_args(["train.py"])
    assert MirrorOptions.from_args(args).backend == "auto"
    args = option_parser().parse_args([])
    assert MirrorOptions.from_args(args).backend == "auto"
    assert MirrorOptions.from_args(option_parser().parse_args(["--backend", "mirror"])).backend == "mirror"
    plan_args = cli_parser().parse_args(["plan", "net.json", "--shape", "data=1,3"])
    assert MirrorOptions.from_args(plan_args).backend == "auto"
    assert "auto (the default" in build_parser().format_help().replace("\n", " ").replace("  ", " ")


def test_default_plan_goes_through_the_auto_decision():
    data, labels = _shapes()
    symbol = _language_model()
    plan = plan_mirror(symbol, data, labels, cache_dir=False)
    one_level = plan_mirror(symbol, data, labels, cache_dir=False, backend="mirror")
    assert plan.backend in ("mirror", "segments")
    if plan.backend == "mirror":
        assert plan.mirrored == one_level.mirrored
    assert plan.footprint.total <= one_level.footprint.total


def test_chain_copies_count_cut_tensors_and_summed_weights_on_a_cpu_with_mkldnn_only(monkeypatch):
    data, labels = _shapes()
    plan = plan_mirror(_language_model(), data, labels, cache_dir=False, backend="segments", segments=3)
    source = plan.footprint_source
    monkeypatch.setattr(chain_footprint.env, "mkldnn_switched_off", lambda: False)  # not MXNet's env
    # The boundaries once, and six copies of the LSTM weights every segment reads (summed gradients):
    summed = chain_footprint._summed_mkldnn_weights(source, plan.segment_plan)
    assert summed == 4 * (4 * 128) * 128 * 4  # i2h and h2h weights (4 gates x 128, 128) of two layers
    assert chain_copies_bytes(source, plan.segment_plan) == \
        plan.segment_plan.boundary_bytes + SUMMED_GRADIENT_COPIES * summed
    assert plan.segment_plan.boundary_bytes > 0
    assert decision_tag(source) == "@cpu+mkldnn"
    with_copies = segment_footprint(source, plan.planned_mb, plan.segment_plan)
    assert with_copies.mkldnn_copies > source.footprint(plan.planned_mb, 3).mkldnn_copies
    assert chain_copies_bytes(source, None) == 0
    assert chain_copies_bytes(source.replace(device="gpu"), plan.segment_plan) == 0
    assert decision_tag(source.replace(device="gpu")) == "@gpu"
    monkeypatch.setattr(chain_footprint.env, "mkldnn_switched_off", lambda: True)
    assert chain_copies_bytes(source, plan.segment_plan) == 0
    assert decision_tag(source) == "@cpu"


def test_auto_keeps_the_one_level_plan_when_the_chain_footprint_is_larger(monkeypatch, tmp_path, no_mkldnn):
    data, labels = _shapes()
    symbol = _language_model()
    one_level = plan_mirror(symbol, data, labels, cache_dir=False, backend="mirror")
    taken = plan_mirror(symbol, data, labels, cache_dir=str(tmp_path / "a"), backend="auto")
    assert taken.backend == "segments", "the test needs a network where 'auto' takes segments"
    compared = compare_backends(taken.footprint_source, one_level.planned_mb, taken.planned_mb,
                                taken.segment_plan)
    assert compared.segments_win and taken.footprint.total < one_level.footprint.total
    # Copies at the cuts large enough to put the chain above the one-level plan:
    excess = int((one_level.footprint.total + 50) * 2 ** 20)
    monkeypatch.setattr(chain_footprint, "chain_copies_bytes", lambda source, plan: excess if plan else 0)
    kept = plan_mirror(symbol, data, labels, cache_dir=str(tmp_path / "b"), backend="auto")
    assert kept.backend == "mirror" and kept.segment_plan is None
    assert kept.mirrored == one_level.mirrored and kept.planned_mb == one_level.planned_mb
    assert any(c["label"].startswith("segments x") for c in kept.candidates)


def test_auto_keeps_the_one_level_plan_when_the_margin_is_not_met(monkeypatch, tmp_path, no_mkldnn):
    """Segments lower by less than the margin (10% of the one-level activations) are not taken."""
    data, labels = _shapes()
    symbol = _language_model()
    one_level = plan_mirror(symbol, data, labels, cache_dir=False, backend="mirror")
    taken = plan_mirror(symbol, data, labels, cache_dir=str(tmp_path / "a"), backend="auto")
    base = compare_backends(taken.footprint_source, one_level.planned_mb, taken.planned_mb,
                            taken.segment_plan)
    # Copies at the cuts that leave the chain only 5% of the one-level activations below it.
    real_mb = chain_copies_bytes(taken.footprint_source, taken.segment_plan) / 2 ** 20
    extra_mb = real_mb - 0.05 * one_level.planned_mb - base.excess_mb()
    assert extra_mb > 0
    monkeypatch.setattr(chain_footprint, "chain_copies_bytes",
                        lambda source, plan: int(extra_mb * 2 ** 20) if plan else 0)
    kept = plan_mirror(symbol, data, labels, cache_dir=str(tmp_path / "b"), backend="auto")
    assert kept.backend == "mirror"


def test_bucketing_with_auto_binds_every_bucket_with_the_default_buckets_backend(no_mkldnn):
    def sym_gen(key):
        return _language_model(key), ("data",), ("softmax_label",)

    module = MirroredBucketingModule(sym_gen, default_bucket_key=24, cache_dir=False)
    assert module.bucket_options(12).backend == "mirror"  # nothing decided before the bind
    module.bind(*_shapes(24))
    module.init_params(mx.init.Xavier())
    chosen = module.mirror_plans[24].backend
    assert chosen == "segments"
    assert module.bucket_options(24).backend == "auto"
    assert module.bucket_options(12).backend == chosen
    module.switch_bucket(12, *_shapes(12))
    assert {plan.backend for plan in module.mirror_plans.values()} == {chosen}
    assert module._buckets[12].mirror_options.backend == chosen


@pytest.mark.parametrize("backend", ["mirror", "segments"])
def test_bucketing_follows_a_forced_default_bucket_decision(monkeypatch, backend):
    def sym_gen(key):
        return _language_model(key), ("data",), ("softmax_label",)

    module = MirroredBucketingModule(sym_gen, default_bucket_key=24, cache_dir=False)
    module.bind(*_shapes(24))
    plan = module.mirror_plans[24]
    monkeypatch.setattr(module._buckets[24], "mirror_plan", dataclasses.replace(plan, backend=backend))
    assert module.bucket_options(12).backend == backend
