"""Selective segment plans (issue 22): the dynamic program against enumerating every labelled cut
set, and the plans it gives on graphs (NOTE [ selective segments ])."""
from __future__ import annotations

import itertools
import random
from typing import Optional, Tuple

import pytest

from mxnet_mirror_hook.core.segments import pool as segment_pool
from mxnet_mirror_hook.core.segments import selective
from mxnet_mirror_hook.core.segments.plan import HEAD_GRAD_COPIES
from mxnet_mirror_hook.core.segments.selective import (SelectiveChain, chain_figures, mixed_estimate,
                                                       selective_chain, selective_plan, solve_selective)
from tests.graphs import residual


def _random_chain(points: int, seed: int) -> SelectiveChain:
    """A chain of ``points`` interior cut points with random additive working sets, costs and
    boundaries (the working set of an interval: the sum of its steps plus its largest step)."""
    rng = random.Random(seed)
    steps = [rng.randint(1, 40) for _ in range(points + 1)]
    costs = [rng.randint(0, 10) / 100 for _ in range(points + 1)]
    size = points + 2
    working = [[0] * size for _ in range(size)]
    cost = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            working[i][j] = sum(steps[i:j]) + max(steps[i:j])
            cost[i][j] = sum(costs[i:j])
    boundary = [0] + [rng.randint(0, 12) for _ in range(points)] + [0]
    return SelectiveChain(tuple(range(-1, points + 1)), tuple(boundary),
                          tuple(map(tuple, working)), tuple(map(tuple, cost)))


def _brute_force(chain: SelectiveChain, max_bytes: Optional[float],
                 max_cost: Optional[float]) -> Optional[Tuple[int, float]]:
    """The best (memory, cost) over every cut set and every labelling of its segments."""
    interior = range(1, chain.last)
    best = None
    for r in range(len(interior) + 1):
        for cuts in itertools.combinations(interior, r):
            for labels in itertools.product((False, True), repeat=len(cuts)):
                kept = [s for s, flag in enumerate(labels) if flag]  # never the last segment
                memory, cost = chain_figures(chain, cuts, kept)
                if (max_bytes is not None and memory > max_bytes) or (
                        max_cost is not None and cost > max_cost + 1e-12):
                    continue
                key = (cost, memory) if max_bytes is not None else (memory, cost)
                if best is None or key < best:
                    best = key
    if best is None:
        return None
    return (best[1], best[0]) if max_bytes is not None else best


@pytest.fixture
def every_threshold(monkeypatch):
    """The program tries every distinct working set as the shared pool's threshold (exact)."""
    monkeypatch.setattr(selective, "THRESHOLD_LIMIT", 10 ** 6)


@pytest.mark.parametrize("seed", range(12))
def test_the_program_finds_the_least_memory_under_an_overhead_limit_as_brute_force(seed, every_threshold):
    chain = _random_chain(points=5, seed=seed)
    for max_cost in (0.0, 0.05, 0.1, 0.2, None):
        found = solve_selective(chain, max_cost=max_cost)
        expected = _brute_force(chain, None, max_cost)
        assert found is not None and expected is not None
        assert (found.memory, round(found.cost, 9)) == (expected[0], round(expected[1], 9)), max_cost
        assert chain_figures(chain, found.cuts, found.kept) == (found.memory, found.cost)


@pytest.mark.parametrize("seed", range(12))
def test_the_program_finds_the_least_recomputation_under_a_memory_limit_as_brute_force(seed,
                                                                                     every_threshold):
    chain = _random_chain(points=5, seed=100 + seed)
    least = _brute_force(chain, None, None)[0]
    most = chain.working[0][chain.last]
    for max_bytes in (least, (least + most) // 2, most):
        found = solve_selective(chain, max_bytes=max_bytes)
        expected = _brute_force(chain, max_bytes, None)
        assert found is not None
        assert found.memory <= max_bytes
        assert round(found.cost, 9) == round(expected[1], 9) and found.memory == expected[0]


def test_both_limits_take_the_least_recomputation_that_fits_and_none_when_they_contradict(every_threshold):
    chain = _random_chain(points=5, seed=7)
    least = _brute_force(chain, None, None)[0]
    assert solve_selective(chain, max_bytes=least - 1) is None
    found = solve_selective(chain, max_bytes=least + 20, max_cost=0.5)
    expected = _brute_force(chain, least + 20, 0.5)
    assert round(found.cost, 9) == round(expected[1], 9)
    # The least memory needs recomputation: with no overhead allowed it cannot be reached.
    least_at_zero = _brute_force(chain, None, 0.0)[0]
    if least_at_zero > least:
        assert solve_selective(chain, max_bytes=least, max_cost=0.0) is None


def test_a_kept_segment_is_never_re_run_and_the_last_segment_is_never_kept():
    chain = _random_chain(points=4, seed=3)
    everything_kept = chain_figures(chain, (1, 2, 3, 4), (0, 1, 2, 3, 4))
    assert everything_kept[1] == 0.0
    for choice in (solve_selective(chain, max_cost=c) for c in (0.0, 0.1, None)):
        assert all(s < len(choice.cuts) for s in choice.kept)


def test_quantile_thresholds_still_give_the_figures_of_the_chosen_plan(monkeypatch):
    monkeypatch.setattr(selective, "THRESHOLD_LIMIT", 3)
    chain = _random_chain(points=6, seed=11)
    found = solve_selective(chain, max_cost=0.1)
    assert chain_figures(chain, found.cuts, found.kept) == (found.memory, found.cost)
    assert found.cost <= 0.1 + 1e-12
    assert found.memory >= _brute_force(chain, None, 0.1)[0]


def test_a_residual_graph_gives_a_plan_whose_estimate_is_the_mixed_pool():
    graph = residual(6)
    sel = selective_chain(graph)
    free = solve_selective(sel, max_cost=0.0)
    assert free is not None and free.cost == 0.0
    least = solve_selective(sel)
    assert least.memory <= free.memory
    cheap = solve_selective(sel, max_cost=0.1)
    plan = selective_plan(graph, cheap, sel)
    assert plan.count == len(cheap.cuts) + 1 and plan.kept == cheap.kept
    assert plan.recompute_fraction == pytest.approx(cheap.cost)
    kept = [s.working_bytes for s in plan.segments if s.index in plan.kept]
    shared = [s.working_bytes for s in plan.segments if s.index not in plan.kept]
    assert mixed_estimate(plan) == HEAD_GRAD_COPIES * plan.boundary_bytes + sum(kept) + max(shared)
    assert plan.estimated_bytes == mixed_estimate(plan)
    # Kept segments own their pools: they are not in the shared pool's bind order.
    assert not set(plan.bind_order()) & set(plan.kept)
    assert type(plan).from_dict(plan.to_dict()) == plan


def test_the_mixed_pool_adds_each_kept_pool_to_the_shared_one():
    shared = [[100, 50], [80, 40, 10]]
    assert segment_pool.mixed_pool_bytes(shared, [[30, 20], [5]]) == (
        segment_pool.shared_pool_bytes(shared) + 55)
    assert segment_pool.mixed_pool_bytes(shared, []) == segment_pool.shared_pool_bytes(shared)
