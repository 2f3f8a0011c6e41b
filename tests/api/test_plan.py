"""plan_mirror: results, never-worse, budgets, and errors on bad input."""
from __future__ import annotations

import mxnet as mx
import pytest

from mxnet_mirror_hook import (BudgetError, BudgetUnreachableError, ShapeError,
                               UnknownPlannerError, plan_mirror)
from mxnet_mirror_hook.testing.models import preact_resnet_cifar, small_resnet
from mxnet_mirror_hook.mx.convert import MIRROR_ATTR
from tests.helpers import dropout_mlp

DATA = [("data", (16, 3, 64, 64))]
LABEL = [("softmax_label", (16,))]


@pytest.fixture(scope="module")
def resnet():
    return small_resnet(num_blocks=4, channels=16)


def test_auto_plan_reduces_measured_memory_and_reports_its_fields(resnet):
    plan = plan_mirror(resnet, DATA, LABEL)
    assert plan.planner == "auto" and plan.context == "cpu"
    assert plan.planned_mb < 0.6 * plan.baseline_mb
    assert plan.mirrored and plan.kept_count > 0
    assert 0 < plan.overhead <= 0.34
    flagged = {n for n, a in plan.symbol.attr_dict().items() if a.get(MIRROR_ATTR) == "True"}
    assert flagged == set(plan.mirrored)
    assert plan.symbol.list_arguments() == resnet.list_arguments()
    assert any(c["label"] == "unmirrored" and c["planned_mb"] == plan.baseline_mb
               for c in plan.candidates)
    assert plan.to_dict()["mirrored_count"] == len(plan.mirrored)


def test_label_shapes_may_be_left_for_mxnet_to_infer(resnet):
    assert plan_mirror(resnet, DATA).planned_mb == plan_mirror(resnet, DATA, LABEL).planned_mb


def test_none_planner_returns_the_unmirrored_symbol(resnet):
    plan = plan_mirror(resnet, DATA, LABEL, planner="none")
    assert plan.mirrored == () and plan.planned_mb == plan.baseline_mb and plan.overhead == 0
    assert plan.symbol is resnet


def test_seed_planner_on_unmarked_symbol_is_never_worse_than_baseline(resnet):
    plan = plan_mirror(resnet, DATA, LABEL, planner="memonger")
    assert plan.planned_mb == plan.baseline_mb and plan.mirrored == ()
    # The seed's only candidate recomputes everything, which saves nothing and costs a forward:
    mirrored_all = [c for c in plan.candidates if c["label"] == "threshold=0MB"]
    assert mirrored_all and mirrored_all[0]["planned_mb"] >= plan.baseline_mb
    assert mirrored_all[0]["overhead"] > 0.3


def test_seed_planner_uses_user_stage_marks():
    symbol = preact_resnet_cifar(depth=56, mark_stages=True)
    plan = plan_mirror(symbol, [("data", (64, 3, 32, 32))], planner="memonger")
    assert plan.planned_mb < 0.7 * plan.baseline_mb


def test_budget_fraction_is_respected_and_impossible_budget_names_the_minimum(resnet):
    loose = plan_mirror(resnet, DATA, LABEL, memory_budget=0.9)
    assert loose.planned_mb <= 0.9 * loose.baseline_mb
    minimum = plan_mirror(resnet, DATA, LABEL, memory_budget="min")
    assert minimum.planned_mb <= loose.planned_mb
    assert loose.overhead <= minimum.overhead
    with pytest.raises(BudgetUnreachableError) as error:
        plan_mirror(resnet, DATA, LABEL, memory_budget="1MB")
    assert error.value.min_reachable_mb == minimum.planned_mb
    assert f"{minimum.planned_mb:.0f} MB" in str(error.value)
    # One error with one figure: not chained to an earlier one with another figure.
    assert error.value.__context__ is None and error.value.__cause__ is None


def test_planner_choice_follows_the_budget(resnet):
    minimum = plan_mirror(resnet, DATA, LABEL, memory_budget="min")
    default = plan_mirror(resnet, DATA, LABEL)
    # Default: lowest memory within one extra forward pass, which every plan meets here.
    assert default.planned_mb == minimum.planned_mb and default.overhead <= 1 / 3 + 1e-9
    limited = plan_mirror(resnet, DATA, LABEL, memory_budget=0.75)
    assert limited.planned_mb <= 0.75 * limited.baseline_mb
    # A fixed limit runs the least-compute program and recomputes less than 'min' does.
    assert any(c["label"].startswith("dp least compute") for c in limited.candidates)
    assert not any(c["label"].startswith("dp least compute") for c in minimum.candidates)
    assert limited.overhead < minimum.overhead


def test_wrong_rank_shape_raises_shape_error_not_mxnet_error(resnet):
    with pytest.raises(ShapeError, match="rank"):
        plan_mirror(resnet, [("data", (16, 64, 64))], LABEL)


@pytest.mark.parametrize("data, label, message", [
    ([("data", (16, 64, 64))], LABEL, "rank"),
    (DATA, [("softmax_label", (15, 3))], "infer shapes"),
    ([("softmax_label", (16,))], None, "cannot infer the shapes"),
])
def test_bad_shapes_print_nothing_to_stdout(resnet, capfd, data, label, message):
    capfd.readouterr()
    with pytest.raises(ShapeError, match=message):
        plan_mirror(resnet, data, label, cache_dir=False)
    assert capfd.readouterr().out == ""  # MXNet's infer_shape would print "infer_shape error..."


def test_mismatched_label_shape_raises_shape_error(resnet):
    with pytest.raises(ShapeError):
        plan_mirror(resnet, DATA, [("softmax_label", (15, 3))])


def test_missing_data_shape_raises_shape_error(resnet):
    with pytest.raises(ShapeError, match="data_shapes is empty"):
        plan_mirror(resnet, [], None)
    with pytest.raises(ShapeError, match=r"cannot infer the shapes of \['data'"):
        plan_mirror(resnet, [("softmax_label", (16,))], None)


def test_unknown_planner_and_bad_budgets_are_rejected_before_any_bind(resnet):
    with pytest.raises(UnknownPlannerError, match="auto"):
        plan_mirror(resnet, DATA, LABEL, planner="fastest")
    with pytest.raises(BudgetError):
        plan_mirror(resnet, DATA, LABEL, memory_budget=-2)
    with pytest.raises(TypeError):
        plan_mirror(resnet, DATA, LABEL, memory_budget=[1])
    with pytest.raises(TypeError, match="mx.sym.Symbol"):
        plan_mirror("resnet.json", DATA, LABEL)
    with pytest.raises(ValueError, match="grad_req"):
        plan_mirror(resnet, DATA, LABEL, grad_req="sometimes")


def test_symbol_with_nothing_to_train_is_refused(resnet):
    params = [a for a in resnet.list_arguments() if a not in ("data", "softmax_label")]
    with pytest.raises(ValueError, match="nothing in this symbol gets a gradient"):
        plan_mirror(resnet, DATA, LABEL, fixed_param_names=params)


def test_dropout_is_never_in_a_plan():
    plan = plan_mirror(dropout_mlp(6), [("data", (256, 1024))])
    assert not any(name.startswith("drop") for name in plan.mirrored)


def test_deep_network_plan_is_fast_and_saves_most_memory():
    symbol = preact_resnet_cifar(depth=164)
    plan = plan_mirror(symbol, [("data", (64, 3, 32, 32))], cache_dir=False)
    assert plan.planned_mb < 0.35 * plan.baseline_mb


def test_recomputed_batchnorm_uses_mxnets_own_kernel_and_others_keep_theirs(resnet):
    plan = plan_mirror(resnet, DATA, LABEL)
    attrs = plan.symbol.attr_dict()
    recomputed_bn = [n for n in plan.mirrored if n.endswith("_bn")]
    assert recomputed_bn
    for name in recomputed_bn:
        assert attrs[name].get("cudnn_off") == "True"
    for name, node_attrs in attrs.items():
        if name.endswith("_bn") and name not in plan.mirrored:
            assert node_attrs.get("cudnn_off") != "True"


def test_keep_ops_are_never_recomputed(resnet):
    plan = plan_mirror(resnet, DATA, LABEL, keep_ops=["Activation"])
    ops = {n["name"]: n["op"] for n in __import__("json").loads(resnet.tojson())["nodes"]}
    assert plan.mirrored and all(ops[name] != "Activation" for name in plan.mirrored)


def _mnist_mlp():
    data = mx.sym.Variable("data")
    net = mx.sym.FullyConnected(mx.sym.Flatten(data), num_hidden=128, name="fc1")
    net = mx.sym.Activation(net, act_type="relu", name="relu1")
    net = mx.sym.FullyConnected(net, num_hidden=10, name="fc2")
    return mx.sym.SoftmaxOutput(net, name="softmax")


def test_a_network_with_nothing_to_gain_is_decided_without_measuring_candidates(monkeypatch):
    from mxnet_mirror_hook.planning import measure

    def no_workers(*args, **kwargs):
        raise AssertionError("candidates were bound")

    monkeypatch.setattr(measure, "planned_mb_many", no_workers)
    monkeypatch.setattr(measure, "executed_graph", no_workers)
    plan = plan_mirror(_mnist_mlp(), [("data", (100, 1, 28, 28))], cache_dir=False)
    assert plan.mirrored == () and plan.planned_mb == plan.baseline_mb
    assert [c["label"] for c in plan.candidates] == [
        "unmirrored (backward keeps under 1 MB of activations)"]
    # An explicit budget still plans (and so measures).
    with pytest.raises(AssertionError, match="candidates were bound"):
        plan_mirror(_mnist_mlp(), [("data", (100, 1, 28, 28))], memory_budget="min", cache_dir=False)


def test_a_long_plan_shows_a_tqdm_bar_on_stderr_only_when_wanted(capsys, monkeypatch):
    from mxnet_mirror_hook import progress

    monkeypatch.setattr(progress, "PROGRESS_DELAY_SECONDS", 0.0)
    with progress.PlanProgress("data 32x3x224x224", enabled=True) as bar:
        bar.phase("allocator search", 200)
        bar.advance(100)
    shown = capsys.readouterr()
    assert "mirror plan data 32x3x224x224" in shown.err and shown.out == ""
    with progress.PlanProgress("data 1x1", enabled=False) as bar:
        bar.phase("binding 3 candidate(s)", 3)
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_the_same_plan_comes_out_on_a_loaded_machine():
    import subprocess
    import sys

    from mxnet_mirror_hook import cache

    symbol = small_resnet(num_blocks=4)
    quiet = plan_mirror(symbol, DATA, cache_dir=False)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        cache._CACHES.clear()
        loaded = plan_mirror(symbol, DATA, cache_dir=False)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert not loaded.from_cache
    assert loaded.mirrored == quiet.mirrored and loaded.planned_mb == quiet.planned_mb


def test_planning_seconds_count_the_whole_call_with_the_backend_decision():
    import time

    symbol = small_resnet(num_blocks=4, channels=16)
    started = time.perf_counter()
    plan = plan_mirror(symbol, [("data", (16, 3, 32, 32))], [("softmax_label", (16,))],
                       memory_budget="min", backend="auto", cache_dir=False)
    elapsed = time.perf_counter() - started
    assert elapsed * 0.9 <= plan.planning_seconds <= elapsed
    assert f"planned in {plan.planning_seconds:.2f} s" in plan.summary()
