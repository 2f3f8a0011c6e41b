"""Executor segments with a chunked loss head (issue 11, NOTE [ chunked loss head ] in core/segments/head.py).

A language model's FullyConnected + SoftmaxOutput head runs in row chunks.  The comparisons are
against a plain ``mx.mod.Module`` / ``mx.mod.BucketingModule``:

- the chunked head's outputs (the softmax) are bit-identical to the same split with the head as one
  executor: the same kernels on the same rows (against a plain Module the LSTM segments before it
  already differ by MKLDNN layout rounding, ~1e-7, NOTE [ exact or within rounding ]);
- gradients and parameters agree to ~1e-6 relative, not bit for bit, because (1) the head's
  backward runs by tiles of rows x classes (NOTE [ chunked loss head ]): the input's gradient is
  summed over class blocks, the classifier's weight and bias gradients over row parts, and (2)
  against a plain Module the LSTM weights read by several segments (and, inside a segment, by
  several steps: NOTE [ one variable per reader ] in mx/segments/split.py) are summed in another order
  anyway (NOTE [ exact or within rounding ] in test_segments.py).  Tolerances below: 2e-6
  relative for one step's gradients, 1e-5 after three SGD steps with momentum.  With one tile
  every gradient is bit-identical to the same split with the head as one executor (the loss
  gradient is SoftmaxOutput's kernel bit for bit).
"""
from __future__ import annotations

import json
from typing import Dict

import mxnet as mx
import numpy as np
import pytest

import mxnet_mirror_hook.core.segments.head as core_head
from mxnet_mirror_hook import MirroredBucketingModule, MirroredModule, plan_mirror
from mxnet_mirror_hook.core.segments import loss_head, plan_segments_with_head
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.mx.segments import SegmentChain, segment_planned_mb

VOCAB, BATCH, STEPS = 20000, 8, 8


def lm(steps: int = STEPS, vocab: int = VOCAB, **softmax_attrs) -> "mx.sym.Symbol":
    """lstm_language_model's network (testing/models.py) with SoftmaxOutput parameters."""
    stack = mx.rnn.SequentialRNNCell()
    for layer in range(2):
        stack.add(mx.rnn.LSTMCell(num_hidden=16, prefix=f"lstm_l{layer}_"))
    embed = mx.sym.Embedding(mx.sym.Variable("data"), input_dim=vocab, output_dim=16, name="embed")
    outputs, _ = stack.unroll(steps, inputs=embed, merge_outputs=True)
    pred = mx.sym.FullyConnected(mx.sym.Reshape(outputs, shape=(-1, 16)), num_hidden=vocab, name="pred")
    label = mx.sym.Reshape(mx.sym.Variable("softmax_label"), shape=(-1,))
    return mx.sym.SoftmaxOutput(pred, label, name="softmax", **softmax_attrs)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1 MB work buffers: the 64 x 20000 head runs in 4 chunks of 16 rows."""
    monkeypatch.setattr(core_head, "HEAD_CHUNK_BYTES", 2 ** 20)


def _batches(count: int, vocab: int = VOCAB, ignore: float = None, steps: int = STEPS):
    rng = np.random.RandomState(1)
    for _ in range(count):
        label = rng.randint(0, vocab, (BATCH, steps)).astype("float32")
        if ignore is not None:
            label[rng.uniform(size=label.shape) < 0.3] = ignore
        yield mx.io.DataBatch([mx.nd.array(rng.randint(0, vocab, (BATCH, steps)))], [mx.nd.array(label)])


def _train(module, steps: int = 3, ignore: float = None) -> Dict[str, object]:
    mx.random.seed(0)
    np.random.seed(0)
    module.bind([("data", (BATCH, STEPS))], [("softmax_label", (BATCH, STEPS))])
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={
        "learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
    outputs, first_grads = [], None
    for batch in _batches(steps, ignore=ignore):
        module.forward_backward(batch)
        outputs.append(module.get_outputs()[0].asnumpy())
        if first_grads is None:
            group = module._exec_group
            first_grads = {p: a[0].asnumpy() for p, a in zip(group.param_names, group.grad_arrays)
                           if a[0] is not None}
        module.update()
    mx.nd.waitall()
    args, _ = module.get_params()
    return {"outputs": outputs, "grads": first_grads, "args": {k: v.asnumpy() for k, v in args.items()}}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-12)


@pytest.mark.parametrize("attrs,ignore", [
    ({}, None),
    ({"normalization": "batch"}, None),
    ({"normalization": "valid", "use_ignore": True}, -1.0),
    ({"normalization": "valid"}, 3.0),                              # counts ignore_label=-1 (none)
    ({"grad_scale": 0.37, "use_ignore": True, "ignore_label": 3}, 3.0),
    ({"normalization": "batch", "grad_scale": 2.5}, None),
])
def test_chunked_head_trains_like_plain_module(small_chunks, attrs, ignore):
    """MirroredModule(backend='segments') with the head in row chunks: outputs, gradients and
    parameters within rounding (module docstring)."""
    plain = _train(mx.mod.Module(lm(**attrs)), ignore=ignore)
    module = MirroredModule(lm(**attrs), backend="segments", segments=3, cache_dir=False)
    chunked = _train(module, ignore=ignore)
    plan = module.mirror_plan.segment_plan
    assert plan.head_chunks == 4 and module._exec_group.execs[0].head is not None
    for ours, theirs in zip(chunked["outputs"], plain["outputs"]):
        assert _relative(theirs, ours) < 1e-6
    for name, grad in plain["grads"].items():
        assert _relative(grad, chunked["grads"][name]) < 2e-6, name
    for name, value in plain["args"].items():
        assert _relative(value, chunked["args"][name]) < 1e-5, name
    # The head's gradients are non-trivial (the normalization really was applied).
    assert np.abs(chunked["grads"]["pred_bias"]).max() > 0


def test_chunked_head_with_user_add_accumulates_over_backwards(small_chunks):
    """grad_req='add': two backwards sum (the first chunk must not overwrite)."""
    def run(module):
        mx.random.seed(0)
        module.bind([("data", (BATCH, STEPS))], [("softmax_label", (BATCH, STEPS))], grad_req="add")
        module.init_params(mx.init.Xavier(magnitude=2.0))
        for batch in _batches(2):
            module.forward_backward(batch)
        mx.nd.waitall()
        group = module._exec_group
        return {p: a[0].asnumpy() for p, a in zip(group.param_names, group.grad_arrays)}

    plain = run(mx.mod.Module(lm()))
    module = MirroredModule(lm(), backend="segments", segments=3, cache_dir=False)
    summed = run(module)
    assert module.mirror_plan.segment_plan.head_chunks == 4
    for name, grad in plain.items():
        assert _relative(grad, summed[name]) < 2e-6, name


@pytest.mark.slow
def test_bucketing_module_with_a_chunked_head_trains_like_bucketing_module(small_chunks):
    def sym_gen(length):
        return lm(steps=length), ("data",), ("softmax_label",)

    def run(module):
        mx.random.seed(0)
        module.bind([("data", (BATCH, 8))], [("softmax_label", (BATCH, 8))])
        module.init_params(mx.init.Xavier())
        module.init_optimizer(optimizer_params={"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
        rng = np.random.RandomState(0)
        for length in (8, 4, 8, 4):
            batch = mx.io.DataBatch([mx.nd.array(rng.randint(0, VOCAB, (BATCH, length)))],
                                    [mx.nd.array(rng.randint(0, VOCAB, (BATCH, length)))],
                                    bucket_key=length, provide_data=[("data", (BATCH, length))],
                                    provide_label=[("softmax_label", (BATCH, length))])
            module.forward_backward(batch)
            module.update()
        mx.nd.waitall()
        return {k: v.asnumpy() for k, v in module.get_params()[0].items()}

    plain = run(mx.mod.BucketingModule(sym_gen, default_bucket_key=8))
    module = MirroredBucketingModule(sym_gen, default_bucket_key=8, backend="segments", segments=3,
                                     cache_dir=False)
    bucketed = run(module)
    assert sorted(module.mirror_plans) == [4, 8]
    # The default bucket's plan runs its head in chunks (the short bucket may measure lower
    # without: each bucket is planned on its own figures).
    assert module.mirror_plans[8].segment_plan.head_chunks > 1
    for name, value in plain.items():
        assert _relative(value, bucketed[name]) < 1e-5, name


def _graph(symbol):
    inputs = (normalize_inputs([("data", (BATCH, STEPS))], "data")
              + normalize_inputs([("softmax_label", (BATCH, STEPS))], "label"))
    return symbol_to_graph(symbol, inputs)


@pytest.mark.parametrize("attrs,reason", [
    ({"smooth_alpha": 0.1}, "smooth_alpha"),
    ({"out_grad": True}, "out_grad"),
    ({"preserve_shape": True}, "preserve_shape"),
])
def test_head_forms_that_cannot_be_chunked_are_refused_and_the_plan_keeps_one_executor(
        small_chunks, attrs, reason):
    head, why = loss_head(_graph(lm(**attrs)))
    assert head is None and reason in why
    plan = plan_mirror(lm(**attrs), [("data", (BATCH, STEPS))], [("softmax_label", (BATCH, STEPS))],
                       backend="segments", segments=3, cache_dir=False)
    assert plan.backend == "segments" and plan.segment_plan.head_chunks == 0


def test_multi_output_and_probability_labels_are_refused():
    data = mx.sym.FullyConnected(mx.sym.relu(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=8)),
                                 num_hidden=6, name="pred")
    probability = mx.sym.SoftmaxOutput(data, mx.sym.var("softmax_label"), name="softmax")
    inputs = (normalize_inputs([("data", (4, 5))], "data")
              + normalize_inputs([("softmax_label", (4, 6))], "label"))
    head, why = loss_head(symbol_to_graph(probability, inputs))
    assert head is None and "probability" in why
    multi = mx.sym.SoftmaxOutput(data, mx.sym.var("softmax_label"), multi_output=True, name="softmax")
    inputs = (normalize_inputs([("data", (4, 5))], "data")
              + normalize_inputs([("softmax_label", (4,))], "label"))
    head, why = loss_head(symbol_to_graph(multi, inputs))
    assert head is None and "multi_output" in why


def _chain_inputs(symbol):
    """Input shapes, gradient requests (every parameter 'write') and input types of ``lm``."""
    shapes = {"data": (BATCH, STEPS), "softmax_label": (BATCH, STEPS)}
    requests = {n: ("null" if n in shapes else "write") for n in symbol.list_arguments()}
    return shapes, requests, {n: np.dtype("float32") for n in shapes}


def test_static_figure_counts_exactly_what_the_chunked_head_allocates(small_chunks):
    """NOTE [ static memory of a segment plan ]: the head's part of the figure is the bytes the
    chain's ChunkedHead allocates (output, work buffers), added to the pool and boundaries."""
    symbol = lm()
    graph = _graph(symbol)
    head, _ = loss_head(graph)
    plan = plan_segments_with_head(graph, 3, head)
    shapes, requests, types = _chain_inputs(symbol)
    total, per_segment = segment_planned_mb(symbol, plan, mx.cpu(), shapes, types, requests)
    chain = SegmentChain(symbol, plan, mx.cpu(), shapes, types, requests)
    head_mb = chain.head.allocated_bytes() / 2 ** 20
    boundary_mb = chain.boundary_bytes() / 2 ** 20
    assert per_segment[-1] == 0.0 and len(chain.execs) == plan.count - 1
    assert chain.gathers, "the merge of the steps runs without an executor (NOTE [ gathered steps ])"
    # Step outputs only the merge reads have no arrays of their own; a segment's last step's
    # output is also the next segment's state and keeps its arrays (its gradient gets the slice).
    assert any(e not in chain.boundary for e in chain.gathered)
    assert any(e in chain.boundary for e in chain.gathered)
    assert all(per_segment[i] == 0.0 and chain.execs[i] is None for i in chain.gathers)
    # The rest is the shared pool: at least the largest segment's plan (whole MB in debug_str),
    # at most all segments' plans side by side (NOTE [ the shared pool's union ]).
    pool_mb = total - boundary_mb - head_mb
    assert max(per_segment) <= pool_mb < sum(per_segment) + len(per_segment)
    assert head_mb >= BATCH * STEPS * VOCAB * 4 / 2 ** 20   # the full output is counted


def test_auto_backend_with_a_chunkable_head_is_never_worse_than_one_level(small_chunks):
    shapes = ([("data", (BATCH, STEPS))], [("softmax_label", (BATCH, STEPS))])
    one_level = plan_mirror(lm(), *shapes, cache_dir=False)
    auto = plan_mirror(lm(), *shapes, backend="auto", cache_dir=False)
    assert auto.planned_mb <= one_level.planned_mb


def _one_step(symbol, plan, shapes, types, requests, values) -> SegmentChain:
    """A chain for ``plan`` with ``values`` (others seeded uniform) after one forward/backward."""
    chain = SegmentChain(symbol, plan, mx.cpu(), shapes, types, requests)
    mx.random.seed(0)
    for name, array in chain.arg_dict.items():
        array[:] = values[name] if name in values else mx.nd.random.uniform(-0.3, 0.3, array.shape)
    chain.forward(is_train=True)
    chain.backward()
    mx.nd.waitall()
    return chain


@pytest.mark.parametrize("attrs", [{}, {"normalization": "valid", "use_ignore": True}])
def test_chunked_head_outputs_are_bit_identical_to_the_unchunked_head(small_chunks, attrs):
    """Same split, head as one executor vs chunked: the softmax output bit for bit, every gradient
    within ~1e-6 (the input's gradient is summed over class blocks); with one class block every
    gradient bit for bit."""
    symbol = lm(**attrs)
    graph = _graph(symbol)
    head, _ = loss_head(graph)
    chunked_plan = plan_segments_with_head(graph, 3, head)
    shapes, requests, types = _chain_inputs(symbol)
    rng = np.random.RandomState(3)
    values = {"data": rng.randint(0, VOCAB, shapes["data"]),
              "softmax_label": np.where(rng.uniform(size=shapes["data"]) < 0.3, -1,
                                        rng.randint(0, VOCAB, shapes["data"]))}
    results = []
    for plan in (chunked_plan.with_head_chunks(0), chunked_plan):
        chain = _one_step(symbol, plan, shapes, types, requests, values)
        results.append((chain.outputs[0].asnumpy(),
                        {k: g.asnumpy() for k, g in chain.grad_dict.items() if g is not None}))
    (single, single_grads), (chunked, chunked_grads) = results
    np.testing.assert_array_equal(chunked, single)
    for name, grad in single_grads.items():
        assert _relative(grad, chunked_grads[name]) < 2e-6, name
    # One class block: the loss gradient (output - one_hot) * scale, ignored rows zeroed, is
    # SoftmaxOutput's kernel bit for bit, so every gradient is the unchunked head's.
    one_block = _one_step(symbol, chunked_plan.with_head_chunks(1), shapes, types, requests, values)
    np.testing.assert_array_equal(one_block.outputs[0].asnumpy(), single)
    for name, grad in single_grads.items():
        np.testing.assert_array_equal(one_block.grad_dict[name].asnumpy(), grad, err_msg=name)


def test_chunked_head_with_a_fixed_classifier_trains_like_plain_module(small_chunks):
    """No gradient requested for the classifier's weight and bias: the tiles' kernel writes
    them into scratch buffers, the input's gradient still flows (and the parameters stay)."""
    fixed = ["pred_weight", "pred_bias"]
    plain = _train(mx.mod.Module(lm(), fixed_param_names=fixed))
    module = MirroredModule(lm(), backend="segments", segments=3, cache_dir=False,
                            fixed_param_names=fixed)
    chunked = _train(module)
    assert module._exec_group.execs[0].head is not None
    assert module._exec_group.execs[0].head.weight_grad is None
    for name, grad in plain["grads"].items():
        assert _relative(grad, chunked["grads"][name]) < 2e-6, name
    for name, value in plain["args"].items():
        assert _relative(value, chunked["args"][name]) < 1e-5, name
    np.testing.assert_array_equal(chunked["args"]["pred_weight"], plain["args"]["pred_weight"])


def test_sliced_embedding_gives_the_gradients_of_the_whole_embedding(monkeypatch):
    """NOTE [ slicing the replayed embedding ]: segments that embed only their own steps give
    bit for bit the gradients of segments that embed the whole sequence."""
    import mxnet_mirror_hook.mx.segments.split as segment_split

    symbol = lm(vocab=50)
    graph = _graph(symbol)
    head, _ = loss_head(graph)
    plan = plan_segments_with_head(graph, 4, head).with_head_chunks(0)
    shapes, requests, types = _chain_inputs(symbol)
    rng = np.random.RandomState(5)
    values = {"data": rng.randint(0, 50, shapes["data"]), "softmax_label": rng.randint(0, 50, shapes["data"])}
    results = []
    for sliced in (True, False):
        if not sliced:
            monkeypatch.setattr(segment_split, "_slice_replayed_steps", lambda nodes, heads: None)
        pieces = [json.loads(s.tojson()) for s in segment_split.split_symbol(symbol, plan)]
        assert sliced == any(n["op"] == "slice_axis" for p in pieces for n in p["nodes"])
        chain = _one_step(symbol, plan, shapes, types, requests, values)
        results.append({k: g.asnumpy() for k, g in chain.grad_dict.items() if g is not None})
    for name, grad in results[1].items():
        np.testing.assert_array_equal(results[0][name], grad, err_msg=name)
