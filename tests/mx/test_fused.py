"""The registry of fused operators (core/fused.py) and the rewrites together (mx/fused.py): the
rewritten graph costs what the user's does, what backward adds is the recomputation only."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook.core.cost import forward_cost, iteration_cost
from mxnet_mirror_hook.core.fused import fused_counts, fused_kind, fused_outside_bytes, fused_recompute_cost
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.mx.fused import fuse_for_recomputation
from mxnet_mirror_hook.testing.models import bert_mlm, bert_mlm_shapes

SEQ, BATCH, HEADS, UNITS = 32, 4, 4, 64


def graphs(dropout: float):
    symbol = bert_mlm(layers=2, units=UNITS, heads=HEADS, hidden=128, vocab=100, seq_len=SEQ, max_length=SEQ,
                      masked=8, dropout=dropout)
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    shapes = normalize_inputs(sorted(dict(data + label).items()))
    rewritten = fuse_for_recomputation(symbol, with_dropout=dropout > 0)
    return symbol_to_graph(symbol, shapes), symbol_to_graph(rewritten, shapes)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_rewritten_graph_costs_what_the_users_does(dropout):
    plain, fused = graphs(dropout)
    assert fused_counts(fused) == {"core attention": 2, "LayerNorm": 4, "activation": 2}
    assert iteration_cost(fused) == pytest.approx(iteration_cost(plain), rel=1e-12)
    assert sum(forward_cost(fused, n) for n in fused.nodes) == pytest.approx(
        sum(forward_cost(plain, n) for n in plain.nodes), rel=1e-12)


def test_backward_adds_the_recomputation_only():
    _, fused = graphs(0.0)
    square = BATCH * HEADS * SEQ * SEQ
    per_head = UNITS // HEADS
    attention = 2 * (2 * square * per_head + 5 * square)       # query-key product and softmax, two layers
    layer_norms = 8 * (3 * SEQ * BATCH * UNITS + BATCH * 8 * UNITS)  # three in the layers, mlm_ln (8 masked)
    gelus = 2 * 2 * (SEQ * BATCH * 128)                        # two GELU forwards (2 operations each)
    assert fused_recompute_cost(fused) == pytest.approx(attention + layer_norms + gelus)
    kinds = {fused_kind(node).name for node in fused.nodes if fused_kind(node) is not None}
    assert kinds == {"core attention", "LayerNorm", "activation"}
    assert fused_outside_bytes(fused) > 0


def test_a_graph_without_patterns_has_no_fused_operators():
    plain, _ = graphs(0.0)
    assert fused_counts(plain) == {} and fused_recompute_cost(plain) == 0 and fused_outside_bytes(plain) == 0


@pytest.mark.parametrize("keep_ops, left", [(("LayerNorm",), "LayerNorm"), (("softmax",), "core attention"),
                                            (("LeakyReLU",), "activation")])
def test_keep_ops_leaves_the_kinds_that_would_recompute_them(keep_ops, left):
    symbol = bert_mlm(layers=2, units=UNITS, heads=HEADS, hidden=128, vocab=100, seq_len=SEQ, max_length=SEQ,
                      masked=8, dropout=0.0)
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    shapes = normalize_inputs(sorted(dict(data + label).items()))
    counts = fused_counts(symbol_to_graph(fuse_for_recomputation(symbol, keep_ops=keep_ops), shapes))
    assert left not in counts and len(counts) == 2
