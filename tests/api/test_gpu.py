"""GPU checks: run only where mxnet-cu112 and a GPU are present (skipped in CI)."""
from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook import MirroredModule, plan_mirror
from mxnet_mirror_hook.testing.models import small_resnet
from tests.helpers import train

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:
        return 0


requires_gpu = pytest.mark.skipif(_gpus() == 0, reason="needs a GPU and the mxnet-cu112 build")


@requires_gpu
def test_mirrored_batchnorm_updates_moving_statistics_once_on_the_gpu():
    """A cuDNN BatchNorm recomputed in backward would update its statistics twice;
    recomputed BatchNorm runs MXNet's own kernel instead (NOTE [ BatchNorm recomputed ])."""
    symbol = small_resnet(num_blocks=4, channels=16)
    shape = (8, 3, 64, 64)
    plain_args, plain_auxs = train(mx.mod.Module(symbol, context=mx.gpu()), shape, 10)
    module = MirroredModule(symbol, context=mx.gpu())
    args, auxs = train(module, shape, 10)
    assert any(name.endswith("_bn") for name in module.mirror_plan.mirrored)
    for name in plain_auxs:  # a double update would be off by ~10% after 3 steps
        np.testing.assert_allclose(auxs[name], plain_auxs[name], rtol=1e-3, atol=1e-4)
    for name in plain_args:  # cuDNN and MXNet's kernel round differently
        np.testing.assert_allclose(args[name], plain_args[name], rtol=1e-3, atol=1e-4)


@requires_gpu
def test_gpu_measured_plan_is_close_to_the_cpu_plan():
    symbol = small_resnet(num_blocks=4, channels=16)
    data = [("data", (32, 3, 64, 64))]
    on_cpu = plan_mirror(symbol, data, cache_dir=False)
    on_gpu = plan_mirror(symbol, data, cost_ctx=mx.gpu(), cache_dir=False)
    assert on_gpu.planned_mb < on_gpu.baseline_mb
    assert abs(on_gpu.planned_mb - on_cpu.planned_mb) <= 0.25 * on_cpu.planned_mb


@requires_gpu
def test_segment_reruns_update_batchnorm_statistics_once_on_the_gpu():
    """Segments before the last run their forward twice; their BatchNorm nodes get
    cudnn_off=True on the GPU (NOTE [ BatchNorm in re-run segments ] in mx/segments/split.py)."""
    symbol = small_resnet(num_blocks=4, channels=16)
    shape = (8, 3, 64, 64)
    plain_args, plain_auxs = train(mx.mod.Module(symbol, context=mx.gpu()), shape, 10)
    module = MirroredModule(symbol, context=mx.gpu(), backend="segments", segments=3,
                            cache_dir=False)
    args, auxs = train(module, shape, 10)
    assert module.mirror_plan.segment_count == 3
    for name in plain_auxs:  # a double update would be off by ~10% after 3 steps
        np.testing.assert_allclose(auxs[name], plain_auxs[name], rtol=1e-3, atol=1e-4)
    for name in plain_args:
        np.testing.assert_allclose(args[name], plain_args[name], rtol=1e-3, atol=1e-4)


@requires_gpu
def test_segments_replay_dropout_masks_on_the_gpu():
    """Replayed Dropout in re-run segments is bound with cudnn_off (MXNet's kernel draws from the
    re-seeded generator; NOTE [ replaying random draws in re-run segments ]): the re-run masks are
    the forward's."""
    from mxnet_mirror_hook.options import MirrorOptions
    from tests.api.test_segment_dropout import MaskRecorder, _batch
    from tests.helpers import dropout_mlp

    module = MirroredModule(dropout_mlp(6, hidden=64), context=mx.gpu(),
                            options=MirrorOptions(cache_dir=False, backend="segments", segments=3,
                                                  recompute_dropout=True))
    module.bind([("data", (32, 48))], [("softmax_label", (32,))])
    module.init_params(mx.init.Xavier())
    recorder = MaskRecorder(module)
    module.forward(_batch(0), is_train=True)
    mx.nd.waitall()
    recorder.phase = "backward"
    module.backward()
    mx.nd.waitall()
    assert recorder.masks["backward"][0]
    for name, mask in recorder.masks["backward"][0].items():
        np.testing.assert_array_equal(mask, recorder.masks["forward"][0][name], err_msg=name)


@requires_gpu
def test_a_plan_with_an_unread_convolution_copy_trains_on_the_gpu():
    """NOTE [ copies nothing reads ]: plans keep recomputed convolutions nothing reads (they
    change MXNet's memory plan); cuDNN's convolution must run them (the non-cuDNN one refuses)."""
    from tests.mx import test_unread_copies as unread

    unread._prepare()
    symbol = small_resnet(4, 16)
    shape = unread.SHAPES[0][1]
    module = MirroredModule(symbol, context=mx.gpu(), planner="test-dead-copy", cache_dir=False)
    args, _ = train(module, shape, 10)
    plain_args, _ = train(mx.mod.Module(symbol, context=mx.gpu()), shape, 10)
    for name in plain_args:
        np.testing.assert_allclose(args[name], plain_args[name], rtol=1e-3, atol=1e-4)


@requires_gpu
def test_fused_operators_train_like_plain_module_on_the_gpu():
    """The fused core attention, LayerNorm and GELU operators (NOTE [ fused recomputation ]) run
    MXNet's backward kernels on the GPU's arrays and keep their buffers per device: two SGD steps of
    a small BERT equal plain Module's within cuBLAS's rounding."""
    from mxnet_mirror_hook.core.fused import fused_counts
    from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
    from mxnet_mirror_hook.planning.fused import plan_fused
    from mxnet_mirror_hook.planning.setup import PlanRequest
    from mxnet_mirror_hook.options import MirrorOptions
    from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes

    symbol = bert_mlm(layers=2, units=64, heads=4, hidden=128, vocab=100, seq_len=32, max_length=32,
                      masked=8, dropout=0.0)
    data, label = bert_mlm_shapes(4, 32, masked=8)
    options = MirrorOptions(cache_dir=False, max_overhead=0.5)
    plan = plan_fused(PlanRequest(data, label).prepare(symbol, options), options)
    graph = symbol_to_graph(plan.symbol, normalize_inputs(sorted(dict(data + label).items())))
    assert fused_counts(graph)["core attention"] == 2
    names = [name for name, _ in data]
    rng = np.random.RandomState(0)
    batch = mx.io.DataBatch([mx.nd.array(rng.randint(0, 100, (4, 32))), mx.nd.zeros((4, 32)),
                             mx.nd.array(np.stack([rng.choice(32, 8, replace=False) for _ in range(4)]))],
                            [mx.nd.array(rng.randint(0, 100, (4, 8)))])
    params = {}
    for which, sym in (("plain", symbol), ("fused", plan.symbol)):
        module = mx.mod.Module(sym, data_names=names, context=mx.gpu())
        module.bind(data, label)
        mx.random.seed(3)
        module.init_params(mx.init.Normal(0.02))
        module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.1})
        for _ in range(2):
            module.forward_backward(batch)
            module.update()
        params[which] = {k: v.asnumpy() for k, v in module.get_params()[0].items()}
    for name, value in params["plain"].items():
        np.testing.assert_allclose(params["fused"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
