"""Symbols whose operators repeat names (legal in MXNet: gluoncv's video networks, xception) plan,
train, cache and checkpoint like any other; decisions are attached to nodes by key, never by name
(NOTE [ nodes are identified by key, not by name ] in core/graph.py)."""
from __future__ import annotations

import json
import warnings

import mxnet as mx
from mxnet import gluon
import pytest

from mxnet_mirror_hook import BudgetUnreachableError, MirroredModule, plan_mirror
from mxnet_mirror_hook.mx.convert import MIRROR_ATTR
from mxnet_mirror_hook.mx.dropout import recomputable_dropout
from tests.api.test_equivalence import ARCHITECTURES, RANDOM_PLANNER, assert_same_training
from tests.repeated_names import operator_names, repeated_mlp, with_repeated_names


def _marked_positions(symbol: "mx.sym.Symbol") -> list:
    nodes = json.loads(symbol.tojson())["nodes"]
    return [i for i, node in enumerate(nodes) if (node.get("attrs") or {}).get(MIRROR_ATTR) == "True"]


def _plan(symbol, data_shape, label_shape, **options):
    return plan_mirror(symbol, [("data", data_shape)], [("softmax_label", label_shape)], **options)


@pytest.fixture(scope="module")
def residual():
    symbol, data_shape, label_shape = ARCHITECTURES["residual"]()
    return symbol, with_repeated_names(symbol), data_shape, label_shape


def test_a_symbol_of_repeated_names_is_handmade_as_intended(residual):
    _, repeated, _, _ = residual
    names = operator_names(repeated)
    assert names.count("convolution") > 3 and names.count("activation") > 3


@pytest.mark.parametrize("budget", [None, "min", 0.8])
def test_repeated_names_get_the_plan_of_unique_names_marked_at_the_same_nodes(residual, budget):
    unique, repeated, data_shape, label_shape = residual
    plain = _plan(unique, data_shape, label_shape, memory_budget=budget, cache_dir=False)
    plan = _plan(repeated, data_shape, label_shape, memory_budget=budget, cache_dir=False)
    assert (plan.baseline_mb, plan.planned_mb) == (plain.baseline_mb, plain.planned_mb)
    assert plan.planned_mb < plan.baseline_mb
    assert _marked_positions(plan.symbol) == _marked_positions(plain.symbol)
    assert any("#" in key for key in plan.mirrored)  # keys of repeats, e.g. 'activation#3'
    assert operator_names(plan.symbol) == operator_names(repeated)  # the user's names


def test_the_plan_marks_exactly_the_keyed_nodes():
    symbol = repeated_mlp(layers=4, hidden=512)
    plan = _plan(symbol, (2048, 64), (2048,), memory_budget="min", cache_dir=False)
    keys = [name if k == 0 else f"{name}#{k}" for name in ("fc", "relu") for k in range(4)]
    assert set(plan.mirrored) <= set(keys) | {"out", "softmax"} and plan.mirrored
    nodes = [n for n in json.loads(plan.symbol.tojson())["nodes"] if n["op"] != "null"]
    seen = {}
    for node in nodes:
        k = seen.get(node["name"], 0)
        seen[node["name"]] = k + 1
        key = node["name"] if k == 0 else f"{node['name']}#{k}"
        assert ((node.get("attrs") or {}).get(MIRROR_ATTR) == "True") == (key in plan.mirrored), key


def test_mirrored_module_with_repeated_names_trains_bit_identical_to_module(residual):
    _, repeated, data_shape, label_shape = residual
    plan = assert_same_training(repeated, data_shape, label_shape, "auto", tolerance=0)
    assert plan.mirrored and plan.planned_mb < plan.baseline_mb


def test_a_random_half_of_repeated_names_recomputed_trains_bit_identical_to_module():
    symbol, data_shape, label_shape = ARCHITECTURES["inception"]()
    plan = assert_same_training(with_repeated_names(symbol), data_shape, label_shape, RANDOM_PLANNER,
                                tolerance=0)
    assert any("#" in key for key in plan.mirrored)


def test_save_checkpoint_writes_the_users_names(tmp_path):
    symbol = repeated_mlp(layers=3, hidden=256)
    module = MirroredModule(symbol, memory_budget="min", cache_dir=False)
    module.bind([("data", (1024, 32))], [("softmax_label", (1024,))])
    module.init_params(mx.init.Xavier())
    assert module.mirror_plan.mirrored
    prefix = str(tmp_path / "repeated")
    module.save_checkpoint(prefix, 1)
    saved = mx.sym.load(prefix + "-symbol.json")
    assert operator_names(saved) == operator_names(symbol) == ["fc", "relu"] * 3 + ["out", "softmax"]
    assert not _marked_positions(saved)
    params = mx.nd.load(prefix + "-0001.params")
    assert {f"arg:fc{i}_weight" for i in range(3)} <= set(params)


def test_a_cached_plan_of_repeated_names_comes_back_with_the_same_keys(residual):
    _, repeated, data_shape, label_shape = residual
    first = _plan(repeated, data_shape, label_shape, memory_budget="min")
    again = _plan(repeated, data_shape, label_shape, memory_budget="min")
    assert again.from_cache and not first.from_cache
    assert again.mirrored == first.mirrored
    assert _marked_positions(again.symbol) == _marked_positions(first.symbol)


def test_dropouts_of_one_name_are_rewritten_recomputable_and_plan():
    symbol, data_shape, label_shape = ARCHITECTURES["mlp_dropout"]()
    repeated = with_repeated_names(symbol)
    assert operator_names(repeated).count("dropout") > 1
    rewritten = recomputable_dropout(repeated)
    names = operator_names(rewritten)
    assert names.count("dropout_mask_draw") == operator_names(repeated).count("dropout")
    assert rewritten.list_arguments() == repeated.list_arguments()
    plan = _plan(repeated, data_shape, label_shape, memory_budget="min", recompute_dropout=True,
                 cache_dir=False)
    assert plan.planned_mb <= plan.baseline_mb


def test_the_segment_backend_plans_repeated_names_as_unique_ones(residual):
    unique, repeated, data_shape, label_shape = residual
    plain = _plan(unique, data_shape, label_shape, memory_budget="min", backend="segments", cache_dir=False)
    plan = _plan(repeated, data_shape, label_shape, memory_budget="min", backend="segments", cache_dir=False)
    assert plan.backend == "segments" and plan.segment_count > 1
    assert plan.planned_mb == plain.planned_mb
    assert [s.nodes for s in plan.segment_plan.segments] != [s.nodes for s in plain.segment_plan.segments]


def test_backend_auto_plans_repeated_names_without_falling_back(residual):
    unique, repeated, data_shape, label_shape = residual
    plain = _plan(unique, data_shape, label_shape, memory_budget="min", backend="auto", cache_dir=False)
    plan = _plan(repeated, data_shape, label_shape, memory_budget="min", backend="auto", cache_dir=False)
    assert plan.fallback is None and plain.fallback is None
    assert (plan.backend, plan.planned_mb) == (plain.backend, plain.planned_mb)


def test_segments_of_repeated_names_train_bit_identical_to_those_of_unique_names(residual):
    from tests.api.test_equivalence import train_and_capture

    unique, repeated, data_shape, label_shape = residual
    runs = []
    for symbol in (unique, repeated):
        module = MirroredModule(symbol, backend="segments", memory_budget="min", cache_dir=False)
        runs.append(train_and_capture(module, data_shape, label_shape))
        assert module.mirror_plan.backend == "segments" and module.mirror_plan.segment_count > 1
    for left, right in zip(*runs):
        assert sorted(left) == sorted(right)
        for name in left:
            assert (left[name] == right[name]).all(), name



def _uniquely_renamed(symbol: "mx.sym.Symbol") -> "mx.sym.Symbol":
    document = json.loads(symbol.tojson())
    heads = {head[0] for head in document["heads"]}
    for position, node in enumerate(document["nodes"]):
        if node["op"] != "null" and position not in heads:
            node["name"] = f"{node['name']}__{position}"
    return mx.sym.load_json(json.dumps(document))


def _gluoncv(network: str) -> "mx.sym.Symbol":
    from mxnet_mirror_hook.testing.models import gluon_symbol

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gluoncv's "already initialized" parameter warnings
        symbol, _ = gluon_symbol(network, classes=10)
    names = operator_names(symbol)
    assert len(set(names)) < len(names), f"{network} no longer repeats operator names"
    return symbol


GLUONCV = {"c3d": ("c3d_kinetics400", (1, 3, 16, 112, 112)), "xception": ("xception", (1, 3, 299, 299))}
OPTIONS = {"default": {}, "half": {"memory_budget": 0.5}, "auto": {"backend": "auto"}}


@pytest.mark.slow
@pytest.mark.parametrize("network, options", [
    pytest.param(network, options, id=f"{network}-{options}") for network in GLUONCV for options in OPTIONS])
def test_gluoncv_networks_with_repeated_names_plan_as_if_their_names_were_unique(network, options):
    network, shape = GLUONCV[network]
    options = OPTIONS[options]
    symbol = _gluoncv(network)
    unique = _uniquely_renamed(symbol)
    try:
        plain = plan_mirror(unique, [("data", shape)], cache_dir=False, **options)
    except BudgetUnreachableError:
        with pytest.raises(BudgetUnreachableError):
            plan_mirror(symbol, [("data", shape)], cache_dir=False, **options)
        return
    plan = plan_mirror(symbol, [("data", shape)], cache_dir=False, **options)
    assert (plan.baseline_mb, plan.planned_mb) == (plain.baseline_mb, plain.planned_mb)
    assert plan.planned_mb < plan.baseline_mb
    assert _marked_positions(plan.symbol) == _marked_positions(plain.symbol)
    assert operator_names(plan.symbol) == operator_names(symbol)


class SharedActivationNet(gluon.HybridBlock):
    """Dense layers sharing one Activation block: its operator is traced under one name each call."""

    def __init__(self, hidden: int = 1024, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.act = gluon.nn.Activation("relu")
            self.dense0 = gluon.nn.Dense(hidden)
            self.dense1 = gluon.nn.Dense(hidden)
            self.dense2 = gluon.nn.Dense(hidden)
            self.out = gluon.nn.Dense(10)

    def hybrid_forward(self, F, x):
        for layer in (self.dense0, self.dense1, self.dense2):
            x = self.act(layer(x))
        return self.out(x)


def test_a_gluon_block_tracing_repeated_names_trains_bit_identical_to_plain_gluon(tmp_path):
    from mxnet_mirror_hook.gluon import mirror_state
    from tests.api.test_gluon_mirror import _assert_identical, _batches, _train_step, _twins

    shape = (1024, 64)
    traced = SharedActivationNet()
    traced.initialize()
    names = operator_names(traced(mx.sym.var("data")))
    assert len(set(names)) < len(names)
    (plain, plain_trainer), (net, trainer) = _twins(SharedActivationNet, tmp_path, shape)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for data, label in _batches(2, shape):
        _train_step(plain, plain_trainer, data, label, [mx.cpu()], loss_fn)
        _train_step(net, trainer, data, label, [mx.cpu()], loss_fn)
    _assert_identical(plain, net)
    plan = mirror_state(net).last_plan
    assert any("#" in key for key in plan.mirrored)
