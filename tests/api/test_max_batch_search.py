"""max_batch's search: the same answer as trying every batch, in few plans; the segment kind plans
its probes once; warnings of the plans it asks for itself are held back (one summary line)."""
from __future__ import annotations

import logging
import math
import random
import statistics

from mxnet_mirror_hook.core.footprint import Footprint
from mxnet_mirror_hook.planning import batch as batch_module
from mxnet_mirror_hook.planning.batch import search_largest
from mxnet_mirror_hook.planning.probe_log import HeldWarnings
from mxnet_mirror_hook.planning.result import PLAN_LOGGER

from .test_device_memory import SHAPES, conv_net


def _whole_mb(fixed: float, per_sample: float, bend: float = 0.0):
    """A footprint in whole MB (as MXNet reports), growing with the batch, slightly convex."""
    return lambda batch: float(math.ceil(fixed + per_sample * batch + bend * batch * batch))


def _evaluator(total, planned):
    def evaluate(batch):
        planned.append(batch)
        return Footprint(activations=total(batch)), None
    return evaluate


def _brute_force(total, device_mb, limit):
    return max((b for b in range(1, limit + 1) if total(b) <= device_mb), default=0)


def test_the_search_ends_where_trying_every_batch_does_in_few_plans():
    """Footprints in whole MB, from straight to clearly bent, devices from 50 MB to 4 GB."""
    rng = random.Random(0)
    counts = []
    for _ in range(200):
        total = _whole_mb(rng.uniform(5, 400), rng.uniform(0.02, 5),
                          rng.choice([0.0, 1e-5, 1e-4, 1e-3]) * rng.random())
        device_mb = rng.uniform(50, 4000)
        planned = []
        batch, seen, exact = search_largest(_evaluator(total, planned), device_mb, (8, 16), 4096, 16)
        assert (batch, exact) == (_brute_force(total, device_mb, 4096), True), device_mb
        assert sorted(seen) == sorted(planned) and len(planned) == len(set(planned))
        counts.append(len(planned))
    # Two probes, then the line: a straight footprint's bracket closes in two or three plans.
    assert max(counts) <= 10 and statistics.mean(counts) <= 6


def test_a_search_with_nothing_that_fits_or_everything_fitting_is_exact():
    planned = []
    assert search_largest(_evaluator(_whole_mb(500, 1.0), planned), 300, (8, 16), 4096, 16)[::2] == (0, True)
    assert search_largest(_evaluator(_whole_mb(1, 0.01), []), 300, (8, 16), 64, 16)[::2] == (64, True)


def test_the_segment_kind_plans_its_first_probe_then_where_its_split_says_the_bracket_is():
    """The split planned at the first probe, measured at other batches, is a little above the plans
    made there; the search still ends where trying every batch does, and plans neither the second
    probe nor batches far from the answer."""
    real = _whole_mb(135, 1.17)
    planned, measured = [], []

    def evaluate(batch):
        planned.append(batch)
        return Footprint(activations=real(batch)), _SplitPlan()

    def remeasure(plan, batch):
        measured.append(batch)
        return Footprint(activations=real(batch) + 1), plan

    evaluate.remeasure = remeasure
    batch, seen, exact = batch_module._search("segments", evaluate, 300, (8, 16), 4096, 16)
    assert (batch, exact) == (_brute_force(real, 300, 4096), True)
    assert planned[0] == 8 and 16 not in planned and len(planned) <= 4
    assert 16 in measured and all(abs(b - batch) <= 2 for b in planned[1:])


def test_a_split_that_cannot_be_measured_elsewhere_falls_back_to_planning_the_probes(caplog):
    real = _whole_mb(135, 1.17)
    planned = []

    def evaluate(batch):
        planned.append(batch)
        return Footprint(activations=real(batch)), _SplitPlan()

    def remeasure(plan, batch):
        raise RuntimeError("the split does not carry over")

    evaluate.remeasure = remeasure
    with caplog.at_level(logging.WARNING, logger=PLAN_LOGGER):
        batch, _, exact = batch_module._search("segments", evaluate, 300, (8, 16), 4096, 16)
    assert (batch, exact) == (_brute_force(real, 300, 4096), True) and 16 in planned
    assert "could not be measured at 16" in caplog.text


class _SplitPlan:
    """Stands for a plan with a segment split (only its presence is read)."""

    segment_plan = object()


def test_held_warnings_reach_no_handler_and_end_in_one_summary_line(caplog):
    planning = logging.getLogger(PLAN_LOGGER)
    with caplog.at_level(logging.DEBUG, logger="mxnet_mirror_hook"):
        with HeldWarnings("the probes", planning) as held:
            planning.warning("backend='segments' was asked for, so it is used")
            late = logging.getLogger("mxnet_mirror_hook.made_while_planning")
            held.attach()  # before each probe: loggers created meanwhile are filtered too
            late.warning("backend='segments' was asked for, so it is used")
            planning.error("an error still shows")
        planning.warning("after the probes a warning shows")
    by_level = {level: [r.getMessage() for r in caplog.records if r.levelno == level]
                for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)}
    assert by_level[logging.WARNING] == ["after the probes a warning shows"]
    assert by_level[logging.ERROR] == ["an error still shows"]
    assert len(by_level[logging.INFO]) == 1
    assert by_level[logging.INFO][0].startswith(
        "2 planning warning(s) held back during the probes (1 distinct")
    assert sum("was asked for" in line for line in by_level[logging.DEBUG]) == 2
    assert not any(held in item.filters for item in logging.Logger.manager.loggerDict.values()
                   if isinstance(item, logging.Logger))


def test_max_batch_logs_no_warning_of_the_segment_plans_it_asks_for(caplog, monkeypatch):
    """max_batch plans backend='segments' itself: a planner warning written for a user who asked for
    it (here forced at every plan, as the segments planner words it) is held back."""
    import mxnet_mirror_hook.plan as plan_module

    plan_mirror = plan_module.plan_mirror

    def warning_plan(*args, **kwargs):
        if kwargs["options"].backend == "segments":
            logging.getLogger(PLAN_LOGGER).warning("backend='segments' was asked for, so it is used")
        return plan_mirror(*args, **kwargs)

    monkeypatch.setattr(plan_module, "plan_mirror", warning_plan)
    with caplog.at_level(logging.INFO, logger="mxnet_mirror_hook"):
        found = batch_module.max_batch(conv_net(depth=3), SHAPES, "200MB", method="slope",
                                       variants=("one-level", "segments"), cache_dir=False)
    assert found.fits["segments"].batch > 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    summary = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
    assert len(summary) == 1 and "was asked for" in summary[0]
