"""Networks users bring (gluonnlp 0.10's BERT, RoBERTa, ERNIE) under ``mirror(net, max_overhead=...)``:
regressions found by training them against plain Gluon.

gluonnlp's self-attention masks its scores with ``softmax(score, length=valid_len, use_length=True)``
(``DotProductSelfAttentionCell``), its lengths an ``int32`` array the encoder builds once from
``valid_length`` and every layer reads.  With executor segments (chosen by ``backend='auto'`` under
``max_overhead`` for these networks when they have no Dropout, or with ``recompute_dropout=True``),
the gradients through such a softmax are wrong: on ``roberta_12_768_12`` (8 segments) the query and
key weights of several layers get a zero gradient, and the embeddings' gradients differ by 1-2 %.
The network below is that attention without gluonnlp (one layer, two segments); plain Gluon is the
reference, and the guarantee is bit for bit without MKLDNN, within 1e-5 relative with it.

gluonnlp's AWD-LSTM drops its embedding's weight (``apply_weight_drop``: a ``WeightDropParameter``
whose ``data()`` is a recorded Dropout of the stored weight); under ``mirror(net)`` that Parameter's
gradient is not marked fresh and ``Trainer.step`` raises, where plain Gluon trains.

A 2-layer gluonnlp RoBERTa under ``backend='segments', max_overhead=0.05`` (a 7-segment selective
chain; ``'auto'`` chooses it too without MKLDNN) fails in MXNet's backward: an Embedding is asked for
the gradient of its indices.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

STEPS, BATCH, UNITS, HEADS = 8, 2, 16, 2


def _attention_block(use_length: bool) -> "mx.gluon.HybridBlock":
    """One gluonnlp-style self-attention layer with a residual: interleaved query-key-value
    projection, scores masked by the valid lengths (``use_length``) or not, product with the values."""
    from mxnet import gluon

    class Attention(gluon.HybridBlock):
        def __init__(self) -> None:
            super().__init__(prefix="net_")
            with self.name_scope():
                self.qkv = gluon.nn.Dense(3 * UNITS, flatten=False, prefix="qkv_")
                self.out = gluon.nn.Dense(UNITS, flatten=False, prefix="out_")

        def hybrid_forward(self, F, x, valid_length):  # x: (steps, batch, units), as gluonnlp's
            steps = F.contrib.arange_like(x, axis=0)
            length = F.broadcast_add(F.reshape(valid_length, shape=(-1, 1)),
                                     F.reshape(F.zeros_like(steps), shape=(1, -1)))
            length = F.cast(length, dtype="int32")
            length = F.broadcast_axis(F.expand_dims(length, axis=1), axis=1, size=HEADS)
            length = length.reshape(shape=(-1, 0), reverse=True)
            qkv = self.qkv(x)
            score = F.contrib.interleaved_matmul_selfatt_qk(qkv, heads=HEADS)
            if use_length:
                weights = F.softmax(score, length=length, use_length=True, axis=-1)
            else:
                weights = F.broadcast_add(F.softmax(score, axis=-1),
                                          F.expand_dims(F.cast(length, "float32"), -1) * 0)
            context = F.contrib.interleaved_matmul_selfatt_valatt(qkv, weights, heads=HEADS)
            return x + self.out(context)

    return Attention()


def _gradients(use_length: bool, **mirror_options) -> Dict[str, np.ndarray]:
    """One backward of ``sum(y * y)`` at a fixed seed: the Parameters' gradients by name (the
    block plain when no options are given)."""
    from mxnet import autograd

    from mxnet_mirror_hook.gluon import mirror

    mx.random.seed(1)
    net = _attention_block(use_length)
    net.initialize(mx.init.Normal(0.5))
    net.hybridize()
    if mirror_options:
        mirror(net, cache_dir=False, **mirror_options)
    rng = np.random.RandomState(0)
    x = mx.nd.array(rng.randn(STEPS, BATCH, UNITS))
    valid_length = mx.nd.array([STEPS, STEPS - 3])
    with autograd.record():
        y = net(x, valid_length)
        loss = (y * y).sum()
    loss.backward()
    return {name: param.grad().asnumpy() for name, param in net.collect_params().items()}


def _assert_close(plain: Dict[str, np.ndarray], mirrored: Dict[str, np.ndarray]) -> None:
    for name, gradient in plain.items():
        scale = float(np.abs(gradient).max())
        difference = float(np.abs(gradient - mirrored[name]).max())
        assert difference <= 1e-5 * scale, f"{name}: gradients differ by {difference:g} (largest {scale:g})"


def test_segments_match_plain_gluon_on_an_unmasked_interleaved_attention():
    _assert_close(_gradients(False), _gradients(False, backend="segments", segments=2))


def test_segments_match_plain_gluon_on_a_length_masked_interleaved_attention():
    # NOTE [ boundaries that get no gradient ] in mx/segments/layout.py: the int32 lengths cross the cut
    _assert_close(_gradients(True), _gradients(True, backend="segments", segments=2))


def test_a_weight_dropped_embedding_trains_under_mirror_as_under_plain_gluon(caplog):
    # NOTE [ a Parameter computed at each call trains plainly ] in gluon/state.py
    pytest.importorskip("gluonnlp")
    from gluonnlp.model.utils import apply_weight_drop
    from mxnet import autograd, gluon

    from mxnet_mirror_hook.gluon import mirror

    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Embedding(50, 8), gluon.nn.Dense(50, flatten=False))
    apply_weight_drop(net[0], "weight", 0.1, axes=(1,))
    net.initialize()
    net.hybridize()
    mirror(net, cache_dir=False)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    tokens = mx.nd.array(np.random.RandomState(0).randint(0, 50, (4, 3)))
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(tokens), tokens).mean()
    loss.backward()
    trainer.step(1)  # before: "has not been updated by backward since last step"
    from mxnet_mirror_hook.gluon import mirror_state

    assert "compute their value at each call" in mirror_state(net).plain_reason
    assert np.isfinite(net[0].weight.data().asnumpy()).all()


def _roberta_gradients(**mirror_options) -> Dict[str, np.ndarray]:
    nlp = pytest.importorskip("gluonnlp")
    from mxnet import autograd, gluon

    from mxnet_mirror_hook.gluon import mirror

    mx.random.seed(7)
    vocab = nlp.vocab.BERTVocab(nlp.data.count_tokens([f"w{index}" for index in range(1000)]))
    net, _ = nlp.model.get_model("roberta_12_768_12", vocab=vocab, dataset_name=None, pretrained=False,
                                 dropout=0.0, num_layers=2, hparam_allow_override=True, use_decoder=True)
    net.initialize(mx.init.Normal(0.02))
    net.hybridize()
    if mirror_options:
        mirror(net, cache_dir=False, **mirror_options)
    rng = np.random.RandomState(0)
    tokens = mx.nd.array(rng.randint(0, len(vocab), (2, 64)))
    masked = mx.nd.array(rng.randint(0, 54, (2, 8)))
    labels = mx.nd.array(rng.randint(0, len(vocab), (16,)))
    with autograd.record():
        _, scores = net(tokens, mx.nd.array([64, 54]), masked)
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(scores.reshape((-1, len(vocab))), labels).mean()
    loss.backward()  # before: MXNet refused "Embedding layer doesn't support calculate data gradient"
    # by position: a second model's prefixes are numbered on (bertencoder0_, bertencoder1_...)
    return {str(index): param.grad().asnumpy()
            for index, param in enumerate(net.collect_params().values()) if param.grad_req != "null"}


def test_a_two_layer_gluonnlp_roberta_trains_with_selective_segments_as_plain_gluon():
    # NOTE [ boundaries that get no gradient ]: position indices cross a cut into an Embedding
    _assert_close(_roberta_gradients(), _roberta_gradients(backend="segments", max_overhead=0.05))
