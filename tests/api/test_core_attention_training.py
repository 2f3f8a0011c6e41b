"""Training through ``MirroredModule`` with the fused operators (the core attention, LayerNorms and
GELUs each recomputed inside one operator: planning/fused.py) equals plain ``mx.mod.Module``: two
SGD steps of a small BERT MLM,
parameters and gradients bit for bit without MKLDNN (each case in a fresh process), with the
padding mask, and with the attention dropout against a plain graph fed the masks forward drew."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Dict, List

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook import MirroredModule
from mxnet_mirror_hook.cache import get_cache
from mxnet_mirror_hook.core.attention import core_attention_workspace
from mxnet_mirror_hook.core.fused import fused_counts
from mxnet_mirror_hook.core.fused_activation import fused_activation_workspace
from mxnet_mirror_hook.core.fused_layer_norm import fused_layer_norm_workspace
from mxnet_mirror_hook.mx.attention import CoreAttentionOp
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.options import MirrorOptions
from mxnet_mirror_hook.planning.fused import plan_fused
from mxnet_mirror_hook.planning.footprint import FootprintSource
from mxnet_mirror_hook.planning.one_level import plan_one_level
from mxnet_mirror_hook.planning.setup import PlanRequest
from mxnet_mirror_hook.testing.models import bert_mlm_shapes
from tests.helpers import SyncedModule
from tests.mx.test_core_attention import BATCH, HEADS, SEQ, _masked_reference, small_bert
from tests.paths import ROOT

INPUTS = ("data", "token_types", "masked_positions")


class AttentionModule(MirroredModule):
    """``MirroredModule`` binding :func:`plan_fused`'s plan (until ``plan_mirror`` offers it)."""

    def _plan_for(self, data_shapes, label_shapes, grad_req):
        setup = PlanRequest(list(data_shapes), list(label_shapes or []) or None,
                            grad_req).prepare(self._user_symbol, self.mirror_options)
        plan = plan_fused(setup, self.mirror_options)
        assert plan is not None
        return plan


def _batches(padding_mask: bool, steps: int, extra: int = 0):
    rng = np.random.RandomState(5)
    for _ in range(steps):
        data = [rng.randint(0, 100, (BATCH, SEQ)), np.zeros((BATCH, SEQ)),
                np.stack([rng.choice(SEQ, 8, replace=False) for _ in range(BATCH)])]
        if padding_mask:
            data.append(rng.randint(SEQ // 3, SEQ + 1, (BATCH,)))
        yield [mx.nd.array(a) for a in data], [mx.nd.array(rng.randint(0, 100, (BATCH, 8)))]


def _names(padding_mask: bool):
    return INPUTS + (("valid_length",) if padding_mask else ())


def _start(module, names, padding_mask, extra_shapes=()):
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8, padding_mask=padding_mask)
    module.bind(data + list(extra_shapes), label)
    mx.random.seed(11)
    module.init_params(mx.init.Xavier(magnitude=2.0))
    module.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.05, "momentum": 0.9})


def _grads(module) -> Dict[str, np.ndarray]:
    mx.nd.waitall()
    return {name: g[0].asnumpy().copy()
            for name, g in zip(module._exec_group.param_names, module._exec_group.grad_arrays)}


def _assert_same(plain, mirrored, plain_grads, mirrored_grads):
    for name in plain_grads:
        np.testing.assert_array_equal(mirrored_grads[name], plain_grads[name], err_msg=f"gradient {name}")
    for name, value in plain.get_params()[0].items():
        np.testing.assert_array_equal(mirrored.get_params()[0][name].asnumpy(), value.asnumpy(),
                                      err_msg=f"parameter {name}")


def compare(padding_mask: bool, module: type = AttentionModule, **options) -> None:
    """Two SGD steps plainly and with the attention plan; raise unless bit-identical."""
    symbol = small_bert(padding_mask=padding_mask)
    names = _names(padding_mask)
    plain = SyncedModule(symbol, data_names=names)
    mirrored = module(symbol, data_names=names, cache_dir=False, **options)
    for module in (plain, mirrored):
        _start(module, names, padding_mask)
    for data, label in _batches(padding_mask, 2):
        grads = []
        for module in (plain, mirrored):
            module.forward_backward(mx.io.DataBatch(data, label))
            grads.append(_grads(module))
            module.update()
        _assert_same(plain, mirrored, *grads)
    plan = mirrored.mirror_plan
    assert '"op_type": "mirror_core_attention"' in plan.symbol.tojson()
    assert plan.planned_mb < plan.baseline_mb
    print(f"identical: {plan.summary()}")


def compare_dropout() -> None:
    """Two SGD steps with the attention dropout inside the operator, against the plain graph fed
    the masks each forward drew (the network's other Dropouts at p=0); raise unless bit-identical."""
    document = json.loads(small_bert(dropout=0.1).tojson())
    for node in document["nodes"]:
        if node["op"] == "Dropout" and not node["name"].endswith("att_drop"):
            node["attrs"]["p"] = "0"
    symbol = mx.sym.load_json(json.dumps(document))
    reference, count = _masked_reference(symbol)
    masks = [f"mask{i}" for i in range(count)]
    mirrored = AttentionModule(symbol, data_names=INPUTS, cache_dir=False, recompute_dropout=True,
                               memory_budget="min")
    plain = SyncedModule(reference, data_names=INPUTS + tuple(masks))
    _start(mirrored, INPUTS, False)
    _start(plain, INPUTS, False, [(m, (BATCH, HEADS, SEQ, SEQ)) for m in masks])
    drawn: List[np.ndarray] = []
    original = CoreAttentionOp._keep
    CoreAttentionOp._keep = lambda self, shape: drawn.append(original(self, shape)) or drawn[-1]
    try:
        for data, label in _batches(False, 2):
            drawn.clear()
            mirrored.forward_backward(mx.io.DataBatch(data, label))
            mirrored_grads = _grads(mirrored)
            assert len(drawn) == count
            scale = np.float32(1) / np.float32(0.9)
            fed = [mx.nd.array((keep.astype(np.float32) * scale).reshape(BATCH, HEADS, SEQ, SEQ))
                   for keep in drawn]
            plain.forward_backward(mx.io.DataBatch(data + fed, label))
            plain_grads = _grads(plain)
            for module in (plain, mirrored):
                module.update()
            _assert_same(plain, mirrored, plain_grads, mirrored_grads)
    finally:
        CoreAttentionOp._keep = original
    print(f"identical: {mirrored.mirror_plan.summary()}")


CASES = {
    "no dropout, max_overhead 0.5": "compare(False, max_overhead=0.5)",
    "no dropout, 'min' (the mirror recomputes the rest)": "compare(False, memory_budget='min')",
    "padding mask": "compare(True, max_overhead=0.5)",
    "attention dropout against fed masks": "compare_dropout()",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_with_the_fused_attention_is_bit_identical_to_module(case):
    code = f"from tests.api.test_core_attention_training import *; {CASES[case]}"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, MXNET_MKLDNN_ENABLED="0", PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout


def test_save_checkpoint_writes_the_users_symbol(tmp_path):
    symbol = small_bert()
    module = AttentionModule(symbol, data_names=INPUTS, cache_dir=False, max_overhead=0.5)
    _start(module, INPUTS, False)
    assert "mirror_core_attention" in module.mirror_plan.symbol.tojson()
    module.save_checkpoint(str(tmp_path / "bert"), 1)
    saved = (tmp_path / "bert-symbol.json").read_text()
    assert "mirror_core_attention" not in saved
    assert json.loads(saved)["nodes"] == json.loads(symbol.tojson())["nodes"]


def test_the_plan_cache_keeps_the_rewritten_and_the_users_plans_apart(tmp_path):
    symbol = small_bert()
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    options = MirrorOptions(cache_dir=str(tmp_path), memory_budget="min", backend="mirror")
    setup = PlanRequest(data, label).prepare(symbol, options)
    fused = plan_fused(setup, options)
    plain = plan_one_level(setup, options)
    assert "mirror_core_attention" in fused.symbol.tojson()
    assert "mirror_core_attention" not in plain.symbol.tojson()
    assert not plain.from_cache  # the rewritten plan's entry is not the user's symbol's
    again = plan_fused(setup, options)
    assert again.from_cache and again.mirrored == fused.mirrored
    assert get_cache(str(tmp_path)).get(setup.key(options))["mirrored"] == list(plain.mirrored)


def test_outside_plan_memory_is_reported_and_in_the_footprint():
    symbol = small_bert(dropout=0.1)
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    options = MirrorOptions(cache_dir=False, max_overhead=0.5, recompute_dropout=True)
    setup = PlanRequest(data, label).prepare(symbol, options)
    plan = plan_fused(setup, options)
    square = BATCH * HEADS * SEQ * SEQ
    graph = symbol_to_graph(plan.symbol, normalize_inputs(sorted(dict(data + label).items())))
    # the whole batch in one pass (16 MB holds it): four kept s^2 float32 buffers, two layers' bit masks
    assert core_attention_workspace(graph) == (4 * square * 4, 2 * square // 8)
    kinds = fused_counts(graph)
    assert kinds == {"core attention": 2, "LayerNorm": 4, "activation": 2}  # ln1s, ln2 before a layer, mlm_ln
    assert plan.outside_plan_mb == pytest.approx(
        (4 * square * 4 + 2 * square / 8 + fused_layer_norm_workspace(graph)
         + fused_activation_workspace(graph)) / 2 ** 20)
    assert plan.activation_mb == pytest.approx(plan.planned_mb + plan.outside_plan_mb)
    assert "outside MXNet's plan" in plan.summary()
    assert 0 < plan.overhead <= 0.5
    sourced = dataclasses.replace(plan, footprint_source=FootprintSource.of_setup(setup))
    footprint = sourced.footprint
    assert footprint.fused_space == pytest.approx(plan.outside_plan_mb)
    assert footprint.activations == plan.planned_mb
    assert footprint.to_dict()["fused_space"] == footprint.fused_space  # its own line


def test_no_plan_when_the_attention_alone_exceeds_max_overhead():
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    options = MirrorOptions(cache_dir=False, max_overhead=0.001)
    assert plan_fused(PlanRequest(data, label).prepare(small_bert(), options), options) is None


def test_no_plan_for_a_symbol_without_core_attention():
    from tests.helpers import dropout_mlp

    options = MirrorOptions(cache_dir=False, max_overhead=0.05)
    setup = PlanRequest([("data", (8, 64))], [("softmax_label", (8,))]).prepare(dropout_mlp(2, 64), options)
    assert plan_fused(setup, options) is None


def test_an_attention_dropout_without_recompute_dropout_is_said_and_left(caplog):
    import logging

    options = MirrorOptions(cache_dir=False, max_overhead=0.5)
    data, label = bert_mlm_shapes(BATCH, SEQ, masked=8)
    setup = PlanRequest(data, label).prepare(small_bert(dropout=0.1), options)
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook"):
        plan = plan_fused(setup, options)
    graph = symbol_to_graph(plan.symbol, normalize_inputs(sorted(dict(data + label).items())))
    assert "core attention" not in fused_counts(graph)       # left with its Dropout
    assert "CoreAttention" not in plan.symbol.tojson() and "mirror_core_attention" not in plan.symbol.tojson()
    (line,) = [r.getMessage() for r in caplog.records if "found with a Dropout" in r.getMessage()]
    assert line.startswith("core attention: 2 found") and "recompute_dropout=True" in line


def test_auto_under_max_overhead_takes_the_fused_operators_when_they_are_lower(caplog):
    import logging
    import re

    from mxnet_mirror_hook import plan_mirror
    from mxnet_mirror_hook.testing.models import bert_mlm

    # Large enough that the s^2 tensors outweigh the fused operators' own temporaries.
    symbol = bert_mlm(layers=2, units=256, heads=8, hidden=512, vocab=100, seq_len=512, max_length=512,
                      masked=8, dropout=0.0)
    data, label = bert_mlm_shapes(4, 512, masked=8)
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook"):
        plan = plan_mirror(symbol, data, label, max_overhead=0.3, cache_dir=False)
    assert '"op_type": "mirror_core_attention"' in plan.symbol.tojson()
    assert plan.backend == "mirror" and plan.overhead <= 0.3 and plan.outside_plan_mb > 0
    assert plan.ratio == plan.activation_mb / plan.baseline_mb < 1  # what the operator holds counted
    (line,) = [r.getMessage() for r in caplog.records if "max_overhead: fused operators (" in r.getMessage()]
    beaten = float(re.search(r"are below the \w+ plan \((\d+) MB\)", line).group(1))
    assert plan.activation_mb < beaten
    module = MirroredModule(symbol, data_names=INPUTS, max_overhead=0.3, cache_dir=False)
    module.bind(data, label)
    assert module.mirror_plan.symbol.tojson() == plan.symbol.tojson()


def test_the_least_memory_under_auto_takes_the_fused_operators_when_they_are_lower():
    from mxnet_mirror_hook import plan_mirror
    from mxnet_mirror_hook.testing.models import bert_mlm

    symbol = bert_mlm(layers=2, units=256, heads=8, hidden=512, vocab=100, seq_len=512, max_length=512,
                      masked=8, dropout=0.0)
    data, label = bert_mlm_shapes(4, 512, masked=8)
    plain = plan_mirror(symbol, data, label, memory_budget="min", backend="mirror", cache_dir=False)
    least = plan_mirror(symbol, data, label, memory_budget="min", cache_dir=False)
    assert '"op_type": "mirror_core_attention"' in least.symbol.tojson()
    assert least.activation_mb < plain.activation_mb and least.outside_plan_mb > 0
    assert least.overhead < plain.overhead      # and far cheaper than recomputing the products
