"""Dropout inside executor segments: ``backend='segments'`` with ``recompute_dropout=True``.

What holds (docs/guarantees.md): a re-run segment draws exactly the masks its forward drew
(NOTE [ replaying random draws in re-run segments ] in mx/segments/chain.py), so the gradients are
those of the masks used in forward: training equals, bit for bit, a plain ``Module`` of the same
network with each Dropout replaced by a product with the masks the segments drew.  The masks drop
a fraction p at MXNet's scale.  They are not the draws a plain Module would make at the same
seed (the stream is re-seeded per segment), and the user's stream advances deterministically.
Without the option, or with random operators re-seeding is not known to replay, segments refuse
the network.
"""
from __future__ import annotations

import json
from typing import Dict, List

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook import BackendError, MirroredModule, plan_mirror
from mxnet_mirror_hook.core.graph import replays_random
from mxnet_mirror_hook.mx.dropout import dropout_scale
from mxnet_mirror_hook.mx.segments import SegmentChain, segment_documents
from mxnet_mirror_hook.options import MirrorOptions
from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes
from tests.helpers import dropout_mlp, reordered_symbol

SHAPE, CLASSES = (32, 48), 10


def _options(**kwargs) -> MirrorOptions:
    return MirrorOptions(cache_dir=False, backend="segments", recompute_dropout=True, **kwargs)


class MaskRecorder:
    """Monitor of every segment executor of a MirroredModule: the Dropout masks each segment
    computes, per phase ('forward' while ``phase`` says so, then 'backward')."""

    def __init__(self, module: mx.mod.Module) -> None:
        self.phase = "forward"
        self.masks: Dict[str, List[Dict[str, np.ndarray]]] = {"forward": [], "backward": []}
        self.chains = module._exec_group.execs
        for device, chain in enumerate(self.chains):
            for executor in chain.executors:
                executor.set_monitor_callback(self._callback(device), monitor_all=True)
        self.reset()

    def reset(self) -> None:
        self.masks = {"forward": [{} for _ in self.chains], "backward": [{} for _ in self.chains]}

    def _callback(self, device: int):
        def record(name, handle):
            name = name.decode() if isinstance(name, bytes) else name
            if name.endswith("_mask"):
                array = mx.nd.NDArray(mx.base.ctypes.cast(handle, mx.base.NDArrayHandle), writable=False)
                self.masks[self.phase][device][name[: -len("_mask")]] = array.asnumpy().copy()
        return record


def _batch(step: int, shape=SHAPE) -> mx.io.DataBatch:
    rng = np.random.RandomState(100 + step)
    return mx.io.DataBatch([mx.nd.array(rng.uniform(-1, 1, shape))],
                           [mx.nd.array(rng.randint(0, CLASSES, shape[0]))])


def _with_mask_inputs(symbol: "mx.sym.Symbol") -> "mx.sym.Symbol":
    """``symbol`` with each Dropout named N replaced by ``N_data * N_maskin`` (a data input)."""
    document = json.loads(symbol.tojson())
    for node in document["nodes"]:
        if node["op"] == "Dropout":
            mask_index = len(document["nodes"])
            document["nodes"].append({"op": "null", "name": node["name"] + "_maskin", "inputs": []})
            node.update(op="elemwise_mul", inputs=[node["inputs"][0], [mask_index, 0, 0]],
                        attrs={})
    return reordered_symbol(document)  # the appended variables moved before their readers


def _train_segmented(symbol, steps: int, contexts: int = 1, segments: int = 3):
    module = MirroredModule(symbol, context=[mx.cpu(i) for i in range(contexts)],
                            options=_options(segments=segments))
    mx.random.seed(0)
    module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.1, "momentum": 0.9,
                                                              "wd": 1e-4})
    recorder = MaskRecorder(module)
    history = []
    mx.random.seed(7)
    for step in range(steps):
        recorder.reset()
        recorder.phase = "forward"
        module.forward(_batch(step), is_train=True)
        mx.nd.waitall()
        recorder.phase = "backward"
        module.backward()
        module.update()
        mx.nd.waitall()
        history.append(recorder.masks)
    return module, history


def test_rerun_segments_draw_exactly_the_masks_their_forward_drew():
    module, history = _train_segmented(dropout_mlp(6, hidden=64), steps=2)
    plan = module.mirror_plan
    assert plan.backend == "segments" and plan.segment_count == 3 and plan.segment_plan.replay_random
    for masks in history:
        forward, backward = masks["forward"][0], masks["backward"][0]
        assert sorted(forward) == [f"drop{i}" for i in range(6)]
        assert backward, "no segment with Dropout was re-run"
        for name, mask in backward.items():
            np.testing.assert_array_equal(mask, forward[name], err_msg=name)
    # A new iteration draws new masks.
    assert not np.array_equal(history[0]["forward"][0]["drop0"], history[1]["forward"][0]["drop0"])


def test_training_equals_a_plain_module_fed_the_masks_forward_drew():
    """Three SGD steps (momentum, weight decay): parameters and gradients bit for bit those of a
    plain Module whose Dropouts are products with the masks the segments drew."""
    symbol = dropout_mlp(6, hidden=64)
    module, history = _train_segmented(symbol, steps=3)
    reference_symbol = _with_mask_inputs(symbol)
    names = [f"drop{i}" for i in range(6)]
    data_names = ["data"] + [n + "_maskin" for n in names]
    plain = mx.mod.Module(reference_symbol, data_names=data_names, context=mx.cpu())
    mx.random.seed(0)
    plain.bind([("data", SHAPE)] + [(n + "_maskin", (SHAPE[0], 64)) for n in names],
               [("softmax_label", (SHAPE[0],))])
    plain.init_params(mx.init.Xavier(magnitude=2.0))
    plain.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.1, "momentum": 0.9,
                                                             "wd": 1e-4})
    for step, masks in enumerate(history):
        batch = _batch(step)
        forward = masks["forward"][0]
        plain.forward_backward(mx.io.DataBatch(batch.data + [mx.nd.array(forward[n]) for n in names],
                                               batch.label))
        plain.update()
    mx.nd.waitall()
    args, _ = module.get_params()
    plain_args, _ = plain.get_params()
    assert sorted(args) == sorted(plain_args)
    for name in plain_args:
        np.testing.assert_array_equal(args[name].asnumpy(), plain_args[name].asnumpy(), err_msg=name)
    grads = dict(zip(module._exec_group.param_names, module._exec_group.grad_arrays))
    plain_grads = dict(zip(plain._exec_group.param_names, plain._exec_group.grad_arrays))
    for name in plain_grads:
        np.testing.assert_array_equal(grads[name][0].asnumpy(), plain_grads[name][0].asnumpy(),
                                      err_msg=name)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_drop_a_fraction_p_at_mxnets_scale(p):
    # One Dropout of 10^6 elements in the first (re-run) segment.
    data = mx.sym.var("data")
    x = mx.sym.Activation(mx.sym.FullyConnected(data, num_hidden=1000, name="fc0"), act_type="relu")
    x = mx.sym.Dropout(x, p=p, name="drop0")
    for i in (1, 2, 3):
        x = mx.sym.FullyConnected(x, num_hidden=1000 if i < 3 else 32, name=f"fc{i}")
        x = mx.sym.Activation(x, act_type="relu", name=f"relu{i}")
    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=CLASSES, name="out"),
                                  name="softmax")
    module = MirroredModule(symbol, context=mx.cpu(), options=_options(segments=2))
    shape = (1000, 16)
    module.bind([("data", shape)], [("softmax_label", (shape[0],))])
    assert "drop0" in module.mirror_plan.segment_plan.segments[0].nodes     # re-run in backward
    module.init_params(mx.init.Xavier())
    recorder = MaskRecorder(module)
    mx.random.seed(3)
    module.forward(_batch(0, shape), is_train=True)
    mx.nd.waitall()
    recorder.phase = "backward"
    module.backward()
    mx.nd.waitall()
    mask = recorder.masks["forward"][0]["drop0"]
    np.testing.assert_array_equal(recorder.masks["backward"][0]["drop0"], mask)
    assert set(np.unique(mask)) == {0.0, np.float32(dropout_scale(p))}
    n = mask.size
    dropped = float((mask == 0).mean())
    assert abs(dropped - p) <= 5 * np.sqrt(p * (1 - p) / n), dropped


def test_two_cpu_contexts_replay_their_masks():
    _, history = _train_segmented(dropout_mlp(6, hidden=64), steps=1, contexts=2)
    masks = history[0]
    for device in range(2):
        assert masks["backward"][device]
        for name, mask in masks["backward"][device].items():
            np.testing.assert_array_equal(mask, masks["forward"][device][name], err_msg=name)
    # The devices draw different masks.
    assert not np.array_equal(masks["forward"][0]["drop0"], masks["forward"][1]["drop0"])


def _one_iteration(module: mx.mod.Module, seed: int):
    mx.random.seed(seed)
    module.forward_backward(_batch(0))
    mx.nd.waitall()
    grads = [g[0].asnumpy() for g in module._exec_group.grad_arrays]
    after = mx.nd.random.uniform(shape=(8,)).asnumpy()
    return grads, after


def test_the_random_stream_is_reproduced_by_mx_random_seed_and_advances_deterministically():
    module = MirroredModule(dropout_mlp(4, hidden=64), context=mx.cpu(), options=_options(segments=3))
    module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    module.init_params(mx.init.Xavier())
    first, after_first = _one_iteration(module, 5)
    again, after_again = _one_iteration(module, 5)
    other, after_other = _one_iteration(module, 6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after_first, after_again)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert not np.array_equal(after_first, after_other)


def test_a_chain_whose_segments_draw_nothing_leaves_the_stream_alone():
    x = mx.sym.var("data")
    for i in range(4):
        x = mx.sym.Activation(mx.sym.FullyConnected(x, num_hidden=64, name=f"fc{i}"), act_type="relu")
    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=CLASSES, name="out"),
                                  name="softmax")
    module = MirroredModule(symbol, context=mx.cpu(), options=_options(segments=2))
    module.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    module.init_params(mx.init.Xavier())
    assert module.mirror_plan.segment_count == 2 and not module.mirror_plan.segment_plan.replay_random
    _, after = _one_iteration(module, 9)
    mx.random.seed(9)
    np.testing.assert_array_equal(after, mx.nd.random.uniform(shape=(8,)).asnumpy())


def test_without_the_option_segments_refuse_dropout_and_a_chain_refuses_an_unreplayed_plan():
    symbol = dropout_mlp(3, hidden=64)
    with pytest.raises(BackendError, match="recompute_dropout=True"):
        plan_mirror(symbol, [("data", SHAPE)], cache_dir=False, backend="segments", segments=2)
    plan = plan_mirror(symbol, [("data", SHAPE)], cache_dir=False, backend="segments", segments=2,
                       recompute_dropout=True)
    unreplayed = plan.segment_plan.with_replay_random(False)
    with pytest.raises(BackendError, match="recompute_dropout=True"):
        SegmentChain(symbol, unreplayed, mx.cpu(), {"data": SHAPE, "softmax_label": (SHAPE[0],)},
                     grad_req={n: "write" for n in symbol.list_arguments()})


def test_random_operators_reseeding_does_not_replay_are_refused_with_the_option():
    assert replays_random("Dropout", {"p": "0.1"}) and replays_random("_random_uniform", {})
    assert not replays_random("LeakyReLU", {"act_type": "rrelu"})
    assert not replays_random("RNN", {"p": "0.2"})
    x = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=32, name="fc0")
    x = mx.sym.LeakyReLU(x, act_type="rrelu", name="rrelu0")[0]
    x = mx.sym.FullyConnected(x, num_hidden=32, name="fc1")
    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(x, num_hidden=CLASSES, name="out"),
                                  name="softmax")
    with pytest.raises(BackendError, match="not known to replay"):
        plan_mirror(symbol, [("data", SHAPE)], cache_dir=False, backend="segments", segments=2,
                    recompute_dropout=True)


def test_backward_without_a_training_forward_is_refused():
    symbol = dropout_mlp(3, hidden=64)
    plan = plan_mirror(symbol, [("data", SHAPE)], cache_dir=False, backend="segments", segments=2,
                       recompute_dropout=True)
    chain = SegmentChain(symbol, plan.segment_plan, mx.cpu(),
                         {"data": SHAPE, "softmax_label": (SHAPE[0],)},
                         grad_req={n: "write" for n in symbol.list_arguments()})
    chain.forward(is_train=False)
    with pytest.raises(BackendError, match="forward\\(is_train=True\\)"):
        chain.backward()


def test_gpu_plans_bind_replayed_dropout_without_cudnn():
    symbol = dropout_mlp(3, hidden=64)
    plan = plan_mirror(symbol, [("data", SHAPE)], cache_dir=False, backend="segments", segments=2,
                       recompute_dropout=True).segment_plan
    document = json.loads(symbol.tojson())

    def dropout_attrs(documents):
        return [n.get("attrs", {}) for d in documents for n in d["nodes"] if n["op"] == "Dropout"]

    gpu = dropout_attrs(segment_documents(document, plan, rerun_cudnn_off=True))
    assert len(gpu) == 3 and all(a.get("cudnn_off") == "True" for a in gpu)
    assert not any("cudnn_off" in a for a in dropout_attrs(segment_documents(document, plan)))


@pytest.mark.slow
def test_small_bert_trains_with_replayed_dropout_like_a_plain_module_fed_its_masks():
    """A 2-layer BERT-shaped MLM (embeddings, interleaved attention, GELU, tied decoder over
    masked positions): one step's gradients are those of the masks the segments drew."""
    kwargs = dict(layers=2, units=32, heads=4, hidden=64, vocab=50, seq_len=16, max_length=16,
                  dropout=0.1, masked=4)
    symbol = bert_mlm(**kwargs)
    data_shapes, label_shapes = bert_mlm_shapes(batch=4, seq_len=16, masked=4)
    rng = np.random.RandomState(0)
    values = [mx.nd.array(rng.randint(0, 50, (4, 16))), mx.nd.array(rng.randint(0, 2, (4, 16))),
              mx.nd.array(np.stack([rng.choice(16, 4, replace=False) for _ in range(4)]))]
    label = mx.nd.array(rng.randint(0, 50, (4, 4)))
    data_names = [n for n, _ in data_shapes]
    module = MirroredModule(symbol, data_names=data_names, context=mx.cpu(),
                            options=_options(segments=3))
    module.bind(data_shapes, label_shapes)
    assert module.mirror_plan.segment_count == 3
    mx.random.seed(0)
    module.init_params(mx.init.Xavier())
    recorder = MaskRecorder(module)
    module.forward(mx.io.DataBatch(values, [label]), is_train=True)
    mx.nd.waitall()
    recorder.phase = "backward"
    module.backward()
    mx.nd.waitall()
    forward = recorder.masks["forward"][0]
    assert recorder.masks["backward"][0]
    for name, mask in recorder.masks["backward"][0].items():
        np.testing.assert_array_equal(mask, forward[name], err_msg=name)
    reference = _with_mask_inputs(symbol)
    drops = sorted(forward)
    inputs = dict(zip(data_names, values), softmax_label=label)
    inputs.update({d + "_maskin": mx.nd.array(forward[d]) for d in drops})
    args, auxs = module.get_params()
    requests = {n: ("null" if n in inputs else "write") for n in reference.list_arguments()}
    plain = reference.simple_bind(mx.cpu(), grad_req=requests,
                                  **{n: v.shape for n, v in inputs.items()})
    for name, value in list(args.items()) + list(inputs.items()):
        plain.arg_dict[name][:] = value
    for name, value in auxs.items():
        plain.aux_dict[name][:] = value
    plain.forward(is_train=True)
    plain.backward()
    mx.nd.waitall()
    grads = dict(zip(module._exec_group.param_names, module._exec_group.grad_arrays))
    assert sorted(grads) == sorted(args)
    for name in args:
        # The tied word embedding's gradient is summed over two segments (another order), and
        # MKLDNN changes layouts at cuts (NOTE [ exact or within rounding ] in test_segments.py).
        np.testing.assert_allclose(grads[name][0].asnumpy(), plain.grad_dict[name].asnumpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("padding_mask", [False, True])
def test_bert_mlm_builds_at_any_size_with_the_documented_inputs(padding_mask):
    symbol = bert_mlm(layers=1, units=16, heads=2, hidden=32, vocab=40, seq_len=8, max_length=12,
                      dropout=0.1, masked=3, padding_mask=padding_mask)
    data_shapes, label_shapes = bert_mlm_shapes(batch=2, seq_len=8, masked=3, padding_mask=padding_mask)
    names = [n for n, _ in data_shapes + label_shapes]
    assert sorted(n for n in symbol.list_arguments() if "weight" not in n and "bias" not in n
                  and "gamma" not in n and "beta" not in n) == sorted(names)
    arg_shapes, out_shapes, _ = symbol.infer_shape(**dict(data_shapes + label_shapes))
    assert out_shapes == [(6, 40)]
    assert dict(zip(symbol.list_arguments(), arg_shapes))["position_weight"] == (12, 16)
    # Tied decoder: one word-embedding weight; untied: the classifier's own.
    assert "mlm_out_weight" not in symbol.list_arguments()
    assert "mlm_out_weight" in bert_mlm(layers=1, units=16, heads=2, hidden=32, vocab=40, seq_len=8,
                                        max_length=12, tied=False).list_arguments()
    with pytest.raises(ValueError, match="max_length"):
        bert_mlm(seq_len=600)
