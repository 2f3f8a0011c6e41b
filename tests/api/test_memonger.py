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


def test_search_plan_gives_the_seeds_memory_on_an_annotated_resnet(annotated_resnet, monkeypatch):
    ours = memonger.search_plan(annotated_resnet, ctx=mx.cpu(), **SHAPES)
    seed = _load_seed(monkeypatch)
    theirs = seed.search_plan(annotated_resnet, **SHAPES)
    ours_mb = memonger.get_cost(ours, ctx=mx.cpu(), **SHAPES)
    assert ours_mb == seed.get_cost(theirs, **SHAPES)
    assert ours_mb < 0.5 * memonger.get_cost(annotated_resnet, ctx=mx.cpu(), **SHAPES)


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


def test_get_cost_uses_the_cpu_without_a_gpu_and_progress_goes_to_logging(annotated_resnet, caplog):
    assert mx.context.num_gpus() == 0 or pytest.skip("a GPU is present")
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook.compat.memonger"):
        best = memonger.search_plan(annotated_resnet, **SHAPES)
    assert "Search threshold=" in caplog.text and "Find best plan" in caplog.text
    assert memonger.get_cost(best, **SHAPES) < memonger.get_cost(annotated_resnet, **SHAPES)


def test_the_users_symbol_is_not_modified(annotated_resnet):
    before = annotated_resnet.tojson()
    memonger.make_mirror_plan(annotated_resnet, 0, **SHAPES)
    assert annotated_resnet.tojson() == before


def test_the_old_import_paths_still_reach_the_compat_module():
    import mxnet_mirror_hook.memonger as old_path
    from mxnet_mirror_hook.compat import memonger as new_path

    assert old_path is new_path is memonger
    assert callable(old_path.search_plan) and callable(old_path.get_cost)
