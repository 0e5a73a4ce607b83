"""Where a trained trial comes from: a finished search's directory, or MLflow.

``resolve_trial`` turns what a user passes to ``experiments/finetune.py --from`` or
``experiments/evaluate.py --model`` into a ``TrialSource``: the weights, the settings that
trained them (the Tune trial config: candidate, data and trial settings, seed) and where its
search lives in MLflow. Accepted, in this order:

- an experiment directory (``ray_results/<name>``, with ``search_state.json``): the trial
  ``--trial ID``, else the most accurate one (the leaderboard's first with a checkpoint);
- a trial checkpoint directory (``.../trial_<id>/checkpoint_000007``);
- a local MLflow model directory, a ``models:/`` or ``runs:/`` URI (a model this tool logged);
- an MLflow run id: a trial's child run with a logged model (the best trial and the front).

Checkpoints load with ``weights_only=True``; MLflow models in the ``pt2`` format, which MLflow
refuses to load when it holds pickled payloads. Every problem is a ``SearchInputError`` raised
before anything trains.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coatnet.search.errors import SearchInputError

__all__ = ["TrialSource", "resolve_trial"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_TRIAL_KEYS = ("candidate", "data", "trial", "seed", "latency")


@dataclass(frozen=True)
class TrialSource:
    """A trained trial, ready to rebuild, evaluate or fine-tune."""

    trial_id: str
    trial: dict[str, Any]  # candidate (model, hparams, ...), data, trial, seed, latency
    state_dict: dict[str, Any] = field(repr=False)
    origin: str  # what the user passed
    checkpoint: str | None = None
    experiment_dir: Path | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    run_id: str | None = None  # the trial's MLflow run, when known

    @property
    def image_size(self) -> int:
        return int(self.trial["candidate"]["model"]["image_height"])

    def model(self) -> Any:
        """The trained ``CoAtNetWithLinearClassifier`` (eval mode)."""
        from coatnet.search.tracking.models import build_coatnet

        return build_coatnet(self.trial, self.state_dict)


def resolve_trial(origin: str, *, trial_id: str | None = None,
                  tracking_uri: str | None = None) -> TrialSource:
    """The trained trial ``origin`` names (see the module docstring)."""
    path = Path(origin).expanduser()
    if path.is_dir() and (path / "search_state.json").is_file():
        return _from_experiment(path.resolve(), trial_id=trial_id, origin=origin)
    if trial_id is not None:
        raise SearchInputError(f"--trial {trial_id}: only with an experiment directory; "
                               f"{origin} names one trial already")
    if path.is_dir() and (path / "checkpoint.pt").is_file():
        return _from_checkpoint(path.resolve(), origin=origin)
    if path.is_dir() and (path / "MLmodel").is_file() or origin.startswith(("models:/",
                                                                           "runs:/")):
        return _from_model(origin, tracking_uri=tracking_uri)
    if _RUN_ID.match(origin):
        return _from_run(origin, tracking_uri=tracking_uri)
    if path.exists():
        raise SearchInputError(f"{origin}: not an experiment directory (no search_state.json), "
                               "a trial checkpoint (no checkpoint.pt) or an MLflow model "
                               "directory (no MLmodel)")
    raise SearchInputError(f"{origin}: no such directory, and not a models:/ or runs:/ URI or "
                           "an MLflow run id (32 hex digits)")


def _from_experiment(directory: Path, *, trial_id: str | None, origin: str) -> TrialSource:
    leaderboard = directory / "leaderboard.csv"
    if not leaderboard.is_file():
        raise SearchInputError(f"{directory}: no leaderboard.csv: the search has not finished "
                               "(finish it with --resume first)")
    with leaderboard.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if trial_id is None:
        usable = [r for r in rows if r.get("checkpoint") and r.get("status") in (
            "completed", "early-stopped")]
        if not usable:
            raise SearchInputError(f"{directory}: no trial of this search has a checkpoint")
        row = usable[0]
    else:
        row = next((r for r in rows if r["trial_id"] == trial_id), None)
        if row is None:
            known = ", ".join(r["trial_id"] for r in rows[:10])
            raise SearchInputError(f"--trial {trial_id}: no such trial in {directory} (trials: "
                                   f"{known}{', ...' if len(rows) > 10 else ''})")
        if not row.get("checkpoint"):
            raise SearchInputError(f"--trial {trial_id}: the trial has no checkpoint (status "
                                   f"{row.get('status')}); pick a completed trial")
    state = json.loads((directory / "search_state.json").read_text())
    source = _from_checkpoint(Path(row["checkpoint"]), origin=origin, trial_id=row["trial_id"],
                              trial_dir=directory / f"trial_{row['trial_id']}")
    return dataclasses.replace(source, experiment_dir=directory,
                               tracking_uri=state.get("tracking_uri"),
                               parent_run_id=state.get("parent_run_id"))


def _from_checkpoint(directory: Path, *, origin: str, trial_id: str | None = None,
                     trial_dir: Path | None = None) -> TrialSource:
    from coatnet.search.checkpoints import CheckpointError, load_state

    trial_dir = trial_dir or directory.parent
    params = trial_dir / "params.json"
    if not params.is_file():
        raise SearchInputError(f"{directory}: no {params.name} in {trial_dir}, so the settings "
                               "that trained it are unknown; pass the experiment directory")
    if not (directory / "checkpoint.pt").is_file():
        raise SearchInputError(f"{origin}: the trial's checkpoint {directory} is missing (moved "
                               "or deleted)")
    try:
        state = load_state(directory)
    except CheckpointError as err:
        raise SearchInputError(f"{origin}: unusable checkpoint: {err}") from None
    config = json.loads(params.read_text())
    trial_id = trial_id or trial_dir.name.removeprefix("trial_")
    trial = {"trial_id": trial_id, **{k: config.get(k) for k in _TRIAL_KEYS}}
    trial["candidate"] = {**trial["candidate"], "model": dict(state["model_config"])}
    experiment_dir = trial_dir.parent
    tracking = {}
    if (experiment_dir / "search_state.json").is_file():
        saved = json.loads((experiment_dir / "search_state.json").read_text())
        tracking = {"experiment_dir": experiment_dir,
                    "tracking_uri": saved.get("tracking_uri"),
                    "parent_run_id": saved.get("parent_run_id")}
    return TrialSource(trial_id=trial_id, trial=trial, state_dict=state["model"], origin=origin,
                       checkpoint=str(directory), **tracking)


def _from_model(uri: str, *, tracking_uri: str | None) -> TrialSource:
    from mlflow.exceptions import MlflowException

    from coatnet.search.tracking.models import load_coatnet

    try:
        loaded = load_coatnet(uri, tracking_uri=tracking_uri)
    except (MlflowException, OSError, ValueError) as err:
        raise SearchInputError(f"{uri}: cannot load the model: {err}") from None
    parent = None
    if loaded.run_id and tracking_uri:
        parent = _run(loaded.run_id, tracking_uri).data.tags.get("mlflow.parentRunId")
    return TrialSource(trial_id=str(loaded.trial.get("trial_id", "")), trial=loaded.trial,
                       state_dict=loaded.model.state_dict(), origin=uri,
                       tracking_uri=tracking_uri, parent_run_id=parent, run_id=loaded.run_id)


def _run(run_id: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise SearchInputError(f"run {run_id}: not found at {tracking_uri} "
                               f"({str(err).splitlines()[0]})") from None


def _from_run(run_id: str, *, tracking_uri: str | None) -> TrialSource:
    from coatnet.search.tracking import TRIAL_ID_TAG, resolve_tracking_uri
    from coatnet.search.tracking.models import logged_model_uri

    tracking_uri = tracking_uri or resolve_tracking_uri(None)
    run = _run(run_id, tracking_uri)
    if TRIAL_ID_TAG not in run.data.tags:
        role = run.data.tags.get("role") or run.data.tags.get("stage") or "not a trial"
        raise SearchInputError(f"run {run_id}: not a trial run of a search (no {TRIAL_ID_TAG} "
                               f"tag; this run is: {role}); pass a trial's child run id, a "
                               "models:/ URI or the search's experiment directory")
    uri = logged_model_uri(tracking_uri=tracking_uri, run_id=run_id)
    if uri is None:
        raise SearchInputError(
            f"run {run_id} (trial {run.data.tags[TRIAL_ID_TAG]}): no logged model (a search "
            "logs the best trial and the Pareto front); pass the search's experiment directory "
            f"and --trial {run.data.tags[TRIAL_ID_TAG]} instead")
    source = _from_model(uri, tracking_uri=tracking_uri)
    return dataclasses.replace(source, origin=run_id, run_id=run_id)
