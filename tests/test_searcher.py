"""The stored, truthful Optuna searcher: intermediate values, PRUNED / FAIL / COMPLETE as the
trial really ended, a restored (older) searcher that still finds its trials, no RUNNING left."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest

from coatnet.search.searcher import StudySearch, close_orphans, search_trials, storage_url

EPOCHS = 4


def space(trial: Any) -> dict[str, Any]:
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    return {"candidate": {"note": "constant"}}


def make(tmp_path: Path) -> StudySearch:
    return StudySearch(space=space, metric="val_accuracy", mode="max",
                       sampler=optuna.samplers.RandomSampler(seed=0),
                       storage=storage_url(tmp_path), study_name="s", max_epochs=EPOCHS)


def stored(tmp_path: Path) -> dict[str, optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    return {t.user_attrs["tune_trial_id"]: t for t in study.get_trials()}


def run(search: StudySearch, trial_id: str, values: list[float], *, status: str = "running",
        error: bool = False) -> None:
    result: dict[str, Any] = {}
    for epoch, value in enumerate(values, start=1):
        result = {"val_accuracy": value, "epochs_done": epoch, "status": status}
        search.on_trial_result(trial_id, result)
    search.on_trial_complete(trial_id, result, error=error)


def test_trials_end_as_they_really_ended(tmp_path: Path) -> None:
    search = make(tmp_path)
    for trial_id in ("done", "cut", "nan", "boom"):
        config = search.suggest(trial_id)
        assert set(config) == {"lr", "candidate"}
    run(search, "done", [0.2, 0.4, 0.5, 0.6])
    run(search, "cut", [0.1, 0.25])  # ASHA stopped it after 2 of 4 epochs
    run(search, "nan", [0.3, math.nan])
    run(search, "boom", [0.3], error=True)
    trials = stored(tmp_path)
    assert trials["done"].state.name == "COMPLETE" and trials["done"].value == 0.6
    assert trials["cut"].state.name == "PRUNED"
    assert trials["cut"].intermediate_values == {1: 0.1, 2: 0.25}
    assert trials["done"].intermediate_values == {1: 0.2, 2: 0.4, 3: 0.5, 4: 0.6}
    assert trials["nan"].state.name == "FAIL" and trials["boom"].state.name == "FAIL"


def test_diverged_is_a_failure_and_infeasible_is_complete(tmp_path: Path) -> None:
    search = make(tmp_path)
    search.suggest("div")
    search.suggest("inf")
    run(search, "div", [0.3, 0.0], status="diverged")
    search.on_trial_result("inf", {"val_accuracy": 0.0, "epochs_done": 0,
                                   "status": "infeasible"})
    search.on_trial_complete("inf", {"val_accuracy": 0.0, "epochs_done": 0,
                                     "status": "infeasible"})
    trials = stored(tmp_path)
    assert trials["div"].state.name == "FAIL"
    assert trials["inf"].state.name == "COMPLETE" and trials["inf"].value == 0.0


def test_a_restored_older_searcher_finds_later_trials_in_the_study(tmp_path: Path) -> None:
    search = make(tmp_path)
    search.suggest("a")
    old = pickle.dumps(search.__dict__)  # Tune saved the searcher here...
    search.suggest("b")  # ...then the driver asked for one more trial and was killed
    restored = make(tmp_path)
    restored.__dict__.update(pickle.loads(old))
    assert "b" not in restored._ot_trials
    run(restored, "b", [0.1, 0.2, 0.3, 0.4])  # Ray's OptunaSearch: KeyError here
    run(restored, "a", [0.5, 0.5, 0.5, 0.5])
    trials = stored(tmp_path)
    assert trials["b"].state.name == "COMPLETE" and trials["b"].value == 0.4
    assert trials["a"].state.name == "COMPLETE"


def test_a_trial_told_by_a_killed_driver_comes_back_without_error(tmp_path: Path) -> None:
    search = make(tmp_path)
    search.suggest("t")
    old = pickle.dumps(search.__dict__)  # Tune's saved state: t still running
    run(search, "t", [0.1, 0.2, 0.3, 0.4])  # it ended and was told; then the driver died
    restored = make(tmp_path)
    restored.__dict__.update(pickle.loads(old))
    run(restored, "t", [0.4])  # resumed from its last checkpoint: re-reports the final epoch
    trial = stored(tmp_path)["t"]
    assert trial.state.name == "COMPLETE" and trial.value == 0.4
    assert trial.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}


def test_close_orphans_marks_asks_tune_never_saved(tmp_path: Path) -> None:
    search = make(tmp_path)
    for trial_id in ("kept", "lost", "lost_done"):
        search.suggest(trial_id)
    run(search, "kept", [0.1, 0.2, 0.3, 0.4])
    run(search, "lost_done", [0.5, 0.6, 0.7, 0.8])  # began and ended between two Tune saves
    assert close_orphans(storage=storage_url(tmp_path), study_name="s",
                         trial_ids=["kept"]) == 2
    trials = stored(tmp_path)
    assert trials["lost"].state.name == "FAIL" and trials["lost"].user_attrs["orphaned"]
    assert trials["lost_done"].state.name == "COMPLETE"  # a finished trial cannot change
    assert trials["kept"].state.name == "COMPLETE"
    assert "orphaned" not in trials["kept"].user_attrs
    study = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    assert [t.user_attrs["tune_trial_id"] for t in search_trials(study)] == ["kept"]
    assert close_orphans(storage=storage_url(tmp_path), study_name="s",
                         trial_ids=["kept"]) == 0


def test_the_searcher_pickles_with_its_storage(tmp_path: Path) -> None:
    search = make(tmp_path)
    search.suggest("x")
    copy = pickle.loads(pickle.dumps(search))
    run(copy, "x", [0.1, 0.2, 0.3, 0.9])
    assert stored(tmp_path)["x"].value == pytest.approx(0.9)
