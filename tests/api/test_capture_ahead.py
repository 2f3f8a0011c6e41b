"""NOTE [ captures asked for ahead ] in mx/measure.py: a piece's executed graph captured ahead
is the one captured when asked, made once, and the per-segment plans are the same with it."""
from __future__ import annotations

from mxnet_mirror_hook import MirrorOptions
from mxnet_mirror_hook import cache
from mxnet_mirror_hook.core.segments import full_cut_chain, plan_segments
from mxnet_mirror_hook.mx import worker
from mxnet_mirror_hook.planning import candidates
from mxnet_mirror_hook.planning.setup import prepare_planning
from mxnet_mirror_hook.testing.models import small_resnet

DATA = [("data", (32, 3, 32, 32))]


def _captures(monkeypatch) -> list:
    """Every capture request a worker answers, recorded."""
    seen: list = []
    real = worker.MeasureWorker.exchange

    def exchange(self, request):
        if request.get("capture"):
            seen.append(request["symbol"])
        return real(self, request)

    monkeypatch.setattr(worker.MeasureWorker, "exchange", exchange)
    return seen


def test_a_graph_captured_ahead_is_the_one_captured_when_asked_and_is_captured_once(monkeypatch):
    symbol = small_resnet(2, 8)
    asked = prepare_planning(symbol, DATA).measure.executed_graph()
    seen = _captures(monkeypatch)
    measure = prepare_planning(symbol, DATA).measure
    measure.capture_ahead()
    measure.capture_ahead()  # asked twice: one capture
    ahead = measure.executed_graph()
    assert ahead is not None and asked is not None
    assert ahead.to_dict() == asked.to_dict()
    assert len(seen) == 1


def test_per_segment_plans_are_the_same_with_and_without_captures_ahead(monkeypatch):
    symbol = small_resnet(4, 16)
    setup = prepare_planning(symbol, DATA)
    split = plan_segments(setup.graph, 3, chain=full_cut_chain(setup.graph))
    options = MirrorOptions(memory_budget="min", backend="auto", cache_dir=False)
    seen = _captures(monkeypatch)
    cache._CACHES.clear()
    ahead = candidates.per_segment_two_level(split, setup, options)
    captured_ahead = len(seen)
    cache._CACHES.clear()
    seen.clear()
    monkeypatch.setattr(candidates, "_plans_from_a_capture", lambda *args: False)
    in_turn = candidates.per_segment_two_level(split, setup, options)
    assert [s.mirrored for s in ahead.segments] == [s.mirrored for s in in_turn.segments]
    assert any(s.mirrored for s in ahead.segments)
    assert captured_ahead == len(seen) == split.count  # one capture per piece either way


def test_a_piece_whose_plan_is_cached_is_not_captured_ahead(monkeypatch):
    symbol = small_resnet(4, 16)
    setup = prepare_planning(symbol, DATA)
    split = plan_segments(setup.graph, 2, chain=full_cut_chain(setup.graph))
    options = MirrorOptions(memory_budget="min", backend="auto", cache_dir=False)
    cache._CACHES.clear()
    first = candidates.per_segment_two_level(split, setup, options)
    seen = _captures(monkeypatch)
    again = candidates.per_segment_two_level(split, setup, options)  # pieces from the memory cache
    assert seen == []
    assert [s.mirrored for s in first.segments] == [s.mirrored for s in again.segments]
