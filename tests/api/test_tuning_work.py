"""Tuning the segments' shared pool is bounded by counts (NOTE [ tuning bounded by work ])."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mxnet_mirror_hook.planning import candidates
from mxnet_mirror_hook.planning.candidates import TUNING_GAIN, Measured, _worth_tuning, tune_shared_pool


def _measured(count, mb, overhead=0.4):
    segments = tuple(SimpleNamespace(mirrored=frozenset({f"n{count}_{i}"}), match_range=0)
                     for i in range(count))
    return Measured(mb, overhead, SimpleNamespace(count=count, segments=segments, replay_random=False,
                                                  head_chunks=0))


def test_a_count_that_cannot_become_the_choice_is_not_tuned():
    two, three, four = _measured(2, 1143), _measured(3, 1054), _measured(4, 1192)
    worth = _worth_tuning([two, three, four], [two, three, four], 1.03)
    # 1143 > 1.03 * 1054: 3 segments are chosen; tuning could bring 2 within the tolerance, and
    # could not pull 4 below 1054 / 1.03.
    assert [item.plan.count for item in worth] == [2, 3]
    assert 1192 * (1 - TUNING_GAIN) * 1.03 >= 1054


def test_a_count_above_the_choice_is_tuned_when_it_could_lower_the_least_enough():
    two, three = _measured(2, 1000), _measured(3, 1010)
    assert [i.plan.count for i in _worth_tuning([two, three], [two, three], 1.03)] == [2, 3]
    far = _measured(3, 1300)
    assert [i.plan.count for i in _worth_tuning([two, far], [two, far], 1.03)] == [2]


_SETUP = SimpleNamespace(symbol=None, context=None, bind_inputs=())


def _recording(monkeypatch):
    """Neighbours and match ranges replaced by recorders (no binds): the counts tuned."""
    tuned = []

    def neighbours(setup, options, chain, best):
        tuned.append(best.plan.count)
        return []

    monkeypatch.setattr(candidates, "_neighbours", neighbours)
    monkeypatch.setattr(candidates, "tune_match_ranges", lambda symbol, plan, *args: plan)
    return tuned


def test_nothing_is_tuned_when_no_segment_plan_could_come_below_the_ceiling(monkeypatch):
    """NOTE [ tuning bounded by work ]: resnet50_v1b, batch 32, 'min': one-level 845 MB, segments
    999 MB at least; 'auto' takes segments only below 845 * 0.9."""
    tuned = _recording(monkeypatch)
    measured = [_measured(2, 999), _measured(3, 1152)]
    assert tune_shared_pool(_SETUP, None, None, measured, 1.03, ceiling_mb=845 * 0.9) == []
    assert tuned == []
    assert 999 * (1 - TUNING_GAIN) >= 845 * 0.9


@pytest.mark.parametrize("ceiling_mb", [None, 999 * (1 - TUNING_GAIN) + 1])
def test_a_ceiling_some_plan_could_come_below_tunes_as_no_ceiling_does(monkeypatch, ceiling_mb):
    tuned = _recording(monkeypatch)
    measured = [_measured(2, 999), _measured(3, 1152)]
    tune_shared_pool(_SETUP, None, None, measured, 1.03, ceiling_mb=ceiling_mb)
    assert tuned == [2]  # 3 segments cannot become the choice either way
