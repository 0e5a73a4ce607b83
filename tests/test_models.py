"""From a search to a model in use: logged MLflow models, the registry, fine-tuning at another
resolution and evaluation at several sizes. Real Ray, Optuna, TorchTrainer and an MLflow server
over HTTP; the bundled MNIST sample, so the fine-tune's before/after is measured on real images.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from coatnet.search.checkpoints import load_state
from coatnet.search.runner import SearchOptions, run_search
from coatnet.search.tracking.models import build_coatnet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SPACE = """\
data:
  dataset: mnist5k
  image_size: 32
  val_fraction: 0.2
  test_fraction: 0.2
trial:
  epochs: 2
  max_failures: 0
search:
  objectives:
    - {metric: val_accuracy, mode: max}
    - {metric: macs, mode: min}
  latency: {batch_size: 1, threads: 1, warmup: 1, repeats: 3}
  num_samples: 2
  max_concurrent_trials: 1
  seed: 0
  searcher: random
model:
  layout: CCTT
  depth: {s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}
  channels:
    s0: 16
    s1: 16
    s2: {type: categorical, choices: [32, 48]}
    s3: 64
    s4: 64
  expand_scale: 2
  head_dim: 16
  path_dropout: 0.0
train:
  lr: 0.003
  weight_decay: 0.01
  label_smoothing: 0.0
  batch_size: 64
  warmup_epochs: 0
"""

# Run in a fresh interpreter: load the registered model with MLflow alone, run it, save logits.
_LOAD = """\
import sys, torch, mlflow.pytorch
model = mlflow.pytorch.load_model(sys.argv[1])
images = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(images), sys.argv[3])
assert not any(name == "coatnet" or name.startswith("coatnet.") for name in sys.modules), \\
    "loading the model imported this project"
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory, mlflow_server, ray_local):
    directory = tmp_path_factory.mktemp("models")
    space = directory / "mnist.yaml"
    space.write_text(SPACE)
    outcome = run_search(SearchOptions(space=space, storage_path=str(directory / "runs"),
                                       mlflow_uri=mlflow_server, name="models",
                                       experiment_name="e2e-models",
                                       register_model="e2e-best"))
    return outcome, mlflow_server


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli",
                                                  REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _children(client: MlflowClient, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_the_registered_model_loads_in_a_fresh_process_with_the_checkpoints_logits(
        searched, tmp_path: Path) -> None:
    outcome, uri = searched
    assert outcome.registered_model_uri == "models:/e2e-best/1"
    state = load_state(outcome.best_checkpoint)
    direct = build_coatnet({"candidate": {"model": state["model_config"]}}, state["model"])
    images = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-c", _LOAD, outcome.registered_model_uri,
                           str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        expected = direct(images)
    assert logits.shape == (5, 10)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0), \
        (logits - expected).abs().max()


def test_register_model_makes_a_version_of_the_best_model(searched) -> None:
    outcome, uri = searched
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'e2e-best'")
    assert [v.version for v in versions] == ["1"]
    version = versions[0]
    assert version.source == outcome.best_model_uri
    best = outcome.rows[0]
    assert version.tags["tune_trial_id"] == best.trial_id
    assert version.tags["parent_run_id"] == outcome.parent_run_id
    runs = {r.data.tags["tune_trial_id"]: r.info.run_id
            for r in _children(client, outcome.parent_run_id)}
    assert version.run_id == runs[best.trial_id]


def test_the_best_and_every_front_member_are_logged_models_on_their_trial_runs(
        searched) -> None:
    outcome, uri = searched
    client = MlflowClient(uri)
    runs = {r.info.run_id: r.data.tags["tune_trial_id"]
            for r in _children(client, outcome.parent_run_id)}
    experiment_id = client.get_run(outcome.parent_run_id).info.experiment_id
    models = client.search_logged_models([experiment_id])
    logged = {runs[m.source_run_id]: m for m in models if m.source_run_id in runs}
    assert set(logged) == {r.trial_id for r in outcome.front} | {outcome.rows[0].trial_id}
    for trial_id, model in logged.items():
        row = next(r for r in outcome.rows if r.trial_id == trial_id)
        assert model.tags["coatnet.role"] == ("best" if row is outcome.rows[0] else "front")
        assert model.params["candidate.hparams.lr"] == "0.003"  # the run's params, linked
        linked = {m.key for m in model.metrics or []}
        assert "val_accuracy" in linked  # the metrics of the checkpoint's epoch


def test_finetune_from_32_to_48_px_beats_the_interpolated_source(searched, capsys) -> None:
    outcome, uri = searched
    code = _cli("finetune").main(["--from", str(outcome.experiment_dir), "--image-size", "48",
                                  "--epochs", "2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    client = MlflowClient(uri)
    tuned = [r for r in _children(client, outcome.parent_run_id)
             if r.data.tags.get("stage") == "finetune"]
    assert len(tuned) == 1
    run = tuned[0]
    best = outcome.rows[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["source_trial_id"] == best.trial_id
    assert (run.data.tags["image_size_from"], run.data.tags["image_size_to"]) == ("32", "48")
    metrics = run.data.metrics
    assert metrics["source_val_accuracy"] == pytest.approx(best.best_value)
    assert metrics["after_val_accuracy"] >= metrics["before_val_accuracy"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/before.json", "evaluation/after.json"}
    assert any(a.path == "checkpoint/checkpoint.pt"
               for a in client.list_artifacts(run.info.run_id, "checkpoint"))
    # the logged model is the fine-tuned one: built for 48 px, its tables stored at that size
    from coatnet.search.tracking.models import load_coatnet, logged_model_uri

    loaded = load_coatnet(logged_model_uri(tracking_uri=uri, run_id=run.info.run_id),
                          tracking_uri=uri)
    assert loaded.model.config.image_height == 48
    tables = [m.relative_bias_table.shape[-2:] for m in loaded.model.relative_attentions()]
    assert tables and set(tables) <= {torch.Size([5, 5]), torch.Size([3, 3])}  # 3x3, 2x2 maps
    assert "before:" in printed.out and "after:" in printed.out


def test_evaluate_at_three_sizes_records_a_row_per_size(searched, capsys) -> None:
    outcome, uri = searched
    code = _cli("evaluate").main(["--model", outcome.registered_model_uri, "--image-sizes",
                                  "32,48,64", "--mlflow-uri", uri])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    for size in ("32px", "48px", "64px"):
        assert size in printed.out
    version = MlflowClient(uri).get_model_version("e2e-best", "1")
    path = MlflowClient(uri).download_artifacts(version.run_id, "evaluation/image_sizes.json")
    table = json.loads(Path(path).read_text())
    sizes = table["columns"].index("image_size")
    assert [row[sizes] for row in table["data"]] == [32, 48, 64]
    accuracy = table["columns"].index("val_accuracy")
    trained = next(row for row in table["data"] if row[sizes] == 32)
    assert trained[accuracy] == pytest.approx(outcome.rows[0].best_value)


def test_bad_finetune_input_is_refused_before_anything_trains(searched, tmp_path: Path,
                                                              capsys) -> None:
    outcome, uri = searched
    finetune = _cli("finetune")
    client = MlflowClient(uri)
    before = len(_children(client, outcome.parent_run_id))

    def refused(*args: str) -> str:
        code = finetune.main(list(args))
        err = capsys.readouterr().err
        assert code == 2, err
        return err

    assert "not a trial run" in refused("--from", outcome.parent_run_id, "--image-size", "48",
                                        "--mlflow-uri", uri)
    assert "--image-size=16" in refused("--from", str(outcome.experiment_dir),
                                        "--image-size", "16")
    assert "no such trial" in refused("--from", str(outcome.experiment_dir), "--trial", "nope",
                                      "--image-size", "48")
    # the trial's checkpoint is gone (moved, cleaned up): named, nothing trains
    copy = tmp_path / "moved"
    copy.mkdir()
    for name in ("search_state.json", "leaderboard.csv"):
        shutil.copy(outcome.experiment_dir / name, copy / name)
    best = outcome.rows[0].trial_id
    (copy / f"trial_{best}").mkdir()
    shutil.copy(outcome.experiment_dir / f"trial_{best}" / "params.json",
                copy / f"trial_{best}" / "params.json")
    rows = list(csv.DictReader((copy / "leaderboard.csv").open()))
    for row in rows:
        row["checkpoint"] = str(copy / f"trial_{row['trial_id']}" / "checkpoint_000001")
    with (copy / "leaderboard.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert "missing" in refused("--from", str(copy), "--image-size", "48")
    assert not (copy / "finetune").exists()
    assert len(_children(client, outcome.parent_run_id)) == before  # no run was started
