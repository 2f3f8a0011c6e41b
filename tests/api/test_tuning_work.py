"""Tuning the segments' shared pool is bounded by counts (NOTE [ tuning bounded by work ])."""
from __future__ import annotations

from types import SimpleNamespace

from mxnet_mirror_hook.planning.candidates import TUNING_GAIN, Measured, _worth_tuning


def _measured(count, mb, overhead=0.4):
    segments = tuple(SimpleNamespace(mirrored=frozenset({f"n{count}_{i}"})) for i in range(count))
    return Measured(mb, overhead, SimpleNamespace(count=count, segments=segments, replay_random=False))


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
