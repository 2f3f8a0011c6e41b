"""MirroredBucketingModule against BucketingModule over mixed buckets."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from mxnet_mirror_hook import MirroredBucketingModule


def sym_gen(seq_len):
    """Embedding, a chain of 1-D convolutions over the sequence, then a per-sequence class."""
    data = mx.sym.var("data")
    x = mx.sym.Embedding(data, input_dim=200, output_dim=64, name="embed")
    x = mx.sym.transpose(x, axes=(0, 2, 1), name="to_ncw")
    for i in range(6):
        x = mx.sym.Convolution(x, num_filter=64, kernel=(3,), pad=(1,), name=f"conv{i}")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{i}")
    x = mx.sym.Pooling(x, global_pool=True, kernel=(1,), pool_type="max", name="pool")
    x = mx.sym.FullyConnected(mx.sym.Flatten(x), num_hidden=5, name="fc")
    return mx.sym.SoftmaxOutput(x, name="softmax"), ("data",), ("softmax_label",)


def _train(module):
    mx.random.seed(0)
    module.bind([("data", (64, 128))], [("softmax_label", (64,))])
    module.init_params(mx.init.Xavier())
    module.init_optimizer(optimizer_params={"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
    rng = np.random.RandomState(0)
    for length in (128, 32, 64, 128, 32):
        batch = mx.io.DataBatch([mx.nd.array(rng.randint(0, 200, (64, length)))],
                                [mx.nd.array(rng.randint(0, 5, 64))], bucket_key=length,
                                provide_data=[("data", (64, length))],
                                provide_label=[("softmax_label", (64,))])
        module.forward_backward(batch)
        module.update()
    mx.nd.waitall()
    args, _ = module.get_params()
    return {k: v.asnumpy() for k, v in args.items()}


def test_mixed_buckets_train_like_bucketing_module_with_a_plan_per_bucket():
    plain = _train(mx.mod.BucketingModule(sym_gen, default_bucket_key=128))
    module = MirroredBucketingModule(sym_gen, default_bucket_key=128)
    mirrored = _train(module)
    assert sorted(module.mirror_plans) == [32, 64, 128]
    for plan in module.mirror_plans.values():
        assert plan.mirrored and plan.planned_mb < plan.baseline_mb
    assert module.mirror_plans[128].baseline_mb > module.mirror_plans[32].baseline_mb
    for name in plain:
        np.testing.assert_array_equal(mirrored[name], plain[name], err_msg=name)


def test_rebinding_keeps_parameters():
    module = MirroredBucketingModule(sym_gen, default_bucket_key=32)
    before = _train(module)
    module.bind([("data", (64, 32))], [("softmax_label", (64,))], force_rebind=True)
    args, _ = module.get_params()
    for name, value in before.items():
        np.testing.assert_array_equal(args[name].asnumpy(), value)


def _sentence_iter(buckets, batch_size=8, count=64, vocab=30):
    rng = np.random.RandomState(1)
    sentences = [list(rng.randint(1, vocab, rng.choice(buckets))) for _ in range(count)]
    return mx.rnn.BucketSentenceIter(sentences, batch_size, buckets=buckets, invalid_label=0)


def _language_model(seq_len):
    from mxnet_mirror_hook.testing.models import lstm_language_model

    return (lstm_language_model(seq_len, vocab=30, num_embed=16, num_hidden=16),
            ("data",), ("softmax_label",))


def test_fit_plans_every_announced_bucket_before_the_first_batch(caplog):
    train = _sentence_iter([4, 8, 12])
    module = MirroredBucketingModule(_language_model, default_bucket_key=train.default_bucket_key,
                                     memory_budget="min")
    with caplog.at_level("INFO", logger="mxnet_mirror_hook"):
        module.fit(train, num_epoch=1, optimizer="sgd", optimizer_params={"learning_rate": 0.1})
    assert "planned 2 buckets up front" in caplog.text
    plans = module.mirror_plans
    assert sorted(plans) == [4, 8, 12]
    # Buckets other than the default were planned before their first batch: their binds
    # found the plan in the cache.
    assert all(plans[key].from_cache for key in (4, 8))
    assert not plans[12].from_cache
    # Every plan line names the shapes it was made for.
    assert "data 8x4" in caplog.text and "data 8x12" in caplog.text


def test_bucket_shapes_follow_the_time_axis_or_the_one_matching_axis():
    from mxnet.io import DataDesc

    from mxnet_mirror_hook.bucketing import bucket_shapes

    ntc = [DataDesc("data", (32, 60), layout="NT")]
    assert bucket_shapes(ntc, 60, 20)[0].shape == (32, 20)
    plain = [DataDesc("data", (32, 60, 7))]
    assert bucket_shapes(plain, 60, 10)[0].shape == (32, 10, 7)
    ambiguous = [DataDesc("data", (60, 60))]
    assert bucket_shapes(ambiguous, 60, 10) is None
    assert bucket_shapes(ntc, "default", "other") is None


def _one_level_decisions(monkeypatch, overheads):
    """Plans as 'auto' makes them when it keeps the one-level plan, with the estimated overhead of
    each sequence length set to ``overheads[length]`` (the planner's own estimates of these small
    buckets are alike; the test is about what the bucketing module does with them)."""
    import dataclasses

    from mxnet_mirror_hook import module as module_module

    real = module_module.plan_mirror
    calls = []

    def planned(symbol, data, *args, options, **kwargs):
        calls.append((data[0].shape[1], options))
        one_level = options.replace(backend="mirror") if options.backend == "auto" else options
        plan = real(symbol, data, *args, options=one_level, **kwargs)
        if options.planner == "none":
            return plan
        return dataclasses.replace(plan, overhead=overheads[data[0].shape[1]])

    monkeypatch.setattr(module_module, "plan_mirror", planned)
    return calls


def test_every_bucket_is_planned_under_the_modules_options_and_held_to_its_max_overhead(monkeypatch, caplog):
    calls = _one_level_decisions(monkeypatch, {128: 0.04, 64: 0.03, 32: 0.2})
    plain = _train(mx.mod.BucketingModule(sym_gen, default_bucket_key=128))
    module = MirroredBucketingModule(sym_gen, default_bucket_key=128, max_overhead=0.05, cache_dir=False)
    with caplog.at_level("WARNING", logger="mxnet_mirror_hook"):
        mirrored = _train(module)
    # Every bucket's options are the module's, field for field, but the backend the default chose.
    for length, options in calls:
        expected = module.mirror_options if length == 128 else module.mirror_options.replace(backend="mirror")
        assert options.replace(planner=expected.planner, memory_budget=expected.memory_budget) == expected
        assert options.max_overhead == 0.05
        if length != 128 and options.planner != "none":  # as 'auto' plans the default bucket's
            assert options.budget.kind == "overhead" and options.budget.overhead_limit == 0.05
    plans = module.mirror_plans
    assert plans[128].overhead <= 0.05 and plans[64].overhead <= 0.05
    # Bucket 32's one-level plan is estimated above the limit: it recomputes nothing, said once.
    assert plans[32].overhead == 0.0 and plans[32].mirrored == ()
    assert plans[32].planned_mb == plans[32].baseline_mb
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bucket 32")]
    assert len(said) == 1 and "max_overhead=0.05" in said[0] and "recomputes nothing" in said[0]
    for name in plain:
        np.testing.assert_array_equal(mirrored[name], plain[name], err_msg=name)


def test_buckets_are_not_held_to_a_limit_the_default_bucket_was_not_held_to(monkeypatch):
    """When the default bucket's one-level plan is above max_overhead, the others are not held to
    the limit either (nothing falls back to recomputing nothing); they are planned as 'auto' plans
    one-level plans under the limit."""
    calls = _one_level_decisions(monkeypatch, {128: 0.2, 64: 0.2, 32: 0.2})
    module = MirroredBucketingModule(sym_gen, default_bucket_key=128, max_overhead=0.05, cache_dir=False)
    _train(module)
    assert module.overhead_limit(32) is None
    assert all(plan.overhead == 0.2 for plan in module.mirror_plans.values())
    assert {options.budget.kind for length, options in calls if length != 128} == {"overhead"}


def test_a_bucket_planned_up_front_and_bound_later_is_warned_of_once(monkeypatch, caplog):
    _one_level_decisions(monkeypatch, {128: 0.04, 64: 0.03, 32: 0.2})
    module = MirroredBucketingModule(sym_gen, default_bucket_key=128, max_overhead=0.05, cache_dir=False)
    module.bind([("data", (64, 128))], [("softmax_label", (64,))])
    module.init_params(mx.init.Xavier())
    with caplog.at_level("WARNING", logger="mxnet_mirror_hook"):
        planned = module.prepare_buckets([32, 64], [("data", (64, 128))], [("softmax_label", (64,))])
        for length in (32, 64):
            module.switch_bucket(length, [("data", (64, length))], [("softmax_label", (64,))])
    assert planned[32].mirrored == () and planned[64].overhead <= 0.05
    assert module.mirror_plans[32].mirrored == () and module.mirror_plans[64].overhead <= 0.05
    assert sum(r.getMessage().startswith("bucket 32") for r in caplog.records) == 1
