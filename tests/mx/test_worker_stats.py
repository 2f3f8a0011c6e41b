"""A measuring worker counts its processes, the requests it answered and the CPU seconds they
reported (what bench_latency shows beside a plan's time)."""
from __future__ import annotations

import mxnet as mx

from mxnet_mirror_hook.mx import worker
from mxnet_mirror_hook.mx.measure import worker_request


def test_a_worker_counts_its_processes_requests_and_cpu_seconds():
    symbol = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=8, name="fc")
    request = worker_request(symbol.tojson(), mx.cpu(), {"data": (4, 16)}, None, "write")
    measuring = worker.MeasureWorker()
    try:
        measuring.exchange({"ping": True})
        assert (measuring.started, measuring.answered) == (1, 0)
        after_ping = measuring.cpu_seconds
        assert after_ping > 0  # the process's start-up
        assert measuring.measure(request) >= 0
        measuring.measure(request)
        assert (measuring.started, measuring.answered) == (1, 2)
        assert measuring.cpu_seconds > after_ping
        measuring.close()
        measuring.measure(request)  # a new process: its seconds add to the old one's
        assert (measuring.started, measuring.answered) == (2, 3)
    finally:
        measuring.close()


def test_worker_stats_name_the_pool_and_the_capture_workers_by_environment_and_slot():
    worker.get_capture_worker({"MXNET_MIRROR_HOOK_TEST_STATS": "1"}, 1)
    stats = worker.worker_stats()
    assert "capture {'MXNET_MIRROR_HOOK_TEST_STATS': '1'} 1" in stats
    assert all(set(v) == {"started", "answered", "cpu_seconds"} for v in stats.values())
