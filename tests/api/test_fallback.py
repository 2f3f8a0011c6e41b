"""backend='auto' falls back to the one-level plan when the segment path fails; backend='segments'
says why it cannot be used (NOTE [ the segment path falls back ])."""
from __future__ import annotations

import logging
import os

import pytest

from mxnet_mirror_hook import plan_mirror
from mxnet_mirror_hook.errors import BackendError, MeasurementError
from mxnet_mirror_hook.planning import candidates, segments
from mxnet_mirror_hook.testing.models import small_resnet

DATA = [("data", (8, 3, 64, 64))]
BIND_ERROR = "MXNet could not bind the symbol on cpu(0): control dep not found in graph"


def _symbol():
    return small_resnet(4, 16)


def _refuse_measurement(monkeypatch):
    """Every segment measurement raises as a worker refusing the bind does; returns the call count."""
    calls = {"n": 0}

    def refuse(*args, **kwargs):
        calls["n"] += 1
        raise MeasurementError(BIND_ERROR)

    monkeypatch.setattr(candidates, "segment_planned_mb", refuse)
    monkeypatch.setattr(candidates, "start_segment_planned_mb", refuse)
    return calls


def _warnings(caplog):
    return [r for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("mxnet_mirror_hook")]


def test_auto_falls_back_to_the_one_level_plan_with_one_warning_when_measuring_segments_fails(
        isolated_cache, monkeypatch, caplog):
    one_level = plan_mirror(_symbol(), DATA, backend="mirror")
    calls = _refuse_measurement(monkeypatch)
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook"):
        plan = plan_mirror(_symbol(), DATA, backend="auto")
    # Every candidate's capture is started up front (NOTE [ segments captured two at a time ]);
    # the first candidate then fails under the gradient-sum cap and again under MXNet's default
    # (NOTE [ a network the cap cannot bind ]), and that failure ends the segment path.
    assert calls["n"] >= 2
    assert plan.backend == "mirror" and plan.segment_plan is None
    assert plan.mirrored and plan.mirrored == one_level.mirrored
    assert plan.planned_mb == one_level.planned_mb < plan.baseline_mb
    assert "measuring a" in plan.fallback and "MeasurementError" in plan.fallback
    assert "control dep not found" in plan.fallback
    (warning,) = _warnings(caplog)
    assert "executor segments failed" in warning.getMessage() and "one-level plan" in warning.getMessage()
    assert "\n" not in warning.getMessage()
    summary = plan.summary()
    assert f"(segments failed: {plan.fallback}; one-level plan used)" in summary
    assert plan.to_dict()["fallback"] == plan.fallback


def test_a_fallback_is_kept_in_the_cache_and_not_retried(isolated_cache, monkeypatch, caplog):
    calls = _refuse_measurement(monkeypatch)
    first = plan_mirror(_symbol(), DATA, backend="auto")
    measured = calls["n"]
    assert measured >= 2  # under the cap and under MXNet's default
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook"):
        again = plan_mirror(_symbol(), DATA, backend="auto")
    assert calls["n"] == measured  # from the cache: nothing measured again
    assert again.from_cache and again.fallback == first.fallback
    assert "segments failed" in again.summary()
    assert _warnings(caplog) == []
    assert len([p for p in os.listdir(isolated_cache) if p.startswith("plan-")]) == 2  # one-level + auto


def test_auto_falls_back_when_the_graph_cannot_be_split(isolated_cache, monkeypatch):
    def no_split(*args, **kwargs):
        raise ValueError("no cut separates these nodes")

    monkeypatch.setattr(segments, "splits_to_try", no_split)
    plan = plan_mirror(_symbol(), DATA, backend="auto", memory_budget="min")
    assert plan.backend == "mirror"
    assert plan.fallback.startswith("splitting the graph into segments: ValueError: no cut separates")


def test_explicit_segments_that_cannot_be_built_raise_one_backend_error_saying_what_to_do(
        isolated_cache, monkeypatch):
    _refuse_measurement(monkeypatch)
    with pytest.raises(BackendError) as raised:
        plan_mirror(_symbol(), DATA, backend="segments", segments=2)
    message = str(raised.value)
    assert "backend='segments' cannot be used for this network" in message
    assert "measuring a 2-segment plan" in message and BIND_ERROR in message
    assert "backend='auto'" in message and "backend='mirror'" in message
    assert isinstance(raised.value.__cause__, MeasurementError)
    # Nothing cached for the failed request: only the one-level plan's entry.
    assert len([p for p in os.listdir(isolated_cache) if p.startswith("plan-")]) == 1


def test_an_interrupt_on_the_segment_path_is_not_taken_for_a_failure(isolated_cache, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(candidates, "segment_planned_mb", interrupted)
    monkeypatch.setattr(candidates, "start_segment_planned_mb", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plan_mirror(_symbol(), DATA, backend="auto")
