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
