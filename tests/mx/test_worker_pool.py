"""WorkerPool hands requests only to ready workers and starts the others in the background."""
from __future__ import annotations

import threading

import pytest

from mxnet_mirror_hook.errors import MeasurementError
from mxnet_mirror_hook.mx.worker import WorkerPool


class FakeWorker:
    def __init__(self, ready: bool, fail_on=()):
        self.ready = ready
        self.started_in_background = False
        self.seen = []
        self.fail_on = set(fail_on)
        self._lock = threading.Lock()

    def warm_in_background(self):
        self.started_in_background = True

    def measure(self, request):
        with self._lock:
            self.seen.append(request["n"])
        if request["n"] in self.fail_on:
            raise MeasurementError(f"refused {request['n']}")
        return float(request["n"] * 10)


def _pool(workers, helpers=()):
    pool = WorkerPool(size=1)
    pool.workers = list(workers)
    pool.helpers = list(helpers)
    return pool


def test_requests_go_to_ready_workers_and_the_others_start_in_the_background():
    idle, capture = FakeWorker(ready=False), FakeWorker(ready=True)
    pool = _pool([idle], [capture])
    assert pool.measure_many([{"n": n} for n in range(5)]) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert idle.started_in_background and idle.seen == []
    assert sorted(capture.seen) == [0, 1, 2, 3, 4]


def test_with_no_ready_worker_the_first_one_is_waited_for():
    first, second = FakeWorker(ready=False), FakeWorker(ready=False)
    pool = _pool([first, second])
    assert pool.measure_many([{"n": 1}]) == [10.0]
    assert first.seen == [1] and second.started_in_background


def test_several_ready_workers_share_the_requests_and_results_keep_their_order():
    a, b = FakeWorker(ready=True), FakeWorker(ready=True)
    pool = _pool([a, b])
    assert pool.measure_many([{"n": n} for n in range(20)]) == [n * 10.0 for n in range(20)]
    assert sorted(a.seen + b.seen) == list(range(20))


def test_the_first_error_in_request_order_is_raised_after_the_rest_finish():
    a, b = FakeWorker(ready=True, fail_on={3, 7}), FakeWorker(ready=True, fail_on={3, 7})
    pool = _pool([a, b])
    with pytest.raises(MeasurementError, match="refused 3"):
        pool.measure_many([{"n": n} for n in range(10)])
    assert sorted(a.seen + b.seen) == list(range(10))


def test_a_first_plans_few_binds_start_no_other_worker_and_later_calls_do():
    idle, capture = FakeWorker(ready=False), FakeWorker(ready=True)
    pool = _pool([idle], [capture])
    assert pool.measure_many([{"n": n} for n in range(3)]) == [0.0, 10.0, 20.0]
    assert not idle.started_in_background and sorted(capture.seen) == [0, 1, 2]
    pool.measure_many([{"n": 3}, {"n": 4}])
    assert idle.started_in_background
