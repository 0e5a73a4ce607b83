"""An accuracy-versus-MACs search end to end: real Ray Tune + Optuna (multi-objective TPE) +
``ParetoASHA`` + TorchTrainer, a real MLflow server; the front is checked independently.

Trials run one at a time, as in ``test_search_e2e.py``, so the seeded sampler fixes their order.
The search itself is the session fixture ``pareto_search`` (``conftest.py``), which the browser
tests look at too.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from coatnet import CoAtNetConfig
from coatnet.search.figures import FIGURE_FILES
from coatnet.search.searcher import (INTERMEDIATE_ATTR_PREFIX, START_ATTR, search_trials,
                                     storage_url)
from coatnet.search.tracking.views import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND,
                                           PRIMARY_METRIC_TAG, VIEW_KEY, VIEW_TAG_PREFIX)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SPACE = """\
data:
  dataset: synthetic
  image_size: 32
  num_samples: 192
  num_classes: 4
  image_channel: 3
trial:
  epochs: 3
  max_failures: 0
search:
  objectives:
    - {metric: val_accuracy, mode: max}
    - {metric: macs, mode: min}
  latency: {batch_size: 2, threads: 1, warmup: 1, repeats: 3}
  num_samples: 8
  max_concurrent_trials: 1
  seed: 1
  searcher: tpe
  n_startup_trials: 4
  asha: {grace_period: 1, reduction_factor: 2}
model:
  layout: {type: categorical, choices: [CCTT, CCCC]}
  depth: {s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}
  channels:
    s0: 8
    s1: {type: categorical, choices: [8, 16]}
    s2: 16
    s3: {type: categorical, choices: [16, 32]}
    s4: 32
  expand_scale: 2
  head_dim: 16
  path_dropout: 0.0
train:
  lr: {type: categorical, choices: [1.0e-4, 0.01]}
  weight_decay: 0.01
  label_smoothing: 0.0
  batch_size: 16
  warmup_epochs: 0
"""


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, macs): ``a`` at least as accurate and as cheap, better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def test_the_front_is_the_non_dominated_set_of_completed_trials(pareto_search) -> None:
    outcome, _ = pareto_search
    done = [r for r in outcome.rows if r.status == "completed"]
    assert len(done) >= 2
    point = {r.trial_id: (r.best_value, float(r.macs)) for r in done}
    front = {r.trial_id for r in outcome.front}
    assert front and front <= set(point)
    for a in front:  # mutually non-dominated
        assert not any(_dominates(point[b], point[a]) for b in front if b != a), a
    for other in set(point) - front:  # every other completed trial is dominated by the front
        assert any(_dominates(point[f], point[other]) for f in front), other
    assert {r.trial_id for r in outcome.rows if r.on_front} == front
    with (outcome.experiment_dir / "leaderboard.csv").open() as handle:
        marked = {r["trial_id"] for r in csv.DictReader(handle) if r["on_front"] == "True"}
    assert marked == front
    with outcome.pareto_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["trial_id"] for r in rows} == front
    macs = [float(r["macs"]) for r in rows]
    assert macs == sorted(macs)  # cheapest first
    for row in rows:  # every member was evaluated on the held-out test split
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        config = CoAtNetConfig.from_yaml(row["config"])
        assert config.num_channels_in_layers
    best = yaml.safe_load((outcome.experiment_dir / "best_config.yaml").read_text())
    assert best["result"]["trial_id"] == max(outcome.front, key=lambda r: r.best_value).trial_id
    assert outcome.hypervolume and outcome.hypervolume > 0
    assert outcome.pareto_plot is not None and outcome.pareto_plot.stat().st_size > 10_000


def test_latency_is_measured_once_per_candidate_and_logged_with_the_device(pareto_search):
    outcome, uri = pareto_search
    client = MlflowClient(uri)
    runs = {r.data.tags["tune_trial_id"]: r for r in _children(client, outcome.parent_run_id)}
    trained = [r for r in outcome.rows if r.status in ("completed", "early-stopped")]
    assert trained
    for row in trained:
        assert row.latency_ms is not None and row.latency_ms > 0, row.trial_id
        assert row.latency_device and row.latency_device.startswith("cpu:"), row.latency_device
        run = runs[row.trial_id]
        assert run.data.tags["latency_device"] == row.latency_device
        history = client.get_metric_history(run.info.run_id, "latency_ms")
        assert len(history) == row.epochs_done  # in every epoch's report...
        assert {m.value for m in history} == {row.latency_ms}  # ...the one measurement


def test_the_stored_study_has_two_directions_and_two_values(pareto_search) -> None:
    outcome, _ = pareto_search
    study = optuna.load_study(study_name="front", storage=storage_url(outcome.experiment_dir))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = {t.user_attrs["tune_trial_id"]: t for t in search_trials(study)}
    rows = {r.trial_id: r for r in outcome.rows}
    assert sorted(trials) == sorted(rows)
    key = f"{INTERMEDIATE_ATTR_PREFIX}val_accuracy"
    for trial_id, trial in trials.items():
        row = rows[trial_id]
        if row.status == "completed":
            assert trial.state.name == "COMPLETE"
            assert len(trial.values) == 2
            assert math.isclose(trial.values[1], row.macs)
        elif row.status == "early-stopped":
            assert trial.state.name == "PRUNED"
        if row.status in ("completed", "early-stopped"):  # every epoch's value is kept
            assert sorted(int(s) for s in trial.user_attrs[key]) == \
                list(range(1, row.epochs_done + 1))
    # the random start (4 startup trials) went along the cost axis, cheapest first
    ordered = sorted(search_trials(study), key=lambda t: t.number)
    start = [t for t in ordered if t.user_attrs.get(START_ATTR)]
    assert start == ordered[:4]
    macs = [rows[t.user_attrs["tune_trial_id"]].macs for t in start]
    assert macs == sorted(macs) and macs[0] < macs[-1]


def test_the_parent_run_holds_the_front(pareto_search) -> None:
    outcome, uri = pareto_search
    client = MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id)
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"pareto.csv", "pareto.png", "pareto", "leaderboard.csv"} <= names
    configs = {a.path for a in client.list_artifacts(outcome.parent_run_id, "pareto")}
    assert configs == {f"pareto/{r.trial_id}.yaml" for r in outcome.front}
    assert math.isclose(parent.data.metrics["hypervolume"], outcome.hypervolume)
    history = client.get_metric_history(outcome.parent_run_id, "hypervolume")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) >= len(outcome.rows)  # one per finished trial
    assert values == sorted(values)  # a front only grows
    assert parent.data.tags["pareto.objectives"] == "val_accuracy:max,macs:min"
    tagged = {r.data.tags["tune_trial_id"] for r in _children(client, outcome.parent_run_id)
              if r.data.tags.get("pareto_front") == "true"}
    assert tagged == {r.trial_id for r in outcome.front}


def test_a_bad_pick_rule_exits_2_before_anything_starts(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    space = tmp_path / "pareto.yaml"
    space.write_text(SPACE)
    monkeypatch.chdir(tmp_path)
    cli = _load_cli()
    code = cli.main(["--space", str(space), "--pick", "test_accuracy>=0.9", "--storage-path",
                     str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--pick" in err and "macs" in err  # names the allowed metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.yaml"]  # nothing created


def _load_cli():
    spec = importlib.util.spec_from_file_location("search_cli",
                                                  REPO / "experiments" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _children(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_the_parent_run_holds_the_figures_read_back_over_http(pareto_search) -> None:
    outcome, uri = pareto_search
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id, "figures")}
    expected = {f"figures/{name}" for name in FIGURE_FILES.values()}
    assert expected <= names, names
    local = client.download_artifacts(outcome.parent_run_id, "figures/parallel_coordinates.png")
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in outcome.figures} == set(FIGURE_FILES.values())


def test_the_experiment_opens_in_the_trials_view(pareto_search) -> None:
    outcome, uri = pareto_search
    client = MlflowClient(uri)
    experiment = client.get_experiment(client.get_run(outcome.parent_run_id).info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert experiment.tags[PRIMARY_METRIC_TAG] == "best_val_accuracy"
    envelope = json.loads(experiment.tags[VIEW_TAG_PREFIX + VIEW_KEY])
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`best_val_accuracy`" and not state["orderByAsc"]
    sampled = ["model.layout", "model.channels.s1", "model.channels.s3", "train.lr"]
    assert [c for c in state["selectedColumns"] if c.startswith("params.")] == \
        [f"params.`{name}`" for name in sampled]
    parallel = [c for c in state["compareRunCharts"] if c["type"] == "PARALLEL"]
    assert parallel and parallel[0]["selectedParams"] == sampled
    for run in _children(client, outcome.parent_run_id):  # what the columns read
        assert set(sampled) <= set(run.data.params), run.data.params
