"""End-to-end searches: real Ray Tune + Optuna + ASHA + TorchTrainer, a real MLflow server.

The space is tiny (synthetic data, 32 px, a few epochs) so the whole module stays within a few
minutes on 2 cores. Its trials run one at a time: ASHA's verdict depends on the order in which
trials reach a rung, and with concurrent trials that order is a race. One at a time, the seeded
sampler fixes the order (lr 0.01 first, then 1e-5), and the 1e-5 trial, far behind at rung 1,
is cut on every machine.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from coatnet import CoAtNetConfig, CoAtNetWithLinearClassifier
from coatnet.search.runner import SearchOptions, run_search
from coatnet.search.searcher import search_trials, storage_url

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_SPACE = """\
data:
  dataset: synthetic
  image_size: 32
  num_samples: 192
  num_classes: 4
  image_channel: 3
trial:
  epochs: 4
  max_failures: 0
search:
  num_samples: {num_samples}
  max_concurrent_trials: 1  # see the module docstring
  seed: 3
  searcher: random
  asha: {{grace_period: 1, reduction_factor: 2}}
constraints:
  max_params: 1.5e5
model:
  layout: {{type: categorical, choices: [CCTT, CCCC]}}
  depth: {{s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}}
  channels:
    s0: 8
    s1: 16
    s2: 16
    s3: 32
    s4: {{type: categorical, choices: [32, 256]}}
  expand_scale: 2
  head_dim: 16
  path_dropout: 0.0
train:
  lr: {{type: categorical, choices: [1.0e-5, 0.01, 1.0e+30]}}  # 1e-5 barely learns, 1e30 diverges
  weight_decay: 0.01
  label_smoothing: 0.0
  batch_size: 16
  warmup_epochs: 0
"""


def write_space(directory: Path, *, num_samples: int) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(TINY_SPACE.format(num_samples=num_samples))
    return path


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, mlflow_server, ray_local):
    directory = tmp_path_factory.mktemp("search")
    space = write_space(directory, num_samples=8)
    outcome = run_search(SearchOptions(space=space, storage_path=str(directory / "runs"),
                                       mlflow_uri=mlflow_server, name="tiny",
                                       experiment_name="e2e-tiny"))
    return outcome, mlflow_server


def test_every_trial_is_accounted_for(finished_search) -> None:
    outcome, _ = finished_search
    assert len(outcome.rows) == 8
    assert sum(outcome.status_counts.values()) == 8
    assert outcome.status_counts["early-stopped"] >= 1  # ASHA cut at least one trial
    assert outcome.status_counts["completed"] >= 1
    assert outcome.status_counts["failed"] == 0


def test_a_diverging_trial_ends_as_diverged_and_the_others_finish(finished_search) -> None:
    outcome, _ = finished_search
    feasible = [r for r in outcome.rows if r.status != "infeasible"]
    diverged = [r for r in feasible if r.candidate.hparams.lr == 1e30]
    assert diverged, "seed 3 samples lr=1e30 for a feasible candidate"
    for row in diverged:
        assert row.status == "diverged" and row.best_value is None
        assert row.epochs_done == 1  # ended at once, in the first epoch
    sane = [r for r in feasible if r.candidate.hparams.lr < 1]
    assert sane and all(r.status in ("completed", "early-stopped") for r in sane)
    assert all(r.best_value is not None and 0 <= r.best_value <= 1 for r in sane)


def test_infeasible_candidates_never_train(finished_search) -> None:
    outcome, _ = finished_search
    infeasible = [r for r in outcome.rows if r.status == "infeasible"]
    assert infeasible, "the space's s4=256 choice is over max_params; some samples must hit it"
    for row in infeasible:
        assert row.candidate.model["num_channels_in_layers"][4] == 256
        assert "params" in row.candidate.infeasible_reason
        assert row.epochs_done == 0 and row.checkpoint is None
        trial_dir = outcome.experiment_dir / f"trial_{row.trial_id}"
        assert not list(trial_dir.glob("checkpoint_*"))
    feasible = [r for r in outcome.rows if r.status != "infeasible"]
    assert all(r.candidate.model["num_channels_in_layers"][4] == 32 for r in feasible)


def test_mlflow_has_one_parent_and_a_nested_child_per_trial(finished_search) -> None:
    outcome, uri = finished_search
    client = MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_total"] == 8
    assert parent.data.metrics["trials_infeasible"] == outcome.status_counts["infeasible"]
    children = child_runs(client, outcome.parent_run_id)
    assert len(children) == 8
    by_trial = {run.data.tags["tune_trial_id"]: run for run in children}
    for row in outcome.rows:
        run = by_trial[row.trial_id]
        assert run.info.status == "FINISHED"
        assert run.data.tags["status"] == row.status
        assert run.data.params["candidate.hparams.lr"] in ("1e-05", "0.01", "1e+30")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        steps = [m.step for m in history]
        if row.status == "infeasible":
            assert steps in ([], [0])
        else:
            assert steps == list(range(1, row.epochs_done + 1))  # one value per epoch, no dupes
            if row.status == "diverged":  # its 1e6 loss stand-ins stay out of the charts
                assert "val_loss" not in run.data.metrics
            else:
                assert run.data.metrics["best_val_accuracy"] == pytest.approx(row.best_value)
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"leaderboard.csv", "best_config.yaml"} <= artifacts
    # the leaderboard as an MLflow table (one row per trial) and an experiment that MLflow's
    # UI opens on its training runs
    table = json.loads(Path(client.download_artifacts(outcome.parent_run_id,
                                                      "tables/leaderboard.json")).read_text())
    ids = table["columns"].index("trial_id")
    assert [row[ids] for row in table["data"]] == [r.trial_id for r in outcome.rows]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the dataset is every run's input (the UI's Dataset column), with its split sizes
    digests = set()
    for run in [client.get_run(outcome.parent_run_id)] + children:
        (dataset_input,) = run.inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert dataset.name == "synthetic"
        assert json.loads(dataset.profile)["num_val"] > 0
        digests.add(dataset.digest)
    assert len(digests) == 1


def test_results_files_rebuild_the_best_model(finished_search) -> None:
    outcome, _ = finished_search
    lines = outcome.leaderboard_csv.read_text().strip().splitlines()
    assert len(lines) == 1 + 8
    best = outcome.rows[0]
    assert best.best_value == max(r.best_value for r in outcome.rows if r.best_value is not None)
    config = CoAtNetConfig.from_yaml(outcome.best_config_yaml)
    model = CoAtNetWithLinearClassifier(config).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert outcome.best_checkpoint and Path(outcome.best_checkpoint).is_dir()


def test_the_stored_study_tells_how_each_trial_really_ended(finished_search) -> None:
    """One Optuna trial per Tune trial; ASHA's cuts are PRUNED with their intermediate values,
    the NaN (lr 1e30) trial FAIL, none RUNNING; each carries its MLflow run id."""
    outcome, uri = finished_search
    study = optuna.load_study(study_name="tiny", storage=storage_url(outcome.experiment_dir))
    assert study.user_attrs.get("orphaned_trials", []) == []  # nothing was killed
    trials = {t.user_attrs["tune_trial_id"]: t for t in search_trials(study)}
    assert sorted(trials) == sorted(r.trial_id for r in outcome.rows)
    states = Counter(t.state.name for t in trials.values())
    counts = outcome.status_counts
    assert states["COMPLETE"] == counts["completed"] + counts["infeasible"]
    assert states["PRUNED"] == counts["early-stopped"] >= 1
    assert states["FAIL"] == counts["diverged"] + counts["failed"] >= 1
    assert states["RUNNING"] == 0
    runs = {r.data.tags["tune_trial_id"]: r.info.run_id
            for r in child_runs(MlflowClient(uri), outcome.parent_run_id)}
    assert any("mlflow_run_id" in trials[r.trial_id].user_attrs for r in outcome.rows
               if r.status == "completed")
    for row in outcome.rows:
        trial = trials[row.trial_id]
        # set when the trial ends if the tracker has recorded its run by then (a trial that
        # ends at once, infeasible or diverged, may end first)
        if "mlflow_run_id" in trial.user_attrs:
            assert trial.user_attrs["mlflow_run_id"] == runs[row.trial_id]
        if row.status in ("completed", "early-stopped"):
            assert sorted(trial.intermediate_values) == list(range(1, row.epochs_done + 1))
            assert max(trial.intermediate_values.values()) == pytest.approx(row.best_value)
        if row.status == "completed":
            assert trial.value == pytest.approx(trial.intermediate_values[row.epochs_done])


def test_the_winner_is_reported_on_the_held_out_test_split(finished_search) -> None:
    outcome, uri = finished_search
    best = outcome.rows[0]
    assert best.test_accuracy is not None and 0.0 <= best.test_accuracy <= 1.0
    assert outcome.best_test_accuracy == best.test_accuracy
    assert all(r.test_accuracy is None for r in outcome.rows[1:])  # only the winner
    with outcome.leaderboard_csv.open() as handle:
        first = next(csv.DictReader(handle))
    assert float(first["test_accuracy"]) == pytest.approx(best.test_accuracy)
    client = MlflowClient(uri)
    assert client.get_run(outcome.parent_run_id).data.metrics["best_test_accuracy"] == \
        pytest.approx(best.test_accuracy)
    runs = {r.data.tags["tune_trial_id"]: r for r in child_runs(client, outcome.parent_run_id)}
    assert runs[best.trial_id].data.metrics["test_accuracy"] == pytest.approx(best.test_accuracy)
    assert all("test_accuracy" not in r.data.metrics
               for t, r in runs.items() if t != best.trial_id)
    # the figure is the checkpoint's accuracy on the test split, recomputed here
    from coatnet.search.evaluation import held_out_accuracy
    from coatnet.search.space import load_space

    space = load_space(outcome.experiment_dir.parent.parent / "tiny.yaml")
    again = held_out_accuracy(checkpoint=best.checkpoint, data=space.data.model_dump(),
                              seed=space.search.seed)
    assert again == pytest.approx(best.test_accuracy)


def test_bad_space_exits_2_and_creates_nothing(tmp_path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(TINY_SPACE.format(num_samples=0).replace("image_size: 32", "image_size: 8"))
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "search.py"),
                           "--space", str(space)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.image_size" in proc.stderr and "search.num_samples" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no runs, no mlflow.db


def test_resume_flag_without_an_experiment_is_refused(tmp_path) -> None:
    space = write_space(tmp_path, num_samples=2)
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "search.py"),
                           "--space", str(space), "--resume", "--name", "nope"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is not a search experiment" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_unreachable_mlflow_fails_fast(tmp_path) -> None:
    from conftest import free_port

    space = write_space(tmp_path, num_samples=2)
    uri = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "search.py"),
                           "--space", str(space), "--mlflow-uri", uri],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert uri in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]



@pytest.mark.parametrize("flag, field", [("--num-samples", "num_samples"),
                                         ("--max-concurrent-trials", "max_concurrent_trials")])
def test_bad_count_overrides_name_the_flag(tmp_path, flag: str, field: str) -> None:
    from coatnet.search.runner import SearchInputError, plan_search

    space = write_space(tmp_path, num_samples=2)
    with pytest.raises(SearchInputError, match=f"{flag}=0: must be a positive integer"):
        plan_search(SearchOptions(space=space, storage_path=str(tmp_path / "runs"),
                                  **{field: 0}))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("options, message", [
    ({"log_models": "all"}, "--log-models='all': must be one of front, best, none"),
    ({"register_model": "a/b"}, "--register-model='a/b': use letters"),
    ({"register_model": "best", "log_models": "none"}, "--register-model needs a logged model"),
])
def test_bad_model_options_are_refused_before_anything_starts(tmp_path, options: dict,
                                                              message: str) -> None:
    from coatnet.search.runner import SearchInputError, plan_search

    space = write_space(tmp_path, num_samples=2)
    with pytest.raises(SearchInputError) as err:
        plan_search(SearchOptions(space=space, storage_path=str(tmp_path / "runs"), **options))
    assert message in str(err.value)
    assert not (tmp_path / "runs").exists()
