"""What a finished search adds to MLflow besides statuses: the held-out test figures, the
Pareto front, the pictures of the sweep, the leaderboard as an MLflow table and the dataset as
every run's input."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from coatnet.search.tracking.mlflow_ops import search_trial_ids
from coatnet.search.tracking.params import chunks, finite_number, now_ms

__all__ = ["FIGURES_ARTIFACT_DIR", "LEADERBOARD_TABLE", "dataset_record", "log_dataset",
           "log_figures", "log_front", "log_leaderboard_table", "log_test_accuracy"]

LEADERBOARD_TABLE = "tables/leaderboard.json"
FIGURES_ARTIFACT_DIR = "figures"


def log_figures(client: MlflowClient, run_id: str, paths: Iterable[str]) -> None:
    """The search's figures (``coatnet.search.figures``) under ``figures/`` on the parent run;
    a later finish (a resume) logs the redrawn files over the old ones."""
    for path in paths:
        if Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path=FIGURES_ARTIFACT_DIR)


def log_test_accuracy(*, tracking_uri: str, parent_run_id: str,
                      test_accuracy: dict[str, float], best_trial_id: str | None) -> None:
    """The held-out test figures: ``test_accuracy`` on each evaluated trial's child run, and
    the winner's as ``best_test_accuracy`` on the parent."""
    if not test_accuracy:
        return
    client = MlflowClient(tracking_uri)
    now = now_ms()
    runs = search_trial_ids(tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    for trial_id, value in test_accuracy.items():
        for run_id in runs.get(trial_id, []):
            client.log_batch(run_id, metrics=[Metric("test_accuracy", float(value), now, 0)])
    if best_trial_id in test_accuracy:
        client.log_batch(parent_run_id, metrics=[
            Metric("best_test_accuracy", float(test_accuracy[best_trial_id]), now, 0)])


def log_front(*, tracking_uri: str, parent_run_id: str, front: dict[str, Any]) -> None:
    """The Pareto front of a search with several objectives, on the parent run: ``pareto.csv``,
    ``pareto.png`` and the members' configs (``pareto/``) as artifacts, the ``hypervolume``
    metric with its history (step k: after the k-th finished trial), the reference
    point and objectives as tags; each member's child run is tagged ``pareto_front = true``."""
    client = MlflowClient(tracking_uri)
    now = now_ms()
    history = [(int(k), float(v)) for k, v in front.get("history") or []]
    # one metric: its history is the front's growth, its latest value the final hypervolume
    metrics = [Metric("hypervolume", v, now, k) for k, v in history
               if finite_number(v) is not None]
    final = finite_number(front.get("hypervolume"))
    if final is not None and (not history or history[-1][1] != final):
        metrics.append(Metric("hypervolume", final, now + 1, len(history)))
    metrics.append(Metric("pareto_front_size", float(len(front.get("members") or [])), now, 0))
    for batch in chunks(metrics, 1000):
        client.log_batch(parent_run_id, metrics=batch)
    # tags, not params: a resumed search's front (and its reference point) may change
    client.set_tag(parent_run_id, "pareto.reference",
                   ",".join(f"{v:g}" for v in front.get("reference") or []))
    client.set_tag(parent_run_id, "pareto.objectives", ",".join(front.get("objectives") or []))
    for key in ("pareto_csv", "plot"):
        path = front.get(key)
        if path and Path(path).exists():
            client.log_artifact(parent_run_id, str(path))
    for path in front.get("configs") or []:
        if Path(path).exists():
            client.log_artifact(parent_run_id, str(path), artifact_path="pareto")
    members = set(front.get("members") or [])
    for trial_id, run_ids in search_trial_ids(tracking_uri=tracking_uri,
                                              parent_run_id=parent_run_id).items():
        for run_id in run_ids:
            client.set_tag(run_id, "pareto_front", str(trial_id in members).lower())


def log_leaderboard_table(client: MlflowClient, run_id: str, leaderboard_csv: Path) -> None:
    """The leaderboard as an MLflow table (the run's Artifacts and the Evaluation views read
    it). ``log_table`` appends to an existing file, so a later finish of the same search (a
    resume) writes its own file, stamped, instead of doubling the rows."""
    with leaderboard_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    # ids stay text: a hex trial id such as 1e30ab12 reads as a number
    columns = {key: [row[key] if key == "trial_id" else _cell(row[key]) for row in rows]
               for key in rows[0]}
    existing = {a.path for a in client.list_artifacts(run_id, "tables")}
    name = LEADERBOARD_TABLE if LEADERBOARD_TABLE not in existing else \
        f"tables/leaderboard-{time.strftime('%Y%m%d-%H%M%S')}.json"
    client.log_table(run_id, data=columns, artifact_file=name)


def _cell(text: str) -> Any:
    """A CSV cell as a number when it is one (so the table sorts numerically)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def dataset_record(data: Mapping[str, Any], *, seed: int, info: Mapping[str, int]) -> dict:
    """What ``log_dataset`` logs: the data section's name, a digest of what defines the splits
    (settings and seed; paths left out, so a moved dataset keeps its digest) and the sizes."""
    defining = {k: v for k, v in sorted(data.items())
                if k not in ("data_dir", "cache_dir", "path", "download") and v is not None}
    digest = hashlib.sha256(json.dumps({"data": defining, "seed": seed}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    return {"name": str(data.get("dataset")), "digest": digest,
            "source": {**defining, "seed": seed}, "profile": dict(info)}


def log_dataset(client: MlflowClient, run_ids: Iterable[str], dataset: Mapping[str, Any],
                ) -> None:
    """The search's dataset as an MLflow dataset input of each run (the UI's Dataset column);
    logging the same dataset to a run again is harmless."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(name=dataset["name"], digest=dataset["digest"], source_type="code",
                     source=json.dumps(dataset["source"], default=str),
                     profile=json.dumps(dataset["profile"]))
    for run_id in run_ids:
        client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[
            InputTag("mlflow.data.context", "train/validation/test")])])
