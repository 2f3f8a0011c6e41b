"""The seed-compatible memonger module."""
from __future__ import annotations

import importlib.util
import json
import logging
import os

import mxnet as mx
import pytest

from mxnet_mirror_hook import memonger
from mxnet_mirror_hook.testing.models import memonger_resnet
from mxnet_mirror_hook.mx.convert import MIRROR_ATTR
from tests.paths import SHARED

SHAPES = {"data": (32, 3, 224, 224)}
SEED = os.path.join(SHARED, "seed", "memonger.py")


@pytest.fixture(scope="module")
def annotated_resnet():
    return memonger_resnet(50)


def _mirrored_ops(symbol):
    """Operators marked force_mirroring (the seed also marks variables, which MXNet ignores)."""
    nodes = json.loads(symbol.tojson())["nodes"]
    return {n["name"] for n in nodes
            if n["op"] != "null" and (n.get("attrs") or {}).get(MIRROR_ATTR) == "True"}


def _load_seed(monkeypatch):
    if not os.path.exists(SEED):
        pytest.skip("the seed script (../shared/seed/memonger.py) is not beside this checkout")
    spec = importlib.util.spec_from_file_location("seed_memonger", SEED)
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    monkeypatch.setattr(mx, "gpu", lambda *args: mx.cpu())  # the seed binds on mx.gpu()
    return seed


def test_search_plan_prints_the_seeds_lines_and_gives_its_memory(annotated_resnet, monkeypatch,
                                                                  capsys):
    capsys.readouterr()
    ours = memonger.search_plan(annotated_resnet, ctx=mx.cpu(), **SHAPES)
    our_lines = capsys.readouterr().out.splitlines()
    seed = _load_seed(monkeypatch)
    theirs = seed.search_plan(annotated_resnet, **SHAPES)
    seed_lines = capsys.readouterr().out.splitlines()
    assert our_lines == seed_lines  # same wording, same thresholds and costs, same order
    assert seed_lines[0].startswith("Search threshold=0 MB, cost=")
    assert seed_lines[-1].startswith("Find best plan with threshold=")
    ours_mb = memonger.get_cost(ours, ctx=mx.cpu(), **SHAPES)
    assert ours_mb == seed.get_cost(theirs, **SHAPES)
    assert ours_mb < 0.5 * memonger.get_cost(annotated_resnet, ctx=mx.cpu(), **SHAPES)


@pytest.mark.parametrize("mode", ["inprocess", "worker"])
def test_binding_in_this_process_or_in_workers_prints_and_finds_the_same(mode, monkeypatch, capsys):
    symbol, shapes = memonger_resnet(18), {"data": (2, 3, 64, 64)}
    capsys.readouterr()
    monkeypatch.delenv("MXNET_MIRROR_HOOK_MEASURE", raising=False)
    default = memonger.get_cost(memonger.search_plan(symbol, ctx=mx.cpu(), **shapes), ctx=mx.cpu(), **shapes)
    default_lines = capsys.readouterr().out
    monkeypatch.setenv("MXNET_MIRROR_HOOK_MEASURE", mode)
    chosen = memonger.get_cost(memonger.search_plan(symbol, ctx=mx.cpu(), **shapes), ctx=mx.cpu(), **shapes)
    assert chosen == default and capsys.readouterr().out == default_lines


def test_make_mirror_plan_matches_the_seed_node_for_node(annotated_resnet, monkeypatch):
    seed = _load_seed(monkeypatch)
    for threshold in (0, 100, 400):
        info_ours, info_seed = {}, {}
        ours = memonger.make_mirror_plan(annotated_resnet, threshold, info_ours, **SHAPES)
        theirs = seed.make_mirror_plan(annotated_resnet, threshold, info_seed, **SHAPES)
        assert _mirrored_ops(ours) == _mirrored_ops(theirs)
        # The seed counts BatchNorm moving statistics as activations (name suffixes): a few KB.
        assert abs(info_ours["max_size"] - info_seed["max_size"]) < 1 << 20
        assert abs(info_ours["save_size"] - info_seed["save_size"]) < 1 << 20


def test_get_cost_uses_the_cpu_without_a_gpu_and_progress_is_printed_and_logged(annotated_resnet,
                                                                                capsys, caplog):
    assert mx.context.num_gpus() == 0 or pytest.skip("a GPU is present")
    with caplog.at_level(logging.DEBUG, logger="mxnet_mirror_hook.compat.memonger"):
        best = memonger.search_plan(annotated_resnet, **SHAPES)
    printed = capsys.readouterr().out
    assert "Search threshold=" in printed and "Find best plan" in printed
    assert "Search threshold=" in caplog.text and "Find best plan" in caplog.text
    assert memonger.get_cost(best, **SHAPES) < memonger.get_cost(annotated_resnet, **SHAPES)


def test_the_users_symbol_is_not_modified(annotated_resnet):
    before = annotated_resnet.tojson()
    memonger.make_mirror_plan(annotated_resnet, 0, **SHAPES)
    assert annotated_resnet.tojson() == before


def test_the_package_attribute_reaches_the_compat_module():
    import mxnet_mirror_hook
    from mxnet_mirror_hook.compat import memonger as compat

    assert mxnet_mirror_hook.memonger is compat is memonger
    assert callable(compat.search_plan) and callable(compat.get_cost)
