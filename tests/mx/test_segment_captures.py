"""NOTE [ segments captured two at a time ] in mx/segments/measure.py: a candidate's segment
captures run on two capture workers of one environment at once, each structure bound once,
with the figures of binding one after the other."""
from __future__ import annotations

import threading
import time

import mxnet as mx
import numpy as np
import pytest

from mxnet_mirror_hook.core.segments import plan_segments
from mxnet_mirror_hook.mx import worker
from mxnet_mirror_hook.mx.convert import normalize_inputs, symbol_to_graph
from mxnet_mirror_hook.mx.segments import measure
from mxnet_mirror_hook.mx.segments.measure import segment_planned_mb, start_segment_planned_mb
from mxnet_mirror_hook.testing.models import lstm_language_model


def _symbol(name: str, hidden: int = 4) -> "mx.sym.Symbol":
    return mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=hidden, name=name)


def _start(symbol: "mx.sym.Symbol"):
    return measure._start_segment_measure(symbol, mx.cpu(), {"data": (2, 3)}, {}, {"data": "null"}, {})


class _SlowWorker:
    """A capture worker answering after a pause, recording which slot served whom."""

    def __init__(self, slot: int, served: list) -> None:
        self.slot, self.served = slot, served

    def exchange(self, request):
        time.sleep(0.2)
        self.served.append(self.slot)
        return {"ok": True, "executed": None, "mb": 7.0, "unreadable": "fake"}


@pytest.fixture
def fresh_figures(monkeypatch):
    monkeypatch.setattr(measure, "_SEGMENT_MB", {})
    monkeypatch.setattr(measure, "_IN_FLIGHT", {})


def test_independent_captures_run_on_both_capture_slots_at_once(monkeypatch, fresh_figures):
    served: list = []
    monkeypatch.setattr(worker, "get_capture_worker", lambda env=None, slot=0: _SlowWorker(slot, served))
    started = time.perf_counter()
    figures = [_start(_symbol(f"fc{i}", hidden=4 + i)) for i in range(4)]
    assert [f.result() for f in figures] == [(7.0, None)] * 4
    assert sorted(set(served)) == list(range(worker.CAPTURE_SLOTS)) == [0, 1]
    assert time.perf_counter() - started < 4 * 0.2  # not one after the other


def test_a_structure_being_captured_is_waited_for_not_bound_again(monkeypatch, fresh_figures):
    served: list = []
    monkeypatch.setattr(worker, "get_capture_worker", lambda env=None, slot=0: _SlowWorker(slot, served))
    # Same operators and shapes under other names: one structure (NOTE [ segments planned once
    # per structure ]).
    first, second = _start(_symbol("fc_a")), _start(_symbol("fc_b"))
    assert first.result() == second.result() == (7.0, None)
    assert len(served) == 1
    assert _start(_symbol("fc_c")).result() == (7.0, None) and len(served) == 1  # remembered


def test_a_failed_capture_is_not_remembered(monkeypatch, fresh_figures):
    calls = []

    class Refusing:
        def exchange(self, request):
            calls.append(1)
            if len(calls) == 1:
                raise worker.MeasurementError("refused")
            return {"ok": True, "executed": None, "mb": 3.0, "unreadable": "fake"}

    monkeypatch.setattr(worker, "get_capture_worker", lambda env=None, slot=0: Refusing())
    with pytest.raises(worker.MeasurementError):
        _start(_symbol("fc")).result()
    for _ in range(50):  # the failure leaves the in-flight table from the capture thread
        if not measure._IN_FLIGHT:
            break
        time.sleep(0.01)
    assert _start(_symbol("fc")).result() == (3.0, None) and len(calls) == 2


def test_capture_slots_are_separate_processes_under_one_environment():
    environment = {"MXNET_MIRROR_HOOK_TEST_SLOT": "1"}
    first, second = (worker.get_capture_worker(environment, slot) for slot in range(2))
    assert first is not second and first is worker.get_capture_worker(environment)
    assert first.environment == second.environment == environment and first.verbose and second.verbose
    with pytest.raises(ValueError, match="capture slot"):
        worker.get_capture_worker(environment, worker.CAPTURE_SLOTS)


def test_a_plan_measured_in_the_background_has_the_figures_of_one_measured_in_turn(monkeypatch):
    """Real workers: the LSTM's segments started together give the figure and per-segment list
    of measuring them one after the other (each bound afresh both times)."""
    symbol = lstm_language_model(20, vocab=30, num_embed=8, num_hidden=8, num_layers=2)
    shapes = {"data": (4, 20), "softmax_label": (4, 20)}
    graph = symbol_to_graph(symbol, normalize_inputs([("data", shapes["data"])]) + normalize_inputs(
        [("softmax_label", shapes["softmax_label"])], "label"))
    plan = plan_segments(graph, 4)
    requests = {n: ("null" if n in shapes else "write") for n in symbol.list_arguments()}
    types = {n: np.dtype("float32") for n in shapes}
    monkeypatch.setattr(measure, "_SEGMENT_MB", {})
    monkeypatch.setattr(measure, "_IN_FLIGHT", {})
    together = start_segment_planned_mb(symbol, plan, mx.cpu(), shapes, types, requests).result()
    monkeypatch.setattr(measure, "_SEGMENT_MB", {})
    lock = threading.Lock()
    real = measure._start_segment_measure

    def one_at_a_time(*args, **kwargs):
        with lock:
            future = real(*args, **kwargs)
            future.result()
            return future

    monkeypatch.setattr(measure, "_start_segment_measure", one_at_a_time)
    in_turn = segment_planned_mb(symbol, plan, mx.cpu(), shapes, types, requests)
    assert together == in_turn
    assert len(together[1]) == plan.count


def test_the_default_match_range_named_is_the_bind_under_none_set(monkeypatch):
    """NOTE [ segments planned once per structure ]: range 16 (nnvm's default) and no range
    set share a key unless the environment sets a range."""
    monkeypatch.delenv("NNVM_EXEC_MATCH_RANGE", raising=False)
    args = (_symbol("fc"), mx.cpu(), {"data": (2, 3)}, {}, {"data": "null"}, {})
    assert measure._segment_key(*args, 16) == measure._segment_key(*args, 0)
    assert measure._segment_key(*args, 8) != measure._segment_key(*args, 0)
    monkeypatch.setenv("NNVM_EXEC_MATCH_RANGE", "4")
    assert measure._segment_key(*args, 16) != measure._segment_key(*args, 0)
