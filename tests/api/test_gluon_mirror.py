"""``mirror(net)`` inside the user's own autograd loop, against plain autograd + gluon.Trainer.

Every comparison runs the default (threaded) engine with no ``waitall`` in the
training loop: the mirrored gradients must be ordered before ``trainer.step``
by the engine alone (a gradient written after the step read it would show up
as a parameter difference after three steps).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from mxnet_mirror_hook.errors import GluonMirrorError
from mxnet_mirror_hook.gluon import is_mirrored, mirror, mirror_state, unmirror
from tests.helpers import DOUBLE_OP, attached_input_gradients

OPTIMIZER = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}
CPUS = [mx.cpu(0), mx.cpu(1)]


def test_engine_is_the_default_threaded_one():
    assert os.environ.get("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice") not in ("NaiveEngine",)


# ---------------------------------------------------------------- networks
class ConcatNet(gluon.HybridBlock):
    """Inception-style: parallel branches joined by concat, BatchNorm, pooling."""

    def __init__(self, classes: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = gluon.nn.HybridSequential()
            self.stem.add(gluon.nn.Conv2D(16, 3, padding=1), gluon.nn.BatchNorm(),
                          gluon.nn.Activation("relu"))
            self.branches = []
            for i, (kernel, width) in enumerate(((1, 8), (3, 8), (5, 4))):
                branch = gluon.nn.HybridSequential(prefix=f"b{i}_")
                with branch.name_scope():
                    branch.add(gluon.nn.Conv2D(width, kernel, padding=kernel // 2),
                               gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
                               gluon.nn.Conv2D(width, 3, padding=1), gluon.nn.BatchNorm(),
                               gluon.nn.Activation("relu"))
                self.register_child(branch)
                self.branches.append(branch)
            self.head = gluon.nn.HybridSequential()
            self.head.add(gluon.nn.Conv2D(16, 3, padding=1), gluon.nn.BatchNorm(),
                          gluon.nn.Activation("relu"), gluon.nn.GlobalAvgPool2D(),
                          gluon.nn.Dense(classes))

    def hybrid_forward(self, F, x):
        x = self.stem(x)
        x = F.concat(*[branch(x) for branch in self.branches], dim=1)
        return self.head(x)


class TwoHeads(gluon.HybridBlock):
    """A main and an auxiliary classifier (a tuple output)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = gluon.nn.HybridSequential()
            self.body.add(gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.BatchNorm(),
                          gluon.nn.Activation("relu"), gluon.nn.Conv2D(8, 3, padding=1),
                          gluon.nn.Activation("relu"))
            self.main = gluon.nn.HybridSequential()
            self.main.add(gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.GlobalAvgPool2D(),
                          gluon.nn.Dense(10))
            self.aux = gluon.nn.HybridSequential()
            self.aux.add(gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(10))

    def hybrid_forward(self, F, x):
        features = self.body(x)
        return self.main(features), self.aux(features)


def _resnet18():
    from gluoncv.model_zoo import get_model

    return get_model("resnet18_v1b", pretrained=False, classes=10)


def _twins(factory: Callable[[], gluon.HybridBlock], tmp_path, shape, ctx=None, hybridize=True,
           grad_req="write", trainer_first=False, extra_inputs=()):
    """A plain and a mirrored copy of one initialization, and a Trainer each."""
    ctx = ctx or [mx.cpu()]
    mx.random.seed(0)
    source = factory()
    source.initialize(mx.init.Xavier(magnitude=2.0), ctx=ctx)
    source(mx.nd.zeros((1,) + shape[1:], ctx=ctx[0]),
           *[mx.nd.zeros((1,) + extra, ctx=ctx[0]) for extra in extra_inputs])
    path = str(tmp_path / "init.params")
    source.save_parameters(path)
    plain = factory()
    plain.load_parameters(path, ctx=ctx)
    mirrored = factory()
    if trainer_first:  # the Trainer exists before mirror()
        mirrored.load_parameters(path, ctx=ctx)
        early = gluon.Trainer(mirrored.collect_params(), "sgd", OPTIMIZER)
        mirror(mirrored, cache_dir=str(tmp_path / "cache"))
    else:
        mirror(mirrored, cache_dir=str(tmp_path / "cache"))  # before initialize and hybridize
        mirrored.load_parameters(path, ctx=ctx)
    for net in (plain, mirrored):
        if grad_req != "write":
            net.collect_params().setattr("grad_req", grad_req)
        if hybridize:
            net.hybridize(static_alloc=True)
    trainers = [gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER) for net in (plain, mirrored)]
    if trainer_first:
        trainers[1] = early
    return (plain, trainers[0]), (mirrored, trainers[1])


def _batches(count, shape, classes=10, seed=0):
    rng = np.random.RandomState(seed)
    return [(mx.nd.array(rng.uniform(-1, 1, shape)), mx.nd.array(rng.randint(0, classes, shape[0])))
            for _ in range(count)]


def _by_structure(net, ctx=None) -> dict:
    """Parameters (weights and BatchNorm running statistics) keyed without the model prefix."""
    # No waitall: reading must wait for every write, the statistics included (see gluon/hooks.py)
    return {name.split("_", 1)[1]: (p.data(ctx) if ctx else p.data()).asnumpy()
            for name, p in net.collect_params().items()}


def _assert_identical(plain, mirrored, ctx=None) -> None:
    expected, actual = _by_structure(plain, ctx), _by_structure(mirrored, ctx)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _train_step(net, trainer, data, label, ctx, loss_fn, metric=None):
    """The gluoncv training step, verbatim: no waitall, no extra forward."""
    parts = gluon.utils.split_and_load(data, ctx)
    labels = gluon.utils.split_and_load(label, ctx)
    with autograd.record():
        outputs = [net(x) for x in parts]
        losses = [loss_fn(yhat, y) for yhat, y in zip(outputs, labels)]
    autograd.backward(losses)
    trainer.step(data.shape[0])
    if metric is not None:
        metric.update(labels, outputs)


# ---------------------------------------------------------------- equivalence
@pytest.mark.slow
@pytest.mark.parametrize("factory,shape", [(_resnet18, (4, 3, 64, 64)), (ConcatNet, (4, 3, 32, 32))],
                         ids=["resnet18_v1b", "concat"])
def test_three_sgd_steps_bit_identical_to_plain_gluon_with_metric(factory, shape, tmp_path):
    (plain, plain_trainer), (net, trainer) = _twins(factory, tmp_path, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    metrics = [mx.metric.Accuracy(), mx.metric.Accuracy()]
    ctx = [mx.cpu()]
    for data, label in _batches(3, shape):
        _train_step(plain, plain_trainer, data, label, ctx, loss_fn, metrics[0])
        _train_step(net, trainer, data, label, ctx, loss_fn, metrics[1])
    _assert_identical(plain, net)
    assert metrics[1].get() == metrics[0].get()
    plan = mirror_state(net).last_plan
    assert plan.mirrored, "the plan recomputes nothing"
    assert plan.planned_mb < plan.baseline_mb


def test_two_cpu_contexts_with_split_and_load_trainer_made_before_mirror(tmp_path):
    shape = (8, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape, ctx=CPUS,
                                                    trainer_first=True)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(3, shape):
        _train_step(plain, plain_trainer, data, label, CPUS, loss_fn)
        _train_step(net, trainer, data, label, CPUS, loss_fn)
    for ctx in CPUS:
        _assert_identical(plain, net, ctx)
    assert {str(e._ctx) for e in mirror_state(net).executors()} == {"cpu(0)", "cpu(1)"}


def test_one_backward_call_per_loss_on_each_context(tmp_path):
    shape = (8, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape, ctx=CPUS)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(2, shape):
        for model, tr in ((plain, plain_trainer), (net, trainer)):
            parts = gluon.utils.split_and_load(data, CPUS)
            labels = gluon.utils.split_and_load(label, CPUS)
            with autograd.record():
                losses = [loss_fn(model(x), y) for x, y in zip(parts, labels)]
            for loss in losses:
                loss.backward()
            tr.step(data.shape[0])
    for ctx in CPUS:
        _assert_identical(plain, net, ctx)


def test_grad_req_add_over_two_micro_batches(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape, grad_req="add")
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    batches = _batches(6, shape)
    for step in range(3):
        for model, tr in ((plain, plain_trainer), (net, trainer)):
            for data, label in batches[2 * step: 2 * step + 2]:
                with autograd.record():
                    loss = loss_fn(model(data), label)
                loss.backward()
            tr.step(2 * shape[0])
            model.collect_params().zero_grad()
    _assert_identical(plain, net)


def test_two_losses_on_one_output_hard_and_soft_targets(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape)
    hard = gluon.loss.SoftmaxCrossEntropyLoss()
    soft = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=False)
    rng = np.random.RandomState(1)
    for data, label in _batches(3, shape):
        targets = mx.nd.softmax(mx.nd.array(rng.normal(size=(shape[0], 10))))
        for model, tr in ((plain, plain_trainer), (net, trainer)):
            with autograd.record():
                out = model(data)
                losses = [hard(out, label), 0.5 * soft(out, targets)]
            autograd.backward(losses)
            tr.step(shape[0])
    _assert_identical(plain, net)


def test_tuple_output_block_with_auxiliary_head(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(TwoHeads, tmp_path, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(3, shape):
        results = []
        for model, tr in ((plain, plain_trainer), (net, trainer)):
            with autograd.record():
                main, aux = model(data)
                loss = loss_fn(main, label) + 0.3 * loss_fn(aux, label)
            loss.backward()
            tr.step(shape[0])
            results.append((main.asnumpy(), aux.asnumpy()))
        for expected, actual in zip(*results):
            np.testing.assert_array_equal(actual, expected)
    _assert_identical(plain, net)


def test_unused_output_gets_no_gradient(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(TwoHeads, tmp_path, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(2, shape):
        for model, tr in ((plain, plain_trainer), (net, trainer)):
            with autograd.record():
                main, _ = model(data)
                loss = loss_fn(main, label)
            loss.backward()
            tr.step(shape[0], ignore_stale_grad=True)
    _assert_identical(plain, net)


def test_input_gradient_reaches_an_attached_input(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, _), (net, _) = _twins(ConcatNet, tmp_path, shape)
    (data, label), = _batches(1, shape)
    grads = attached_input_gradients((plain, net), data, label)
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_retain_graph_backward_twice_accumulates_like_plain(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, _), (net, _) = _twins(ConcatNet, tmp_path, shape, grad_req="add")
    (data, label), = _batches(1, shape)
    for model in (plain, net):
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(model(data), label)
        loss.backward(retain_graph=True)
        loss.backward()
    for (name, p), q in zip(plain.collect_params().items(), net.collect_params().values()):
        if p.grad_req != "null":
            np.testing.assert_array_equal(q.grad().asnumpy(), p.grad().asnumpy(), err_msg=name)


def test_two_forwards_before_one_backward(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape)
    (a, label), (b, _) = _batches(2, shape)
    for model, tr in ((plain, plain_trainer), (net, trainer)):
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(model(a), label) + \
                gluon.loss.L2Loss()(model(b), mx.nd.zeros((shape[0], 10)))
        loss.backward()
        tr.step(shape[0])
    _assert_identical(plain, net)


def test_new_input_shape_replans_and_evicts_least_recent(tmp_path):
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, (4, 3, 16, 16))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    state = mirror_state(net)
    plans = []
    for shape in ((4, 3, 16, 16), (2, 3, 24, 24), (4, 3, 16, 16), (6, 3, 16, 16), (2, 3, 24, 24)):
        (data, label), = _batches(1, shape)
        _train_step(plain, plain_trainer, data, label, [mx.cpu()], loss_fn)
        _train_step(net, trainer, data, label, [mx.cpu()], loss_fn)
        plans.append(state.last_plan)
        assert len(state.plans) <= state.max_shapes
    assert plans[2] is plans[0]  # still bound
    assert plans[4] is not plans[1] and plans[4].from_cache  # evicted, re-planned from the cache
    _assert_identical(plain, net)


# ---------------------------------------------------------------- plain behaviour kept
def test_eval_and_predict_mode_forward_equal_plain_block(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape)
    (data, label), = _batches(1, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    _train_step(plain, plain_trainer, data, label, [mx.cpu()], loss_fn)
    _train_step(net, trainer, data, label, [mx.cpu()], loss_fn)
    executors = len(mirror_state(net).executors())
    np.testing.assert_array_equal(net(data).asnumpy(), plain(data).asnumpy())
    with autograd.record(), autograd.predict_mode():
        np.testing.assert_array_equal(net(data).asnumpy(), plain(data).asnumpy())
    assert len(mirror_state(net).executors()) == executors  # nothing planned or bound


def test_files_names_and_class_unchanged(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape)
    (data, label), = _batches(1, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    _train_step(plain, plain_trainer, data, label, [mx.cpu()], loss_fn)
    _train_step(net, trainer, data, label, [mx.cpu()], loss_fn)
    assert type(net) is ConcatNet and isinstance(net, gluon.HybridBlock) and is_mirrored(net)
    assert [p.name.split("_", 1)[1] for p in net.collect_params().values()] == \
        [p.name.split("_", 1)[1] for p in plain.collect_params().values()]
    plain_prefix, net_prefix = plain.prefix, net.prefix
    assert list(net.collect_params().keys()) == \
        [k.replace(plain_prefix, net_prefix, 1) for k in plain.collect_params().keys()]
    plain.save_parameters(str(tmp_path / "plain.params"))
    net.save_parameters(str(tmp_path / "mirrored.params"))
    plain_bytes = (tmp_path / "plain.params").read_bytes()
    assert (tmp_path / "mirrored.params").read_bytes() == plain_bytes
    # export: same symbol (after the prefix) and byte-identical parameters
    plain.export(str(tmp_path / "plain"))
    net.export(str(tmp_path / "mirrored"))
    plain_json = (tmp_path / "plain-symbol.json").read_text().replace(plain_prefix, "P_")
    assert (tmp_path / "mirrored-symbol.json").read_text().replace(net_prefix, "P_") == plain_json
    # load_parameters into the mirrored block, then unmirror: the plain class behaviour returns
    net.load_parameters(str(tmp_path / "plain.params"))
    unmirror(net)
    assert not is_mirrored(net) and "forward" not in vars(net)
    np.testing.assert_array_equal(net(data).asnumpy(), plain(data).asnumpy())


def test_mirror_returns_the_block_and_hybridize_after_mirror(tmp_path):
    net = ConcatNet()
    assert mirror(net) is net and is_mirrored(net)
    net.initialize()
    net.hybridize()
    with autograd.record():
        out = net(mx.nd.ones((2, 3, 8, 8)))
    out.backward()
    assert mirror_state(net).last_plan is not None
    assert unmirror(net) is net and not is_mirrored(net)


# ---------------------------------------------------------------- errors
def test_plain_block_is_rejected_at_mirror():
    with pytest.raises(GluonMirrorError, match="HybridBlock") as info:
        mirror(gluon.nn.Sequential())
    assert isinstance(info.value, TypeError)


class _Doubling(gluon.HybridBlock):
    """Runs on NDArrays only (``mx.nd`` instead of ``F``), as some zoo blocks do."""

    def hybrid_forward(self, F, x):
        return mx.nd.elemwise_add(x, x)


def test_an_untraceable_block_trains_plainly_with_one_warning(caplog):
    net = mirror(_Doubling())
    net.initialize()
    x = mx.nd.array([[1.0, -2.0, 3.0]])
    with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook"):
        for _ in range(2):
            x.attach_grad()
            with autograd.record():
                y = net(x)
            y.backward()
    warnings = [r for r in caplog.records if "cannot be traced" in r.getMessage()]
    assert len(warnings) == 1 and "trains without mirroring" in warnings[0].getMessage()
    assert mirror_state(net).plain_reason is not None and mirror_state(net).last_plan is None
    assert y.asnumpy().tolist() == [[2.0, -4.0, 6.0]]
    assert x.grad.asnumpy().tolist() == [[2.0, 2.0, 2.0]]


class _SymbolOnlyFails(gluon.HybridBlock):
    """A Dense whose input size is inferred lazily, behind an operation that works on NDArrays but
    not on Symbols (gluoncv's GroupNorm passes ``Reshape`` an argument MXNet 1.9.1's symbolic
    Reshape refuses, so its networks train only unhybridized)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.dense = gluon.nn.Dense(2)

    def hybrid_forward(self, F, x):
        if isinstance(x, mx.sym.Symbol):
            raise ValueError("shape cannot be inferred")
        return self.dense(x)


def test_a_lazily_initialized_block_that_cannot_be_traced_trains_like_plain_gluon(caplog):
    results = []
    for mirrored in (False, True):
        mx.random.seed(3)
        net = _SymbolOnlyFails()
        net.initialize(mx.init.Xavier())  # the Dense's weight waits for the first forward
        if mirrored:
            mirror(net, cache_dir=False)
        x = mx.nd.array([[1.0, -2.0, 3.0]])
        with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook"):
            with autograd.record():
                y = net(x)
            y.backward()
        results.append((y.asnumpy(), net.dense.weight.grad().asnumpy()))
    warnings = [r for r in caplog.records if "cannot be traced" in r.getMessage()]
    assert len(warnings) == 1 and "trains without mirroring" in warnings[0].getMessage()
    for plain, mirrored in zip(*results):
        np.testing.assert_array_equal(mirrored, plain)


def test_input_from_recorded_operations_fails_clearly():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4))
    net.initialize()
    mirror(net)
    weight = mx.nd.ones((2, 3))
    weight.attach_grad()
    with autograd.record():
        hidden = weight * 2
        with pytest.raises(GluonMirrorError, match="outermost"):
            net(hidden)


def test_float16_never_silently_wrong(tmp_path):
    """float16 via net.cast: equal to plain Gluon where MXNet runs it, else a clear error at forward."""
    shape = (4, 3, 16, 16)
    (plain, _), (net, _) = _twins(ConcatNet, tmp_path, shape, hybridize=False)
    for model in (plain, net):
        model.cast("float16")
        model.hybridize()
    (data, label), = _batches(1, shape)
    data, label = data.astype("float16"), label.astype("float16")
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    try:
        with autograd.record():
            loss = loss_fn(plain(data), label)
        loss.backward()
        expected = plain.collect_params()[plain.prefix + "conv0_weight"].grad().asnumpy()
    except mx.base.MXNetError:  # the CPU build has no float16 gemm
        with pytest.raises(GluonMirrorError, match="forward failed"):
            with autograd.record():
                net(data)
        return
    with autograd.record():
        loss = loss_fn(net(data), label)
    loss.backward()
    actual = net.collect_params()[net.prefix + "conv0_weight"].grad().asnumpy()
    np.testing.assert_array_equal(actual, expected)


class WithCustom(gluon.HybridBlock):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.first = gluon.nn.Dense(16, activation="relu")
            self.second = gluon.nn.Dense(10)

    def hybrid_forward(self, F, x):
        return self.second(F.Custom(self.first(x), op_type=DOUBLE_OP))


def test_block_with_a_custom_operator_trains_like_plain(tmp_path):
    shape = (4, 8)
    (plain, plain_trainer), (net, trainer) = _twins(WithCustom, tmp_path, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(3, shape):
        _train_step(plain, plain_trainer, data, label, [mx.cpu()], loss_fn)
        _train_step(net, trainer, data, label, [mx.cpu()], loss_fn)
    _assert_identical(plain, net)


def test_a_mirrored_block_pickles_like_the_plain_block(tmp_path):
    """Round trip keeps the class, the mirror options and the outputs (Gluon itself does not
    pickle gradient state: neither an unpickled plain block nor this one can be trained as is)."""
    import pickle

    shape = (4, 3, 16, 16)
    (plain, _), (net, _) = _twins(ConcatNet, tmp_path, shape, hybridize=False)
    copy = pickle.loads(pickle.dumps(net))
    assert type(copy) is ConcatNet and is_mirrored(copy)
    assert mirror_state(copy).options == mirror_state(net).options
    (data, _), = _batches(1, shape)
    np.testing.assert_array_equal(copy(data).asnumpy(), plain(data).asnumpy())


def test_a_forward_overwritten_before_its_backward_fails_clearly():
    net = mirror(ConcatNet(), max_pending=1, cache_dir=False)
    net.initialize()
    with autograd.record():
        first = net(mx.nd.ones((2, 3, 8, 8))).sum()
        net(mx.nd.ones((2, 3, 8, 8)))  # reuses the only executor
    with pytest.raises(GluonMirrorError, match="reused"):
        first.backward()


def test_autograd_grad_through_a_mirrored_block_is_refused():
    net = mirror(ConcatNet(), cache_dir=False)
    net.initialize()
    x = mx.nd.ones((2, 3, 8, 8))
    x.attach_grad()
    with autograd.record():
        out = net(x).sum()
    with pytest.raises(GluonMirrorError, match="autograd.grad"):
        autograd.grad(out, [x])


class TwoInputs(gluon.HybridBlock):
    """Two inputs (an image and a side vector) joined before the classifier."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.image = gluon.nn.HybridSequential()
            self.image.add(gluon.nn.Conv2D(8, 3, padding=1), gluon.nn.BatchNorm(),
                           gluon.nn.Activation("relu"), gluon.nn.Conv2D(8, 3, padding=1),
                           gluon.nn.Activation("relu"), gluon.nn.GlobalAvgPool2D(), gluon.nn.Flatten())
            self.side = gluon.nn.Dense(8, activation="relu")
            self.out = gluon.nn.Dense(10)

    def hybrid_forward(self, F, image, side):
        return self.out(F.concat(self.image(image), self.side(side), dim=1))


class _PlainParent(gluon.Block):
    def __init__(self, child, **kwargs) -> None:
        super().__init__(**kwargs)
        self.child = child

    def forward(self, image, side):
        return self.child(image, side)


def test_two_input_block_inside_a_plain_parent_block(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(TwoInputs, tmp_path, shape, extra_inputs=[(5,)])
    rng = np.random.RandomState(3)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(3, shape):
        side = mx.nd.array(rng.normal(size=(shape[0], 5)))
        for model, tr in ((plain, plain_trainer), (net, trainer)):
            parent = _PlainParent(model)  # a non-hybrid parent calls the mirrored child
            with autograd.record():
                loss = loss_fn(parent(data, side), label)
            loss.backward()
            tr.step(shape[0])
    _assert_identical(plain, net)


def test_reinitialized_parameters_are_bound_again(tmp_path):
    shape = (4, 3, 16, 16)
    (plain, plain_trainer), (net, trainer) = _twins(ConcatNet, tmp_path, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    (data, label), = _batches(1, shape)
    _train_step(net, trainer, data, label, [mx.cpu()], loss_fn)
    for model in (plain, net):
        model.initialize(mx.init.One(), force_reinit=True)  # new arrays behind the same Parameters
    plain_trainer = gluon.Trainer(plain.collect_params(), "sgd", OPTIMIZER)
    trainer = gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER)
    for model, tr in ((plain, plain_trainer), (net, trainer)):
        _train_step(model, tr, data, label, [mx.cpu()], loss_fn)
    _assert_identical(plain, net)


def test_mirror_takes_the_backend_options_and_keeps_them():
    """Segments behind a mirrored block are tested in tests/api/test_gluon_segments.py."""
    from mxnet_mirror_hook import MirrorOptions

    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4))
    mirror(net, options=MirrorOptions(backend="segments"), segments=3)
    assert mirror_state(net).options.backend == "segments" and mirror_state(net).options.segments == 3
    mirror(net, backend="auto")
    assert mirror_state(net).options.backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        mirror(gluon.nn.HybridSequential(), backend="checkpoint")
