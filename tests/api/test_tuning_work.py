"""Tuning the segments' shared pool is bounded by counts (NOTE [ tuning bounded by work ])."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mxnet_mirror_hook.planning import candidates
from mxnet_mirror_hook.planning.candidates import (NEIGHBOUR_CUTS, NEIGHBOUR_REPLANS, TUNING_GAIN, Measured,
                                                   _neighbours, _worth_tuning)


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


def test_only_the_least_neighbours_get_a_plan_per_segment(monkeypatch):
    quick_mb = [1100, 1050, 1200, 1080, 1300, 1090, 1070, 1400][:NEIGHBOUR_CUTS]
    made = {"moved": 0}
    replanned = []

    def split_for(graph, moved, chain):
        index = made["moved"]
        made["moved"] += 1
        plan = SimpleNamespace(count=2, index=index, replanned=False)
        plan.with_replay_random = lambda replay: plan
        plan.with_mirrored = lambda mirrored, graph: SimpleNamespace(count=2, index=index, replanned=False)
        return plan

    def per_segment(split, setup, options):
        replanned.append(split.index)
        return SimpleNamespace(count=2, index=split.index, replanned=True)

    def measure(setup, plan):
        return Measured(quick_mb[plan.index] - (10 if plan.replanned else 0), 0.4, plan)

    monkeypatch.setattr(candidates, "cut_positions", lambda graph, plan: [10])
    monkeypatch.setattr(candidates, "alternative_cuts", lambda *args: [[i] for i in range(20)])
    monkeypatch.setattr(candidates, "segment_plan_for_cuts", split_for)
    monkeypatch.setattr(candidates, "per_segment_two_level", per_segment)
    monkeypatch.setattr(candidates, "measure_segments", measure)
    found = _neighbours(SimpleNamespace(graph=None), None, None, _measured(2, 1143))
    assert made["moved"] == NEIGHBOUR_CUTS
    order = sorted(range(NEIGHBOUR_CUTS), key=lambda i: quick_mb[i])
    assert replanned == order[:NEIGHBOUR_REPLANS]
    assert len(found) == NEIGHBOUR_CUTS + NEIGHBOUR_REPLANS
    assert min(item.mb for item in found) == pytest.approx(min(quick_mb) - 10)
