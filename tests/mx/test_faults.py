"""Faults and load: interrupts, concurrent planners, many shapes, cache size caps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from mxnet_mirror_hook import MirroredModule, plan_mirror
from mxnet_mirror_hook.cache import PlanCache, PlanKey, get_cache
from mxnet_mirror_hook.testing.models import small_resnet
from mxnet_mirror_hook.mx.bind import resident_bytes
from mxnet_mirror_hook.mx.worker import MeasureWorker

from tests.paths import ROOT  # noqa: E402
DATA = [("data", (8, 3, 64, 64))]


def _files(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_interrupt_during_planning_leaves_no_entry(isolated_cache, monkeypatch):
    import mxnet_mirror_hook.planning.measure as plan_module  # the planners' bind callback

    # The second bind of the plan is interrupted: the first is the capture of the
    # executed graph (allocator model) or, without it, the unmirrored measurement.
    calls = {"n": 0}
    real = plan_module.planned_mb_many
    real_capture = plan_module.executed_graph

    def counted(function):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(plan_module, "planned_mb_many", counted(real))
    monkeypatch.setattr(plan_module, "executed_graph", counted(real_capture))
    with pytest.raises(KeyboardInterrupt):
        plan_mirror(small_resnet(4, 16), DATA)
    # The second bind raised (the confirmations bound in the background while the search
    # runs may have started a third before the interrupt reached the planning thread).
    assert calls["n"] >= 2
    assert _files(isolated_cache) == []
    monkeypatch.setattr(plan_module, "planned_mb_many", real)
    monkeypatch.setattr(plan_module, "executed_graph", real_capture)
    plan = plan_mirror(small_resnet(4, 16), DATA)  # and planning works afterwards
    assert not plan.from_cache and plan.mirrored


def test_interrupt_while_writing_leaves_no_partial_file(isolated_cache, monkeypatch):
    import mxnet_mirror_hook.cache as cache_module

    def interrupted_dump(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        plan_mirror(small_resnet(4, 16), DATA)
    assert _files(isolated_cache) == []


def test_interrupted_measurement_never_answers_the_next_request(monkeypatch):
    """A reply to an interrupted request must not be read as the next request's."""
    worker = MeasureWorker()
    small = {"symbol": small_resnet(2, 8).tojson(), "shapes": {"data": [2, 3, 16, 16]},
             "types": {}, "grad_req": "write", "ctx": ["cpu", 0]}
    large = dict(small, shapes={"data": [64, 3, 64, 64]})
    try:
        expected_large = worker.measure(large)
        process = worker._process
        original_readline = process.stdout.readline

        def interrupted_readline():
            raise KeyboardInterrupt

        process.stdout.readline = interrupted_readline
        with pytest.raises(KeyboardInterrupt):
            worker.measure(small)
        process.stdout.readline = original_readline
        assert worker.measure(large) == expected_large
        assert worker._process is not process  # the interrupted child was replaced
    finally:
        worker.close()


def test_two_processes_planning_the_same_key_write_one_whole_entry(isolated_cache):
    script = textwrap.dedent(f"""
        from mxnet_mirror_hook import plan_mirror
        from mxnet_mirror_hook.testing.models import small_resnet
        plan = plan_mirror(small_resnet(4, 16), {DATA!r}, cache_dir={str(isolated_cache)!r},
                           backend="mirror")  # one key ('auto' adds its backend decision's)
        print(len(plan.mirrored))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    counts = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(counts) == 1 and int(counts.pop()) > 0
    files = _files(isolated_cache)
    assert len(files) == 1 and files[0].startswith("plan-")
    with open(os.path.join(isolated_cache, files[0])) as handle:
        assert json.load(handle)["plan"]["mirrored"]


def test_many_threads_writing_one_key_never_tear_the_file(tmp_path):
    cache = PlanCache(str(tmp_path))
    key = PlanKey("s", (("data", (1,), "float32"),), "g", "auto", "auto", "1.9.1", "cpu")
    plans = [{"mirrored": [f"node{i}"] * 200, "baseline_mb": 1.0, "planned_mb": 1.0,
              "overhead": 0.0} for i in range(8)]
    threads = [threading.Thread(target=lambda p=p: [cache.put(key, p) for _ in range(10)])
               for p in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache._memory.clear()
    assert cache.get(key) in plans
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_fifty_shapes_keep_memory_bounded(isolated_cache, monkeypatch):
    monkeypatch.setenv("MXNET_MIRROR_HOOK_CACHE_ENTRIES", "16")
    symbol = small_resnet(2, 8)
    plan_mirror(symbol, [("data", (1, 3, 32, 32))])
    before = resident_bytes()
    for batch in range(2, 52):
        plan_mirror(symbol, [("data", (batch, 3, 32, 32))])
    assert len(get_cache(None)) <= 16
    growth_mb = (resident_bytes() - before) / 2 ** 20
    assert growth_mb < 100, f"planning 50 shapes grew the process by {growth_mb:.0f} MB"


def test_disk_cache_keeps_at_most_its_cap_and_drops_the_oldest(isolated_cache, monkeypatch):
    monkeypatch.setenv("MXNET_MIRROR_HOOK_CACHE_MAX_FILES", "3")
    symbol = small_resnet(2, 8)
    for batch in range(1, 6):
        plan_mirror(symbol, [("data", (batch, 3, 32, 32))])
    assert len(_files(isolated_cache)) == 3
    get_cache(None)._memory.clear()
    assert plan_mirror(symbol, [("data", (5, 3, 32, 32))]).from_cache      # newest kept
    assert not plan_mirror(symbol, [("data", (1, 3, 32, 32))]).from_cache  # oldest dropped


def test_module_with_nothing_to_train_binds_plainly():
    symbol = small_resnet(2, 8)
    params = [a for a in symbol.list_arguments() if a not in ("data", "softmax_label")]
    module = MirroredModule(symbol, fixed_param_names=params)
    module.bind([("data", (4, 3, 32, 32))], [("softmax_label", (4,))])
    assert module.mirror_plan is None and module.binded


def test_missing_label_shapes_are_inferred_for_planning():
    module = MirroredModule(small_resnet(4, 16))
    module.bind([("data", (8, 3, 64, 64))], None)
    assert module.mirror_plan.mirrored
