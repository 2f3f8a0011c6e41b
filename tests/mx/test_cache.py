"""The plan cache: hits across processes, and robustness to bad entries and directories."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mxnet_mirror_hook import plan_mirror
from mxnet_mirror_hook.cache import CACHE_FORMAT, PlanCache, get_cache
from mxnet_mirror_hook.testing.models import small_resnet

DATA = [("data", (8, 3, 64, 64))]
from tests.paths import ROOT  # noqa: E402


def _entries(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("plan-"))


def test_second_plan_comes_from_memory_and_disk(isolated_cache):
    symbol = small_resnet(4, 16)
    first = plan_mirror(symbol, DATA, backend="mirror")
    assert not first.from_cache
    assert len(_entries(isolated_cache)) == 1
    second = plan_mirror(symbol, DATA, backend="mirror")
    assert second.from_cache and second.mirrored == first.mirrored
    assert second.planned_mb == first.planned_mb and second.baseline_mb == first.baseline_mb


def test_cache_hit_in_a_new_process_needs_no_bind(isolated_cache):
    symbol = small_resnet(4, 16)
    first = plan_mirror(symbol, DATA, backend="mirror")
    script = textwrap.dedent(f"""
        import json, time
        from mxnet_mirror_hook import plan_mirror
        from mxnet_mirror_hook.testing.models import small_resnet
        import mxnet_mirror_hook.planning.measure as measure
        import mxnet_mirror_hook.planning.one_level as one_level
        def refuse(*args, **kwargs):
            raise AssertionError("a cached plan must not bind")
        measure.planned_mb_many = measure.executed_graph = refuse
        one_level.planned_mb_in_process = refuse
        plan = plan_mirror(small_resnet(4, 16), {DATA!r}, backend="mirror")
        print(json.dumps([plan.from_cache, list(plan.mirrored), plan.planning_seconds]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    from_cache, mirrored, seconds = json.loads(result.stdout.strip().splitlines()[-1])
    assert from_cache and mirrored == list(first.mirrored)
    assert seconds < 0.5


def test_key_depends_on_shapes_budget_and_planner(isolated_cache):
    symbol = small_resnet(4, 16)
    plan_mirror(symbol, DATA, backend="mirror")
    plan_mirror(symbol, [("data", (4, 3, 64, 64))], backend="mirror")
    plan_mirror(symbol, DATA, memory_budget="min", backend="mirror")
    plan_mirror(symbol, DATA, planner="none", backend="mirror")
    assert len(_entries(isolated_cache)) == 4


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"format": "other/9", "plan": {}}),
                                    "", "\x00\x01binary"])
def test_corrupt_or_foreign_entry_is_ignored_with_a_warning_and_replaced(isolated_cache, caplog,
                                                                         damage):
    symbol = small_resnet(4, 16)
    first = plan_mirror(symbol, DATA, backend="mirror")
    (entry,) = _entries(isolated_cache)
    with open(os.path.join(isolated_cache, entry), "w") as handle:
        handle.write(damage)
    get_cache(None)._memory.clear()
    with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook.cache"):
        again = plan_mirror(symbol, DATA, backend="mirror")
    assert not again.from_cache and again.mirrored == first.mirrored
    assert "ignoring" in caplog.text
    with open(os.path.join(isolated_cache, entry)) as handle:
        assert json.load(handle)["format"] == CACHE_FORMAT  # rewritten whole


def test_entry_naming_nodes_the_symbol_lacks_is_replanned(isolated_cache, caplog):
    symbol = small_resnet(4, 16)
    plan_mirror(symbol, DATA, backend="mirror")
    (entry,) = _entries(isolated_cache)
    path = os.path.join(isolated_cache, entry)
    with open(path) as handle:
        document = json.load(handle)
    document["plan"]["mirrored"] = ["ghost_node"]
    with open(path, "w") as handle:
        json.dump(document, handle)
    get_cache(None)._memory.clear()
    with caplog.at_level(logging.WARNING):
        again = plan_mirror(symbol, DATA, backend="mirror")
    assert not again.from_cache and "ghost_node" not in again.mirrored
    assert "lacks" in caplog.text


def test_entry_recomputing_a_node_the_rules_now_forbid_is_replanned(isolated_cache, caplog):
    symbol = small_resnet(4, 16)
    first = plan_mirror(symbol, DATA, backend="mirror")
    (entry,) = _entries(isolated_cache)
    path = os.path.join(isolated_cache, entry)
    with open(path) as handle:
        document = json.load(handle)
    kept = [n for n in ("block0_a_conv", "stem_conv") if n not in first.mirrored]
    document["plan"]["mirrored"] = list(first.mirrored) + kept
    with open(path, "w") as handle:
        json.dump(document, handle)
    get_cache(None)._memory.clear()
    # keep_ops changes the key, so simulate an old entry under the new key instead:
    again = plan_mirror(symbol, DATA, backend="mirror")
    assert again.from_cache  # still valid: convolutions may be recomputed
    document["plan"]["mirrored"].append("softmax_label")  # a variable can never be recomputed
    with open(path, "w") as handle:
        json.dump(document, handle)
    get_cache(None)._memory.clear()
    with caplog.at_level(logging.WARNING):
        third = plan_mirror(symbol, DATA, backend="mirror")
    assert not third.from_cache and "no longer" in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
def test_unwritable_directory_degrades_to_memory_only(tmp_path, caplog):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("running as a user that ignores permission bits")
        except OSError:
            pass
        with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook.cache"):
            first = plan_mirror(small_resnet(4, 16), DATA, cache_dir=str(locked), backend="mirror")
            second = plan_mirror(small_resnet(4, 16), DATA, cache_dir=str(locked), backend="mirror")
        assert "memory only" in caplog.text
        assert second.from_cache and second.mirrored == first.mirrored
    finally:
        locked.chmod(0o700)


def test_directory_that_cannot_be_created_degrades_to_memory_only(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook.cache"):
        cache = PlanCache(str(blocker / "sub"))
    assert not cache.on_disk and "memory only" in caplog.text


def test_memory_level_is_bounded_lru():
    from mxnet_mirror_hook.cache import PlanKey

    cache = PlanCache(None, max_memory_entries=3)
    keys = [PlanKey("s", (("data", (i,), "float32"),), "g", "auto", "auto", "1.9.1", "cpu")
            for i in range(5)]
    plan = {"mirrored": [], "baseline_mb": 1.0, "planned_mb": 1.0, "overhead": 0.0}
    for key in keys:
        cache.put(key, plan)
    assert len(cache) == 3
    assert cache.get(keys[0]) is None and cache.get(keys[4]) == plan


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   OSError(28, "No space left on device")])
def test_failed_write_degrades_to_memory_only_without_leaving_a_partial_file(
        isolated_cache, monkeypatch, caplog, error):
    """Root ignores permission bits, so the failure is injected where the write happens."""
    import mxnet_mirror_hook.cache as cache_module

    real_replace = os.replace

    def failing_replace(source, target):
        raise error

    monkeypatch.setattr(cache_module.os, "replace", failing_replace)
    with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook.cache"):
        first = plan_mirror(small_resnet(4, 16), DATA, backend="mirror")
        second = plan_mirror(small_resnet(4, 16), DATA, backend="mirror")
    monkeypatch.setattr(cache_module.os, "replace", real_replace)
    assert "memory only" in caplog.text
    assert second.from_cache and second.mirrored == first.mirrored
    assert os.listdir(isolated_cache) == []  # no entry, no temporary file left behind


# ------------------------------------------------------------ ranks sharing a cache
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from mxnet_mirror_hook import plan_mirror
    from mxnet_mirror_hook.testing.models import small_resnet
    symbol = small_resnet(4, 16)
    go = sys.argv[1]
    while not os.path.exists(go):  # every rank imported MXNet; start together
        time.sleep(0.01)
    plan = plan_mirror(symbol, {data!r}, cache_dir=sys.argv[2], backend="mirror")
    print(json.dumps([plan.from_cache, list(plan.mirrored), plan.planned_mb]))
""")


@pytest.mark.slow
def test_four_ranks_sharing_a_cache_directory_plan_once(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(data=DATA))
    go, directory = tmp_path / "go", tmp_path / "shared-cache"
    ranks = [subprocess.Popen([sys.executable, str(script), str(go), str(directory)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=ROOT))
             for _ in range(4)]
    time.sleep(1.0)
    go.write_text("go")
    results = []
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    planned_here = [from_cache for from_cache, _, _ in results].count(False)
    assert planned_here == 1  # one rank planned; three waited and read its entry
    assert all(r[1:] == results[0][1:] for r in results)  # the same plan everywhere
    assert len(os.listdir(directory)) == 1  # one entry; the lock file went with its holder


def _key(i=0):
    from mxnet_mirror_hook.cache import PlanKey

    return PlanKey("s", (("data", (i,), "float32"),), "g", "auto", "auto", "1.9.1", "cpu")


PLAN = {"mirrored": ["a"], "baseline_mb": 2.0, "planned_mb": 1.0, "overhead": 0.1}


def test_a_waiting_planner_finds_the_entry_of_the_lock_holder(tmp_path):
    holder, waiter = PlanCache(str(tmp_path)), PlanCache(str(tmp_path))  # two "processes"
    key, started, seen = _key(), threading.Event(), {}

    def hold():
        with holder.planning(key) as held:
            seen["holder"] = held
            started.set()
            time.sleep(0.5)  # "planning"
            holder.put(key, PLAN)

    thread = threading.Thread(target=hold)
    thread.start()
    started.wait(10)
    assert waiter.get(key) is None
    with waiter.planning(key, timeout=30) as held:
        entry = waiter.get(key)
    thread.join()
    assert seen["holder"] and held and entry == PLAN


def test_after_the_lock_timeout_a_process_plans_alone_with_a_warning(tmp_path, monkeypatch, caplog):
    holder, waiter = PlanCache(str(tmp_path)), PlanCache(str(tmp_path))
    monkeypatch.setenv("MXNET_MIRROR_HOOK_LOCK_TIMEOUT", "0.3")
    with holder.planning(_key()):
        tick = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="mxnet_mirror_hook.cache"):
            with waiter.planning(_key()) as held:
                assert not held
        assert time.monotonic() - tick >= 0.3
    assert "MXNET_MIRROR_HOOK_LOCK_TIMEOUT" in caplog.text and "planning here too" in caplog.text
    with waiter.planning(_key(1), timeout=0) as held:  # another key is not locked
        assert held


def test_memory_only_cache_plans_without_a_lock(tmp_path):
    with PlanCache(None).planning(_key()) as held:
        assert held is False
    assert os.listdir(tmp_path) == []


def test_typed_entries_write_the_same_json_as_before_and_refuse_malformed_ones():
    from mxnet_mirror_hook.cache import BackendEntry, MirrorEntry

    one_level = MirrorEntry(("a", "b"), 10.0, 6.0, 0.2, "dp")
    assert one_level.to_dict() == {"mirrored": ["a", "b"], "baseline_mb": 10.0, "planned_mb": 6.0,
                                   "overhead": 0.2, "label": "dp"}
    assert MirrorEntry.from_dict(one_level.to_dict()) == one_level
    kept = BackendEntry("mirror", ("a",), 10.0, 6.0, 0.2)
    assert kept.to_dict() == {"mirrored": ["a"], "baseline_mb": 10.0, "planned_mb": 6.0,
                              "overhead": 0.2, "backend": "mirror"}  # no 'segments', no 'fallback'
    fallen = BackendEntry("mirror", ("a",), 10.0, 6.0, 0.2, fallback="measuring: boom")
    assert BackendEntry.from_dict(fallen.to_dict()) == fallen
    split = BackendEntry("segments", (), 10.0, 4.0, 0.3, segments={"segments": []})
    assert BackendEntry.from_dict(split.to_dict()).segments == {"segments": []}
    for bad in ({**kept.to_dict(), "backend": "checkpoint"},
                {**kept.to_dict(), "backend": "segments"},  # a segments entry without its plan
                {**kept.to_dict(), "planned_mb": True},
                {**kept.to_dict(), "mirrored": "a"}):
        with pytest.raises(ValueError):
            BackendEntry.from_dict(bad)
