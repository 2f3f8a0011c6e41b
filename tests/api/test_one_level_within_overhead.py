"""Under ``max_overhead`` with ``backend='auto'`` the least one-level memory within the limit stands
beside the selective segments, and the lower is taken (NOTE [ the one-level plan within an overhead
limit ] in planning/selective.py)."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook import OptionError, plan_mirror
from mxnet_mirror_hook.core.budget import Budget
from mxnet_mirror_hook.testing.models import small_resnet

DATA = [("data", (16, 3, 32, 32))]
LABEL = [("softmax_label", (16,))]


def _plan(**options):
    options.setdefault("cache_dir", False)
    return plan_mirror(small_resnet(num_blocks=3, channels=16), DATA, LABEL, **options)


@pytest.mark.parametrize("limit", [0.1, 0.2])
def test_auto_takes_the_least_one_level_memory_within_the_limit_when_below_the_segments(limit):
    within = _plan(memory_budget=Budget.within_overhead(limit), backend="mirror")
    segments = _plan(max_overhead=limit, backend="segments")
    default = _plan(backend="mirror")
    plan = _plan(max_overhead=limit)
    assert within.overhead <= limit + 1e-9 and within.planned_mb < within.baseline_mb
    assert default.overhead > limit, "the default budget's plan alone would not be within the limit"
    assert within.planned_mb < segments.planned_mb
    assert plan.backend == "mirror" and set(plan.mirrored) == set(within.mirrored)
    assert plan.planned_mb == within.planned_mb and plan.overhead <= limit + 1e-9


def test_the_one_level_plan_within_the_limit_comes_back_from_the_cache(tmp_path):
    first = _plan(max_overhead=0.2, cache_dir=str(tmp_path))
    again = _plan(max_overhead=0.2, cache_dir=str(tmp_path))
    assert again.from_cache and set(again.mirrored) == set(first.mirrored)
    assert again.planned_mb == first.planned_mb and again.overhead <= 0.2 + 1e-9


def test_a_budget_no_selective_plan_meets_is_met_by_the_one_level_plan_within_the_limit(monkeypatch):
    from mxnet_mirror_hook.planning import segments as planning_segments

    def contradicts(setup, options, one_level):
        raise OptionError("memory_budget 0.9 and max_overhead=0.2 contradict (stand-in)")

    monkeypatch.setattr(planning_segments, "plan_selective", contradicts)
    plan = _plan(max_overhead=0.2, memory_budget=0.9)
    assert plan.backend == "mirror" and plan.overhead <= 0.2 + 1e-9
    assert plan.planned_mb <= 0.9 * plan.baseline_mb
    with pytest.raises(OptionError, match="stand-in"):  # 'segments' has no one-level plan to take
        _plan(max_overhead=0.2, memory_budget=0.9, backend="segments")


def test_contradictory_max_overhead_and_budget_under_auto_is_still_one_clear_error():
    with pytest.raises(OptionError, match="contradict") as caught:
        _plan(max_overhead=0.0, memory_budget=0.2)
    assert "\n" not in str(caught.value)
