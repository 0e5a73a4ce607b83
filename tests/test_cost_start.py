"""The cost-spread start: an accuracy-versus-cost search's random start spread over its cost,
cheapest first, enqueued into a new study only, after the space's own ``search.enqueue``."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from coatnet.search.searcher import START_ATTR, StudySearch, storage_url
from coatnet.search.space import load_space
from coatnet.search.space.cost_start import _spread, cost_spread_start
from coatnet.search.space.sampling import scratch_study

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "search_spaces" / "coatnet_small.yaml"
DRAWS = 16


@pytest.fixture(scope="module")
def space():
    return load_space(DEFAULT)


def feasible_draws(space, *, seed: int, attr: str) -> list[int]:
    """The cost of every feasible candidate among the same random draws, found here alone."""
    study = scratch_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    costs = []
    for _ in range(DRAWS):
        candidate, _ = space._sample(study.ask())
        if candidate.infeasible_reason is None:
            costs.append(getattr(candidate, attr))
    return costs


@pytest.mark.parametrize("attr", ["macs", "params"])
def test_the_start_runs_from_the_cheapest_draw_to_the_dearest(space, attr: str) -> None:
    points = cost_spread_start(space, n=4, cost=attr, seed=3, draws=DRAWS)
    assert len(points) == 4
    candidates = [space.candidate_from_params(p) for p in points]
    assert all(c.infeasible_reason is None for c in candidates)
    costs = [getattr(c, attr) for c in candidates]
    assert costs == sorted(costs) and len(set(map(str, points))) == 4
    drawn = feasible_draws(space, seed=3, attr=attr)
    assert costs[0] == min(drawn) and costs[-1] == max(drawn)
    # the middle two: no draw left unpicked is nearer the thirds of the log-cost range
    low, high = math.log(min(drawn)), math.log(max(drawn))
    unpicked = [c for c in drawn if c not in costs]
    for k in (1, 2):
        target = low + (high - low) * k / 3
        assert all(abs(math.log(c) - target) >= abs(math.log(costs[k]) - target)
                   for c in unpicked)
    assert cost_spread_start(space, n=4, cost=attr, seed=3, draws=DRAWS) == points


def test_a_cost_measured_in_the_trial_is_spread_by_macs(space) -> None:
    assert cost_spread_start(space, n=3, cost="latency_ms", seed=1, draws=DRAWS) == \
        cost_spread_start(space, n=3, cost="macs", seed=1, draws=DRAWS)


def test_the_spread_picks_distinct_items_nearest_each_target() -> None:
    assert _spread([0.0, 0.1, 0.2, 5.0, 10.0], 3) == [0, 3, 4]
    assert _spread([1.0, 1.0, 1.0], 5) == [0, 1, 2]  # fewer items than points: each once
    assert _spread([2.0, 3.0], 1) == [0]
    assert _spread([], 4) == []


def test_the_start_follows_the_space_enqueue_in_a_new_study_only(space, tmp_path: Path) -> None:
    calls = []

    def start():
        calls.append(1)
        return cost_spread_start(space, n=2, cost="macs", seed=0, draws=DRAWS)

    def make() -> StudySearch:
        return StudySearch(space=space.define_by_run, metric=["val_accuracy", "macs"],
                           mode=["max", "min"], sampler=optuna.samplers.TPESampler(seed=0),
                           storage=storage_url(tmp_path), study_name="s", max_epochs=8,
                           enqueue=space.search.enqueue, start=start)

    search = make()
    configs = [search.suggest(t)["candidate"] for t in ("a", "b", "c", "d")]
    assert configs[0]["model"]["block_type_in_layers"] == list("CCTT")  # the space's enqueue
    expected = cost_spread_start(space, n=2, cost="macs", seed=0, draws=DRAWS)
    wanted = [space.candidate_from_params(p) for p in expected]
    assert [c["macs"] for c in configs[1:3]] == [c.macs for c in wanted]
    assert [c["hparams"]["lr"] for c in configs[1:3]] == [c.hparams.lr for c in wanted]
    study = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    marked = [t.user_attrs.get(START_ATTR, False) for t in study.get_trials()]
    assert marked == [False, True, True, False]
    make()  # a later driver over the stored study neither computes nor enqueues it again
    assert calls == [1] and len(study.get_trials()) == 4


def test_the_runner_spreads_only_a_tpe_search_with_a_cost(tmp_path: Path) -> None:
    from coatnet.search.front import objectives_of
    from coatnet.search.runner import _cost_spread_start

    base = yaml.safe_load(DEFAULT.read_text())

    def start_of(**search):
        doc = {**base, "search": {**base["search"], **search}}
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump(doc))
        loaded = load_space(path)

        class Plan:
            space = loaded
        return _cost_spread_start(Plan, objectives=objectives_of(loaded.search))

    shipped = start_of()
    assert shipped.keywords == {"n": 4, "cost": "macs", "seed": 0}  # 5 startup, 1 enqueued
    assert start_of(num_samples=3).keywords["n"] == 2
    assert start_of(start="random") is None
    assert start_of(searcher="random") is None and start_of(searcher="nsga2") is None
    assert start_of(n_startup_trials=1) is None
    assert start_of(objectives=[{"metric": "val_accuracy", "mode": "max"}]) is None


def test_a_start_that_fails_leaves_the_random_start(tmp_path: Path, caplog) -> None:
    def start():
        raise RuntimeError("no candidates")

    search = StudySearch(space=lambda trial: {"candidate": {"lr": trial.suggest_float(
                             "lr", 1e-4, 1e-1, log=True)}},
                         metric=["val_accuracy", "macs"], mode=["max", "min"],
                         sampler=optuna.samplers.TPESampler(seed=0),
                         storage=storage_url(tmp_path), study_name="s", max_epochs=8,
                         start=start)
    assert search.suggest("a")["candidate"]["lr"] > 0
    assert "no cost-spread start (no candidates)" in caplog.text
