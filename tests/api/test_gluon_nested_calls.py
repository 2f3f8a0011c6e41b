"""Gluon call signatures users write, under ``mirror(net)``: nested lists of NDArrays in and out
(a language model's states, as gluonnlp trains it) and ``None`` for an optional input (BERT's
``valid_length``).  Two Trainer steps give the gradients and parameters of plain Gluon, bit for bit.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from mxnet_mirror_hook.errors import GluonMirrorError
from mxnet_mirror_hook.gluon import mirror, mirror_state, plan_block

OPTIMIZER = {"learning_rate": 0.5, "momentum": 0.9, "wd": 1e-4}
VOCAB, STEPS, BATCH = 50, 12, 4


class LSTMLanguageModel(gluon.HybridBlock):
    """An LSTM language model in the style of gluonnlp's StandardRNN: ``model(data, states)``
    returns ``(output, states)`` with ``states`` a list ``[h, c]``.  The LSTM and the decoder
    infer their input sizes at the first forward."""

    def __init__(self, vocab: int = VOCAB, embed: int = 16, hidden: int = 16, layers: int = 2,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.embedding = gluon.nn.Embedding(vocab, embed)
            self.encoder = gluon.rnn.LSTM(hidden, layers)
            self.decoder = gluon.nn.Dense(vocab, flatten=False)

    def hybrid_forward(self, F, inputs, begin_state):
        encoded, state = self.encoder(self.embedding(inputs), begin_state)
        return self.decoder(encoded), state

    def begin_state(self, *args, **kwargs) -> List["mx.nd.NDArray"]:
        return self.encoder.begin_state(*args, **kwargs)


class MaskedEncoder(gluon.HybridBlock):
    """``net(x, valid_length)`` with ``valid_length`` optional (None: every step is valid)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.proj = gluon.nn.Dense(8, flatten=False, activation="tanh")
            self.out = gluon.nn.Dense(3)

    def hybrid_forward(self, F, x, valid_length=None):
        h = self.proj(x)  # (batch, steps, 8)
        if valid_length is not None:
            h = F.SequenceMask(h, sequence_length=valid_length, use_sequence_length=True, axis=1)
        return self.out(F.sum(h, axis=1))


def _gluonnlp_lm():
    from gluonnlp.model import StandardRNN

    return StandardRNN("lstm", VOCAB, 16, 16, 2, dropout=0, tie_weights=False)


def _corpus(batches: int, seed: int = 0) -> List[Tuple["mx.nd.NDArray", "mx.nd.NDArray"]]:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, VOCAB, (batches * STEPS + 1, BATCH))
    return [(mx.nd.array(tokens[i * STEPS:(i + 1) * STEPS]),
             mx.nd.array(tokens[i * STEPS + 1:(i + 1) * STEPS + 1])) for i in range(batches)]


def _train_lm(factory: Callable[[], gluon.HybridBlock], mirrored: bool, hybridize: bool,
              steps: int = 2) -> Dict[str, np.ndarray]:
    """gluonnlp's word-language-model loop: states detached each batch, clipped gradients."""
    mx.random.seed(3)
    model = factory()
    model.initialize(mx.init.Xavier())
    if hybridize:
        model.hybridize(static_alloc=True)
    if mirrored:
        mirror(model, cache_dir=False)
    params = model.collect_params()
    trainer = gluon.Trainer(params, "sgd", OPTIMIZER)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    hidden = model.begin_state(batch_size=BATCH, func=mx.nd.zeros, ctx=mx.cpu())
    found: Dict[str, np.ndarray] = {}
    for step, (data, target) in enumerate(_corpus(steps)):
        hidden = [h.detach() for h in hidden]
        with autograd.record():
            output, hidden = model(data, hidden)
            loss = loss_fn(output.reshape(-3, -1), target.reshape(-1))
        loss.backward()
        grads = [p.grad() for p in params.values() if p.grad_req != "null"]
        gluon.utils.clip_global_norm(grads, 0.25 * BATCH)
        trainer.step(BATCH)
        found.update({f"{step}:grad:{i}": g.asnumpy() for i, g in enumerate(grads)})
        found.update({f"{step}:state:{i}": h.asnumpy() for i, h in enumerate(hidden)})
        found[f"{step}:output"] = output.asnumpy()
    found.update({f"param:{i}": p.data().asnumpy() for i, p in enumerate(params.values())})
    if mirrored:
        assert isinstance(hidden, list) and len(hidden) == 2  # regrouped as the block returns them
        assert mirror_state(model).last_plan is not None
    return found


def _assert_bit_identical(plain: Dict[str, np.ndarray], mirrored: Dict[str, np.ndarray]) -> None:
    assert sorted(plain) == sorted(mirrored)
    for key, expected in plain.items():
        np.testing.assert_array_equal(mirrored[key], expected, err_msg=key)


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
def test_language_model_with_a_list_of_states_trains_like_plain_gluon(hybridize):
    plain = _train_lm(LSTMLanguageModel, mirrored=False, hybridize=hybridize)
    mirrored = _train_lm(LSTMLanguageModel, mirrored=True, hybridize=hybridize)
    _assert_bit_identical(plain, mirrored)


def test_gluonnlp_standard_rnn_with_its_states_trains_like_plain_gluon():
    pytest.importorskip("gluonnlp")
    plain = _train_lm(_gluonnlp_lm, mirrored=False, hybridize=True)
    mirrored = _train_lm(_gluonnlp_lm, mirrored=True, hybridize=True)
    _assert_bit_identical(plain, mirrored)


def _train_masked(mirrored: bool, hybridize: bool, valid: bool, steps: int = 2) -> Dict[str, np.ndarray]:
    mx.random.seed(5)
    net = MaskedEncoder()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    if mirrored:
        mirror(net, cache_dir=False)
    trainer = gluon.Trainer(net.collect_params(), "sgd", OPTIMIZER)
    rng = np.random.RandomState(1)
    found = {}
    for step in range(steps):
        x = mx.nd.array(rng.uniform(-1, 1, (BATCH, 6, 5)))
        label = mx.nd.array(rng.randint(0, 3, BATCH))
        length = mx.nd.array(rng.randint(1, 7, BATCH)) if valid else None
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(x, length), label)
        loss.backward()
        found.update({f"{step}:grad:{k.split('_', 1)[1]}": p.grad().asnumpy()
                      for k, p in net.collect_params().items()})
        trainer.step(BATCH)
    found.update({f"param:{k.split('_', 1)[1]}": p.data().asnumpy() for k, p in net.collect_params().items()})
    return found


def test_none_for_an_optional_input_trains_like_plain_gluon():
    _assert_bit_identical(_train_masked(False, True, valid=False), _train_masked(True, True, valid=False))


def test_an_optional_input_given_after_none_is_traced_again():
    """Not hybridized, plain Gluon takes either call; the mirrored block traces each structure once."""
    net = mirror(MaskedEncoder(), cache_dir=False)
    net.initialize()
    x = mx.nd.ones((2, 6, 5))
    with autograd.record():
        without = net(x, None)
        with_length = net(x, mx.nd.array([2, 6]))
        total = without.sum() + with_length.sum()
    total.backward()
    assert len(mirror_state(net).plans) == 2
    expected_without, expected_with = net(x, None), net(x, mx.nd.array([2, 6]))  # plain, not recorded
    np.testing.assert_allclose(without.asnumpy(), expected_without.asnumpy(), rtol=1e-6)
    np.testing.assert_allclose(with_length.asnumpy(), expected_with.asnumpy(), rtol=1e-6)
    assert not np.allclose(without.asnumpy(), with_length.asnumpy())


def test_plan_block_takes_the_nested_call():
    model = LSTMLanguageModel()
    model.initialize()
    plan = plan_block(model, (STEPS, BATCH), [(2, BATCH, 16), (2, BATCH, 16)], cache_dir=False)
    assert "data0 12x4, data1 2x4x16, data2 2x4x16" in plan.summary()  # the states are inputs
    assert plan.planned_mb <= plan.baseline_mb


def test_an_input_that_is_not_an_array_fails_clearly():
    net = mirror(MaskedEncoder(), cache_dir=False)
    net.initialize()
    with pytest.raises(GluonMirrorError, match=r"NDArrays, None and \(nested\) lists"):
        with autograd.record():
            net(mx.nd.ones((2, 6, 5)), "length")
