"""``mirror(net, backend='segments')``: executor segments behind a mirrored Gluon block.

Against plain autograd + ``gluon.Trainer`` (3 SGD steps, momentum and weight
decay, the default threaded engine, no ``waitall`` in the loop), as
``tests/api/test_gluon_mirror.py`` does for the one-level mirror.

NOTE [ exact or within rounding ] of ``tests/api/test_segments.py`` holds here too:
with MKLDNN off the segments run the same kernels on the same values as plain
Gluon, so a network without shared weights trains bit for bit; those runs are in a
child process with ``MXNET_MKLDNN_ENABLED=0`` (MXNet reads it at start).  Weights
read by several segments (the unrolled LSTM's, shared over its steps) get their
gradient summed over segments in another order than autograd's in-graph sum:
~1e-7 relative per step, checked at 1e-5 after three steps.  With MKLDNN (this
build's default) a cut changes memory layouts and so the order of some
reductions: the in-process comparisons use a relative tolerance of 1e-5.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Tuple

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from tests.helpers import attached_input_gradients
from tests.paths import ROOT

from mxnet_mirror_hook.errors import BackendError  # noqa: E402
from mxnet_mirror_hook.gluon import MirroredTrainer, mirror, mirror_state, plan_block  # noqa: E402
from mxnet_mirror_hook.plan import plan_mirror  # noqa: E402

OPTIMIZER = {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4}
CPUS = [mx.cpu(0), mx.cpu(1)]
#: Tolerance where summation order differs (MKLDNN layouts, shared weights): relative to the
#: array's largest magnitude, plus an absolute floor for arrays that stay near zero.
ROUNDING = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------- networks
class ResidualNet(gluon.HybridBlock):
    """A small residual net: stem, residual blocks with BatchNorm, pooled classifier (no conv
    biases before BatchNorm, as in ResNets: their true gradient is 0, so they would move by
    rounding noise alone)."""

    def __init__(self, blocks: int = 4, channels: int = 8, classes: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = gluon.nn.HybridSequential()
            self.stem.add(gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False), gluon.nn.BatchNorm(),
                          gluon.nn.Activation("relu"))
            self.blocks = []
            for i in range(blocks):
                body = gluon.nn.HybridSequential(prefix=f"res{i}_")
                with body.name_scope():
                    body.add(gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False),
                             gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
                             gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False),
                             gluon.nn.BatchNorm())
                self.register_child(body)
                self.blocks.append(body)
            self.head = gluon.nn.HybridSequential()
            self.head.add(gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(classes))

    def hybrid_forward(self, F, x):
        x = self.stem(x)
        for body in self.blocks:
            x = F.relu(x + body(x))
        return self.head(x)


class UnrolledLSTM(gluon.HybridBlock):
    """An LSTM unrolled over ``steps`` with one set of weights shared by every step; every
    step's output goes to one classifier (the language-model shape).  Input (batch, steps,
    features), output (batch, steps, classes)."""

    def __init__(self, steps: int = 12, hidden: int = 16, features: int = 6, classes: int = 10,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps, self.hidden = steps, hidden
        with self.name_scope():
            self.i2h_weight = self.params.get("i2h_weight", shape=(4 * hidden, features))
            self.h2h_weight = self.params.get("h2h_weight", shape=(4 * hidden, hidden))
            self.bias = self.params.get("bias", shape=(4 * hidden,), init="zeros")
            self.out = gluon.nn.Dense(classes, flatten=False)

    def hybrid_forward(self, F, x, i2h_weight, h2h_weight, bias):
        hidden = self.hidden
        steps = F.split(x, num_outputs=self.steps, axis=1, squeeze_axis=True)
        h = c = None
        outputs = []
        for t in range(self.steps):
            gates = F.FullyConnected(steps[t], i2h_weight, bias, num_hidden=4 * hidden)
            if h is not None:
                gates = gates + F.FullyConnected(h, h2h_weight, no_bias=True, num_hidden=4 * hidden)
            i, f, g, o = F.split(gates, num_outputs=4, axis=1)
            i, f, o, g = F.sigmoid(i), F.sigmoid(f), F.sigmoid(o), F.tanh(g)
            c = i * g if c is None else f * c + i * g
            h = o * F.tanh(c)
            outputs.append(F.expand_dims(h, axis=1))
        return self.out(F.concat(*outputs, dim=1))


class DropoutNet(gluon.HybridBlock):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = gluon.nn.HybridSequential()
            self.body.add(gluon.nn.Dense(64, activation="relu"), gluon.nn.Dropout(0.5),
                          gluon.nn.Dense(64, activation="relu"), gluon.nn.Dense(10))

    def hybrid_forward(self, F, x):
        return self.body(x)


#: name -> (factory, data shape, label shape)
CASES = {
    "residual": (ResidualNet, (8, 3, 12, 12), (8,)),
    "lstm": (UnrolledLSTM, (8, 12, 6), (8, 12)),
    # Long enough for backend='auto' to take segments (with the gradient-sum cap 2).
    "lstm_auto": (lambda: UnrolledLSTM(steps=24, hidden=64, features=16), (32, 24, 16), (32, 24)),
}


# ---------------------------------------------------------------- training
def _twins(name: str, tmp_path: str, ctx: List["mx.Context"], grad_req: str = "write",
           **mirror_kwargs) -> Tuple[gluon.HybridBlock, gluon.HybridBlock]:
    """A plain and a mirrored copy of one initialization (the mirrored one mirrored before
    initialize, as gluoncv's scripts can)."""
    factory, shape, _ = CASES[name]
    mx.random.seed(0)
    source = factory()
    source.initialize(mx.init.Xavier(magnitude=2.0), ctx=ctx)
    source(mx.nd.zeros((1,) + shape[1:], ctx=ctx[0]))
    path = os.path.join(tmp_path, f"{name}.params")
    source.save_parameters(path)
    plain, net = factory(), factory()
    mirror(net, cache_dir=False, **mirror_kwargs)
    for model in (plain, net):
        model.load_parameters(path, ctx=ctx)
        if grad_req != "write":
            model.collect_params().setattr("grad_req", grad_req)
        model.hybridize(static_alloc=True)
    return plain, net


def _batches(name: str, count: int, seed: int = 0):
    _, shape, label_shape = CASES[name]
    rng = np.random.RandomState(seed)
    return [(mx.nd.array(rng.uniform(-1, 1, shape)), mx.nd.array(rng.randint(0, 10, label_shape)))
            for _ in range(count)]


def _train(net, trainer, batches, ctx, micro_batches: int = 1) -> None:
    """gluoncv's step (split_and_load, no waitall); with ``micro_batches`` > 1, that many
    forward/backward passes accumulate (grad_req 'add') before each update."""
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for start in range(0, len(batches), micro_batches):
        size = 0
        for data, label in batches[start:start + micro_batches]:
            parts = gluon.utils.split_and_load(data, ctx)
            labels = gluon.utils.split_and_load(label, ctx)
            with autograd.record():
                losses = [loss_fn(net(x), y) for x, y in zip(parts, labels)]
            autograd.backward(losses)
            size += data.shape[0]
        trainer.step(size)
        if micro_batches > 1:
            net.collect_params().zero_grad()


def _state(net, ctx) -> Dict[str, np.ndarray]:
    """Parameters and BatchNorm statistics keyed without the model prefix (read without waitall:
    reads must wait for the executor's writes)."""
    return {name.split("_", 1)[1]: p.data(ctx).asnumpy() for name, p in net.collect_params().items()}


def compare(name: str, contexts: int = 1, grad_req: str = "write", backend: str = "segments",
            segments: int = 3, tmp_path: str = None, steps: int = 3) -> Dict[str, object]:
    """Train plain and mirrored for ``steps`` SGD steps; per array and context, the max absolute
    difference and the array's largest magnitude, and the plan's backend and number of segments."""
    import tempfile

    ctx = CPUS[:contexts]
    with tempfile.TemporaryDirectory() as workdir:
        plain, net = _twins(name, tmp_path or workdir, ctx, grad_req, backend=backend,
                            segments=segments)
    micro = 2 if grad_req == "add" else 1
    batches = _batches(name, steps * micro)
    for model in (plain, net):
        _train(model, gluon.Trainer(model.collect_params(), "sgd", OPTIMIZER), batches, ctx, micro)
    diff = {}
    for device in ctx:
        expected, actual = _state(plain, device), _state(net, device)
        assert sorted(expected) == sorted(actual)
        for key, value in expected.items():
            diff[f"{device}:{key}"] = (float(np.abs(value - actual[key]).max()),
                                       float(np.abs(value).max()))
    plan = mirror_state(net).last_plan
    shared = plan.segment_plan.shared_variables() if plan.segment_plan is not None else []
    chains = mirror_state(net).executors()
    return {"backend": plan.backend, "count": plan.segment_count, "summary": plan.summary(),
            "shared": sorted(shared), "diff": diff,
            "contexts": sorted(str(getattr(c, "ctx", None)) for c in chains)}


def _without_mkldnn(name: str, contexts: int = 1, grad_req: str = "write", backend: str = "segments",
                    segments: int = 3, cap: bool = False) -> Dict[str, object]:
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="0", PYTHONPATH=ROOT)
    env.pop("MXNET_EXEC_INPLACE_GRAD_SUM_CAP", None)
    if cap:  # NOTE [ the gradient-sum cap is read once per process ] (mx/segments/environment.py)
        env["MXNET_EXEC_INPLACE_GRAD_SUM_CAP"] = "2"
    done = subprocess.run([sys.executable, os.path.abspath(__file__), name, str(contexts), grad_req,
                           backend, str(segments)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _differing(result: Dict[str, object]) -> Dict[str, float]:
    """Arrays not bit-identical: their max absolute difference."""
    return {k: v[0] for k, v in result["diff"].items() if v[0] != 0.0}


def _beyond_rounding(result: Dict[str, object]) -> Dict[str, Tuple[float, float]]:
    """Arrays differing by more than ROUNDING relative (ATOL absolute)."""
    return {k: (d, scale) for k, (d, scale) in result["diff"].items() if d > ROUNDING * scale + ATOL}


# ---------------------------------------------------------------- equivalence, MKLDNN off
@pytest.mark.slow
def test_residual_net_three_sgd_steps_bit_identical_without_mkldnn():
    result = _without_mkldnn("residual")
    assert result["backend"] == "segments" and result["count"] == 3
    assert not _differing(result), _differing(result)


@pytest.mark.slow
def test_residual_net_on_two_cpu_contexts_bit_identical_without_mkldnn():
    result = _without_mkldnn("residual", contexts=2)
    assert result["contexts"] == ["cpu(0)", "cpu(1)"]  # one segment chain per context
    assert not _differing(result), _differing(result)


@pytest.mark.slow
def test_residual_net_grad_req_add_over_two_micro_batches_bit_identical_without_mkldnn():
    result = _without_mkldnn("residual", grad_req="add")
    assert not _differing(result), _differing(result)


@pytest.mark.slow
def test_unrolled_lstm_with_weights_shared_over_steps_without_mkldnn():
    """The shared weights are read by several segments: summation order only."""
    result = _without_mkldnn("lstm")
    assert result["count"] == 3
    assert {"i2h_weight", "h2h_weight", "bias"} <= {n.split("_", 1)[-1] for n in result["shared"]}
    assert not _beyond_rounding(result), _beyond_rounding(result)


@pytest.mark.slow
def test_auto_takes_segments_where_they_win_and_trains_like_plain():
    """A 24-step LSTM with the gradient-sum cap 2 (set before the process builds a graph, as
    docs/guide/segments.md says): 'auto' measures segments at least 10% below the one-level plan and
    takes them."""
    result = _without_mkldnn("lstm_auto", backend="auto", segments=0, cap=True)
    assert result["backend"] == "segments" and result["count"] > 1, result["summary"]
    assert not _beyond_rounding(result), _beyond_rounding(result)


# ---------------------------------------------------------------- equivalence, this build (MKLDNN)
@pytest.mark.parametrize("name,contexts,grad_req,steps", [
    ("residual", 1, "write", 1), ("residual", 2, "add", 1), ("lstm", 2, "write", 3),
    ("lstm", 1, "add", 3)])
def test_segments_match_plain_gluon_within_rounding(name, contexts, grad_req, steps, tmp_path):
    """One step for the residual net: at learning rate 0.1 and batch 8 it amplifies any 1e-6
    change (MKLDNN's layouts at a cut, or a random 1e-6 perturbation of plain Gluon's weights
    alike) to ~1e-2 in BatchNorm betas at the second step; bit for bit above without MKLDNN."""
    result = compare(name, contexts, grad_req, tmp_path=str(tmp_path), steps=steps)
    assert result["backend"] == "segments" and result["count"] == 3
    assert not _beyond_rounding(result), _beyond_rounding(result)


# ---------------------------------------------------------------- behaviour of the one-level path kept
def test_plan_summary_and_mirror_state_name_the_backend_and_segments(tmp_path):
    plain, net = _twins("lstm", str(tmp_path), [mx.cpu()], backend="segments", segments=4)
    _train(net, gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER), _batches("lstm", 1), [mx.cpu()])
    state = mirror_state(net)
    plan = state.last_plan
    assert state.options.backend == "segments" and plan.backend == "segments"
    assert plan.segment_count == 4 and "4 segments" in plan.summary()
    assert "data 8x12x6" in plan.summary()
    assert plan.to_dict()["segment_count"] == 4
    # plan_block gives the same plan without training
    again = plan_block(net, CASES["lstm"][1])
    assert again.backend == "segments" and again.segment_plan == plan.segment_plan


def test_auto_chooses_as_plan_mirror_does(tmp_path):
    plain, net = _twins("lstm", str(tmp_path), [mx.cpu()], backend="auto")
    data, label = _batches("lstm", 1)[0]
    _train(net, gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER), [(data, label)], [mx.cpu()])
    chosen = mirror_state(net).last_plan
    symbol, = mirror_state(net).traced_symbols()
    expected = plan_mirror(symbol, [("data", data.shape)], backend="auto", cache_dir=False,
                           grad_req={n: ("null" if n == "data" else "write")
                                     for n in symbol.list_arguments()})
    assert chosen.backend == expected.backend
    assert chosen.segment_plan == expected.segment_plan
    assert chosen.planned_mb == expected.planned_mb


def test_retain_graph_second_backward_reruns_the_chain(tmp_path):
    plain, net = _twins("residual", str(tmp_path), [mx.cpu()], grad_req="add", backend="segments",
                        segments=3)
    (data, label), = _batches("residual", 1)
    for model in (plain, net):
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(model(data), label)
        loss.backward(retain_graph=True)
        loss.backward()
    for (name, p), q in zip(plain.collect_params().items(), net.collect_params().values()):
        if p.grad_req != "null":
            np.testing.assert_allclose(q.grad().asnumpy(), p.grad().asnumpy(), rtol=ROUNDING,
                                       atol=ATOL, err_msg=name)


def test_two_forwards_before_one_backward(tmp_path):
    """A second forward binds a second chain writing private gradients, then added to the
    Parameters' (as autograd sums two uses of one Parameter)."""
    plain, net = _twins("lstm", str(tmp_path), [mx.cpu()], backend="segments", segments=3)
    (a, label), (b, _) = _batches("lstm", 2)
    for model in (plain, net):
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(model(a), label) + \
                gluon.loss.L2Loss()(model(b), mx.nd.zeros((b.shape[0], 12, 10)))
        loss.backward()
        gluon.Trainer(model.collect_params(), "sgd", OPTIMIZER).step(a.shape[0])
    assert len(mirror_state(net).executors()) == 2
    expected, actual = _state(plain, mx.cpu()), _state(net, mx.cpu())
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=ROUNDING, atol=ATOL, err_msg=key)


def test_an_attached_input_gets_its_gradient(tmp_path):
    plain, net = _twins("lstm", str(tmp_path), [mx.cpu()], backend="segments", segments=3)
    (data, label), = _batches("lstm", 1)
    grads = attached_input_gradients((plain, net), data, label)
    np.testing.assert_allclose(grads[1], grads[0], rtol=ROUNDING, atol=ATOL)


def test_eval_forward_is_the_plain_block_and_binds_nothing(tmp_path):
    plain, net = _twins("residual", str(tmp_path), [mx.cpu()], backend="segments", segments=3)
    (data, label), = _batches("residual", 1)
    for model in (plain, net):
        _train(model, gluon.Trainer(model.collect_params(), "sgd", OPTIMIZER), [(data, label)],
               [mx.cpu()])
    chains = mirror_state(net).executors()
    with autograd.record(train_mode=False):
        evaluated = net(data)
    np.testing.assert_allclose(net(data).asnumpy(), plain(data).asnumpy(), rtol=ROUNDING, atol=ATOL)
    np.testing.assert_array_equal(evaluated.asnumpy(), net(data).asnumpy())
    assert mirror_state(net).executors() == chains


def test_new_parameter_arrays_rebind_the_chain(tmp_path):
    plain, net = _twins("residual", str(tmp_path), [mx.cpu()], backend="segments", segments=3)
    batches = _batches("residual", 2)
    _train(net, gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER), batches[:1], [mx.cpu()])
    before = mirror_state(net).executors()
    for model in (plain, net):
        model.initialize(mx.init.One(), force_reinit=True)
        _train(model, gluon.Trainer(model.collect_params(), "sgd", OPTIMIZER), batches[1:], [mx.cpu()])
    assert mirror_state(net).executors() != before
    expected, actual = _state(plain, mx.cpu()), _state(net, mx.cpu())
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=ROUNDING, atol=ATOL, err_msg=key)


def test_mirrored_trainer_runs_segments(tmp_path):
    plain, net = _twins("lstm", str(tmp_path), [mx.cpu()])
    trainer = MirroredTrainer(net, gluon.loss.SoftmaxCrossEntropyLoss(), "sgd", OPTIMIZER,
                              backend="segments", segments=3, cache_dir=False)
    plain_trainer = gluon.Trainer(plain.collect_params(), "sgd", OPTIMIZER)
    for data, label in _batches("lstm", 3):
        trainer.step(data, label)
        _train(plain, plain_trainer, [(data, label)], [mx.cpu()])
    assert trainer.mirror_plan.backend == "segments" and trainer.mirror_plan.segment_count == 3
    expected, actual = _state(plain, mx.cpu()), _state(net, mx.cpu())
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=ROUNDING, atol=ATOL, err_msg=key)


def test_dropout_network_refused_by_segments_and_kept_one_level_by_auto():
    shape = (4, 32)
    net = mirror(DropoutNet(), backend="segments", cache_dir=False)
    net.initialize()
    net.hybridize()
    with pytest.raises(BackendError, match="dropout masks"):
        with autograd.record():
            net(mx.nd.ones(shape))
    mirror(net, backend="auto", cache_dir=False)
    with autograd.record():
        loss = net(mx.nd.ones(shape)).sum()
    loss.backward()
    plan = mirror_state(net).last_plan
    assert plan.backend == "mirror" and plan.segment_plan is None


class _LinearDropoutNet(gluon.HybridBlock):
    """Linear in its input for fixed dropout masks (no biases, no activations)."""

    def __init__(self):
        super().__init__()
        with self.name_scope():
            self.layers = gluon.nn.HybridSequential()
            for units in (256, 256, 256, 16):
                self.layers.add(gluon.nn.Dense(units, use_bias=False, flatten=False),
                                gluon.nn.Dropout(0.5))

    def hybrid_forward(self, F, x):
        return self.layers(x)


def test_replayed_dropout_in_segments_gives_the_gradient_of_the_masks_forward_used():
    # For fixed masks the net is a linear map y = M x, so the gradient of sum(w * y) is M^T w and
    # <x, grad> == <w, y>.  Masks drawn again in backward would break the identity.
    from mxnet_mirror_hook import MirrorOptions

    mx.random.seed(3)
    net = _LinearDropoutNet()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    mirror(net, options=MirrorOptions(backend="segments", segments=3, recompute_dropout=True,
                                      cache_dir=False))
    x = mx.nd.random.uniform(shape=(16, 64))
    w = mx.nd.random.uniform(-1, 1, shape=(16, 16))
    x.attach_grad()
    with autograd.record():
        y = net(x)
        loss = (w * y).sum()
    loss.backward()
    plan = mirror_state(net).last_plan
    assert plan.backend == "segments" and plan.segment_plan is not None
    assert not np.allclose(y.asnumpy(), net(x).asnumpy())  # dropout was active in training
    forward = float((w * y).sum().asscalar())
    backward = float((x * x.grad).sum().asscalar())
    assert abs(forward - backward) <= 1e-4 * abs(forward)


if __name__ == "__main__":
    print(json.dumps(compare(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4],
                             int(sys.argv[5]) or None)))
