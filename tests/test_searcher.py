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


ENQUEUE_SPACE = """\
data: {dataset: synthetic, image_size: 32}
trial: {epochs: 4}
search:
  num_samples: 6
  enqueue:
    - {model: {layout: CCCC, depth: {s1: 2}}, train: {lr: 0.003}}
    - {model.layout: CCTT, model.head_dim: 16, train.lr: 0.0002}
model:
  layout: {type: categorical, choices: [CCTT, CCCC]}
  head_dim: {type: categorical, choices: [16, 32]}
  depth: {s0: 1, s1: {type: int, low: 1, high: 2}, s2: 1, s3: 1, s4: 1}
  channels: {s0: 16, s1: 16, s2: 32, s3: 64, s4: 64}
train: {lr: {type: float, low: 1e-4, high: 1e-2, log: true}, batch_size: 32}
"""


def test_enqueued_configurations_are_the_first_trials_once(tmp_path: Path) -> None:
    from coatnet.search.contracts import Candidate
    from coatnet.search.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(ENQUEUE_SPACE)
    space = load_space(path)
    assert space.search.enqueue == [
        {"model.layout": "CCCC", "model.depth.s1": 2, "train.lr": 0.003},
        {"model.layout": "CCTT", "model.head_dim": 16, "train.lr": 0.0002}]

    def make_search() -> StudySearch:
        return StudySearch(space=space.define_by_run, metric="val_accuracy", mode="max",
                           sampler=optuna.samplers.TPESampler(seed=0),
                           storage=storage_url(tmp_path), study_name="s", max_epochs=EPOCHS,
                           enqueue=space.search.enqueue, run_id_of=lambda t: f"run-{t}")

    search = make_search()
    first, second, third = (Candidate.from_dict(search.suggest(t)["candidate"])
                            for t in ("a", "b", "c"))
    assert list(first.model["block_type_in_layers"]) == list("CCCC")
    assert first.model["num_blocks_in_layers"][1] == 2 and first.hparams.lr == 0.003
    assert list(second.model["block_type_in_layers"]) == list("CCTT")
    assert second.model["head_dim"] == 16 and second.hparams.lr == 0.0002
    run(search, "a", [0.1, 0.2, 0.3, 0.4])
    trials = stored(tmp_path)
    assert trials["a"].user_attrs["enqueued"] and trials["b"].user_attrs["enqueued"]
    assert "enqueued" not in trials["c"].user_attrs
    assert trials["a"].user_attrs["mlflow_run_id"] == "run-a"
    # a later driver over the same stored study does not enqueue them again
    make_search()
    study = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    assert len(study.get_trials()) == 3
    assert third.hparams.lr not in (0.003, 0.0002)


def test_the_result_that_ends_a_trial_is_its_last_intermediate_value(tmp_path: Path) -> None:
    """Tune does not call on_trial_result for the result that ends a trial: the searcher takes
    it from on_trial_complete."""
    search = make(tmp_path)
    search.suggest("t")
    for epoch, value in enumerate([0.1, 0.2, 0.3], start=1):
        search.on_trial_result("t", {"val_accuracy": value, "epochs_done": epoch,
                                     "status": "running"})
    search.on_trial_complete("t", {"val_accuracy": 0.45, "epochs_done": 4, "status": "running"})
    trial = stored(tmp_path)["t"]
    assert trial.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.45}
    assert trial.state.name == "COMPLETE" and trial.value == 0.45


def test_two_objectives_are_told_together_and_epochs_kept_as_an_attribute(tmp_path) -> None:
    """Optuna stores no intermediate values for several objectives: each epoch's accuracy is
    kept in the trial's user attribute; a finished trial is told accuracy and MACs."""
    search = StudySearch(space=space, metric=["val_accuracy", "macs"], mode=["max", "min"],
                         sampler=optuna.samplers.TPESampler(seed=0),
                         storage=storage_url(tmp_path), study_name="s", max_epochs=EPOCHS)
    for trial_id in ("done", "cut", "inf", "lost"):
        search.suggest(trial_id)
    for trial_id, values in (("done", [0.2, 0.4, 0.5, 0.6]), ("cut", [0.1, 0.25])):
        result: dict[str, Any] = {}
        for epoch, value in enumerate(values, start=1):
            result = {"val_accuracy": value, "macs": 1000, "epochs_done": epoch,
                      "status": "running"}
            search.on_trial_result(trial_id, result)
        search.on_trial_complete(trial_id, result)
    search.on_trial_complete("inf", {"val_accuracy": 0.0, "epochs_done": 0,
                                     "status": "infeasible"})  # no MACs: never built
    search.on_trial_complete("lost", {"val_accuracy": 0.7, "epochs_done": EPOCHS,
                                      "status": "running"})  # no MACs reported: not made up
    study = optuna.load_study(study_name="s", storage=storage_url(tmp_path))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = stored(tmp_path)
    assert trials["done"].state.name == "COMPLETE" and trials["done"].values == [0.6, 1000.0]
    assert trials["done"].user_attrs["intermediate_val_accuracy"] == {
        "1": 0.2, "2": 0.4, "3": 0.5, "4": 0.6}
    assert trials["cut"].state.name == "PRUNED"
    assert trials["cut"].user_attrs["intermediate_val_accuracy"] == {"1": 0.1, "2": 0.25}
    assert trials["inf"].state.name == "COMPLETE" and trials["inf"].values == [0.0, math.inf]
    assert trials["lost"].state.name == "FAIL"
    search.suggest("next")  # the multi-objective sampler reads these trials without error
