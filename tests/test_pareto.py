"""Pareto fronts, hypervolume and the Pareto rung decision, checked against independent
computations (brute force, Optuna's own hypervolume) and against Ray's ASHA on the case it
gets wrong."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from optuna._hypervolume import compute_hypervolume
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from coatnet.search.pareto import (
    Objective,
    dominates,
    hypervolume,
    non_dominated_ranks,
    pareto_front,
)
from coatnet.search.schedulers import ParetoASHA

MODES = ("max", "min")  # accuracy up, cost down


def brute_front(points: list[tuple[float, float]]) -> set[int]:
    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    return {i for i, p in enumerate(points) if not any(better(q, p) for q in points)}


@pytest.mark.parametrize("seed", range(5))
def test_front_and_ranks_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    points = [(round(rng.random(), 2), rng.choice([1e5, 3e5, 1e6, 3e6])) for _ in range(40)]
    front = pareto_front(points, MODES)
    assert set(front) == brute_front(points)
    ranks = non_dominated_ranks(points, MODES)
    for i, p in enumerate(points):  # rank r: dominated by some rank r-1 point, none below
        assert not any(dominates(points[j], p, MODES) for j in range(len(points))
                       if ranks[j] >= ranks[i])
        if ranks[i]:
            assert any(dominates(points[j], p, MODES) for j in range(len(points))
                       if ranks[j] == ranks[i] - 1)


def test_missing_values_are_never_on_the_front() -> None:
    points = [(0.9, 1e6), (float("nan"), 1e3), (None, 1e2), (0.5, 1e5)]
    assert pareto_front(points, MODES) == [0, 3]
    assert non_dominated_ranks(points, MODES) == [0, 1, 1, 0]


def test_hypervolume_two_objectives_by_hand() -> None:
    # accuracy up to 1.0, cost down from 10: boxes (0.5 x 8) + (0.3 x 5 more) ...
    points = [(0.5, 2.0), (0.8, 5.0), (0.3, 9.0), (0.9, 11.0)]
    # reference (0, 10): (0.9, 11) is outside; (0.3, 9) dominated by (0.5, 2)
    assert hypervolume(points, MODES, (0.0, 10.0)) == pytest.approx(0.5 * 8 + 0.3 * 5)
    assert hypervolume([], MODES, (0.0, 10.0)) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_hypervolume_matches_optuna(seed: int) -> None:
    rng = np.random.default_rng(seed)
    losses = rng.random((30, 3))
    reference = np.array([1.1, 1.1, 1.1])
    ours = hypervolume([tuple(p) for p in losses], ("min", "min", "min"), tuple(reference))
    assert ours == pytest.approx(compute_hypervolume(losses, reference), rel=1e-9)


def _feed(scheduler: object, results: list[tuple[str, float, float]]) -> dict[str, str]:
    decisions = {}
    for trial_id, accuracy, macs in results:
        trial = SimpleNamespace(trial_id=trial_id, config={}, evaluated_params={})
        if hasattr(scheduler, "on_trial_add"):
            scheduler.on_trial_add(None, trial)
        decisions[trial_id] = scheduler.on_trial_result(
            None, trial, {"epochs_done": 2, "training_iteration": 2, "val_accuracy": accuracy,
                          "macs": macs})
    return decisions


def test_the_cheap_front_member_survives_the_rung() -> None:
    """Two big accurate models reach the rung first, then a small one that is less accurate
    but cheaper than both: Ray's ASHA (accuracy alone) stops it, ParetoASHA keeps it (it is on
    the front) and stops a model that is dominated."""
    arrivals = [("big", 0.90, 3e6), ("big2", 0.88, 2.5e6), ("small", 0.60, 2e5),
                ("worse", 0.70, 2.8e6)]
    asha = ASHAScheduler(time_attr="epochs_done", metric="val_accuracy", mode="max",
                         max_t=8, grace_period=2, reduction_factor=2)
    assert _feed(asha, arrivals)["small"] == TrialScheduler.STOP
    ours = ParetoASHA(objectives=[Objective("val_accuracy", "max"), Objective("macs", "min")],
                      max_t=8, grace_period=2, reduction_factor=2)
    decided = _feed(ours, arrivals)
    assert decided["small"] == TrialScheduler.CONTINUE
    assert decided["worse"] == TrialScheduler.STOP
    assert set(ours.rungs[2]) == {"big", "big2", "small", "worse"}


def test_one_objective_keeps_the_top_fraction() -> None:
    """With accuracy alone a trial continues when fewer than 1/rf of the trials at the rung
    (itself included) are more accurate: ASHA's top-1/rf rule, without its interpolation."""
    rng = random.Random(0)
    arrivals = [(f"t{i}", round(rng.random(), 3), 1.0) for i in range(30)]
    ours = ParetoASHA(objectives=[Objective("val_accuracy", "max")], max_t=8,
                      grace_period=2, reduction_factor=2)
    decided = _feed(ours, arrivals)
    for k, (trial_id, accuracy, _) in enumerate(arrivals):
        seen = [a for _, a, _ in arrivals[:k + 1]]
        better = sum(a > accuracy for a in seen)
        expected = TrialScheduler.CONTINUE if better < max(1, len(seen) / 2) \
            else TrialScheduler.STOP
        assert decided[trial_id] == expected, (trial_id, better, len(seen))
    kept = sum(d == TrialScheduler.CONTINUE for d in decided.values())
    assert 0.3 * len(arrivals) < kept < 0.8 * len(arrivals)


def test_rungs_and_the_end() -> None:
    ours = ParetoASHA(objectives=[Objective("val_accuracy", "max")], max_t=8,
                      grace_period=1, reduction_factor=2)
    assert sorted(ours.rungs) == [1, 2, 4]
    trial = SimpleNamespace(trial_id="a")
    assert ours.on_trial_result(None, trial, {"epochs_done": 8, "val_accuracy": 0.1}) == \
        TrialScheduler.STOP
    with pytest.raises(ValueError, match="reduction_factor"):
        ParetoASHA(objectives=[Objective("val_accuracy", "max")], max_t=8, reduction_factor=1)
