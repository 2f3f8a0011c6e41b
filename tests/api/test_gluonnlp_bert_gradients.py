"""gluonnlp 0.10's BERT under ``mirror(net)`` gets the gradients plain Gluon gets.

MXNet 1.9.1's mirror recomputing a ``LayerNorm`` whose input is a residual sum over a Dropout gave
wrong gradients with the right loss: a 4-layer ``bert_12_768_12`` (dropout 0.1, seq 128) had 68 of
73 parameter gradients non-finite under the default options and 13 wrong under
``max_overhead=0.05`` (found running gluonnlp's ``run_pretraining.py``, whose loss then stopped
falling).  LayerNorm is never recomputed since (``core.graph.NEVER_MIRRORED_OPS``).  The
comparison allows MKLDNN's rounding (executor against CachedOp kernels), not more.
"""
from __future__ import annotations

from typing import Dict, Tuple

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.gluon import mirror, mirror_state

nlp = pytest.importorskip("gluonnlp")

LAYERS, SEQ, BATCH = 4, 128, 4


def _bert(dropout: float) -> "mx.gluon.HybridBlock":
    vocab = nlp.vocab.BERTVocab(nlp.data.count_tokens([f"w{i}" for i in range(500)]))
    mx.random.seed(0)
    net, _ = nlp.model.get_model("bert_12_768_12", dataset_name=None, vocab=vocab, pretrained=False,
                                 hparam_allow_override=True, num_layers=LAYERS, dropout=dropout,
                                 use_decoder=False)
    net.initialize(init=mx.init.Normal(0.02))
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def _gradients(net) -> Tuple[float, Dict[str, np.ndarray]]:
    tokens, types = mx.nd.zeros((BATCH, SEQ)), mx.nd.zeros((BATCH, SEQ))
    valid = mx.nd.ones((BATCH,)) * SEQ
    mx.random.seed(1)  # the same Dropout masks in both runs
    with mx.autograd.record():
        _, _, pooled = net(tokens, types, valid)
        loss = mx.gluon.loss.SoftmaxCELoss()(pooled, mx.nd.zeros((BATCH,))).mean()
    loss.backward()
    return float(loss.asscalar()), {name.split("_", 1)[1]: p.grad().asnumpy()
                                    for name, p in net.collect_params().items() if p.grad_req != "null"}


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"max_overhead": 0.05}], ids=["default", "max_overhead"])
def test_gluonnlp_bert_with_dropout_gets_plain_gluons_gradients(options):
    plain_loss, plain = _gradients(_bert(0.1))
    net = mirror(_bert(0.1), cache_dir=False, **options)
    mirrored_loss, mirrored = _gradients(net)
    plan = mirror_state(net).last_plan
    assert plan is not None and plan.mirrored  # the step ran through a plan that recomputes
    assert not any(node.startswith("layernorm") or "_layernorm" in node for node in plan.mirrored)
    assert mirrored_loss == pytest.approx(plain_loss, rel=1e-6)
    assert sorted(mirrored) == sorted(plain)
    for name, expected in plain.items():
        assert np.isfinite(mirrored[name]).all(), name
        np.testing.assert_allclose(mirrored[name], expected, rtol=1e-3, atol=1e-6, err_msg=name)
