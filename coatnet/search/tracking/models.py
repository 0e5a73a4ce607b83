"""A search's trained models in MLflow: logged on their trial's run, registered, read back.

``log_trial_model`` logs one trained CoAtNet with ``mlflow.pytorch.log_model`` on a run, in
MLflow's ``pt2`` format: ``torch.export`` traces the model into a graph with its weights, so
``mlflow.pytorch.load_model(uri)`` returns a runnable module without this project installed and
without unpickling code (MLflow checks the archive is pickle-free before loading it). The graph
is fixed to the image size it was traced at (any batch size); the model directory also holds
``extra_files/coatnet_trial.json`` (the ``CoAtNetConfig``, training hyperparameters, data and
trial settings), from which ``load_coatnet`` rebuilds a real, resizable CoAtNet with the same
weights (the graph's parameters keep the module's names) for another resolution.

``log_search_models`` logs the best trial and every Pareto-front member of a finished search
(idempotent: a model already on a run is not logged twice, which a retried finish needs) and,
with ``--register-model NAME``, registers the best one as a new version of ``NAME``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "MODEL_NAME", "TRIAL_FILE", "load_coatnet", "log_search_models",
           "log_trial_model", "model_source_run"]

MODEL_NAME = "model"  # the logged model's name on its run (runs:/<run id>/model)
TRIAL_FILE = "coatnet_trial.json"  # in the model's extra_files/: what rebuilds and retrains it
ROLE_TAG = "coatnet.role"  # best | front | finetune
_EXAMPLE_BATCH = 2  # torch.export makes a size-1 dimension static: 2 keeps the batch dynamic


@dataclass(frozen=True)
class LoadedModel:
    """A CoAtNet read back from MLflow (or a model directory), with what trained it."""

    model: Any  # CoAtNetWithLinearClassifier, eval mode
    trial: dict[str, Any]  # the coatnet_trial.json content (candidate, data, trial, seed, ...)
    run_id: str | None  # the run the model was logged on
    model_dir: Path  # the local copy of the MLflow model directory


@contextlib.contextmanager
def tracking_uri_set(uri: str, *, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) pointed at ``uri`` and, when given,
    ``experiment_id``, then restored. ``log_model(run_id=...)`` files the model under the
    fluent API's current experiment, not the run's: without this, the Default one."""
    import mlflow

    before, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if experiment_id is not None:
            if env_before is None:
                os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            else:
                os.environ["MLFLOW_EXPERIMENT_ID"] = env_before


def build_coatnet(trial: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None) -> Any:
    """The trial's ``CoAtNetWithLinearClassifier`` (eval mode), with ``state_dict`` loaded."""
    from coatnet import CoAtNetConfig, CoAtNetWithLinearClassifier

    model = CoAtNetWithLinearClassifier(CoAtNetConfig.from_dict(trial["candidate"]["model"]))
    if state_dict is not None:
        model.load_state_dict(dict(state_dict))
    return model.eval()


def log_trial_model(*, tracking_uri: str, run_id: str, state_dict: Mapping[str, Any],
                    trial: Mapping[str, Any], role: str, step: int = 0) -> str:
    """Log the model ``trial`` describes, with ``state_dict``, on ``run_id``; returns its
    ``models:/<model id>`` URI. An input example (a seeded batch of 2 at the model's image size)
    and the signature make it servable; ``step`` links the run's metrics of that epoch."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    existing = logged_model_uri(tracking_uri=tracking_uri, run_id=run_id)
    if existing is not None:
        return existing
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    model = build_coatnet(trial, state_dict)
    cfg = trial["candidate"]["model"]
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(_EXAMPLE_BATCH, int(cfg["image_channel"]), int(cfg["image_height"]),
                          int(cfg["image_width"]), generator=generator)
    with torch.no_grad():
        logits = model(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    with tempfile.TemporaryDirectory(prefix="coatnet-model-") as tmp, \
            tracking_uri_set(tracking_uri, experiment_id=experiment_id):
        trial_file = Path(tmp) / TRIAL_FILE
        trial_file.write_text(json.dumps(dict(trial), indent=2, default=str))
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, run_id=run_id, input_example=example.numpy(),
            signature=signature, serialization_format="pt2", extra_files=[str(trial_file)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            tags={ROLE_TAG: role, "tune_trial_id": str(trial.get("trial_id", ""))},
            step=int(step))
        MlflowClient(tracking_uri).log_dict(run_id, dict(cfg), "coatnet_config.json")
    logger.info("logged the %s model of trial %s on run %s: %s", role, trial.get("trial_id"),
                run_id, info.model_uri)
    return info.model_uri


def logged_model_uri(*, tracking_uri: str, run_id: str) -> str | None:
    """The ``models:/`` URI of the model already logged on ``run_id``, if any."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in found if m.name == MODEL_NAME and "READY" in str(m.status)]
    return f"models:/{ready[0].model_id}" if ready else None


def log_search_models(*, tracking_uri: str, parent_run_id: str, members: Sequence[Mapping],
                      runs: Mapping[str, Sequence[str]], register: str | None,
                      search_name: str) -> dict[str, str]:
    """Log each member (``{"trial_id", "checkpoint", "role", "trial"}``: the best trial and the
    front) on its trial's child run (``runs``: trial id -> its run ids, oldest first) and
    register the ``best`` one under ``register``. Returns ``{trial_id: model URI}`` (and
    ``"registered"``: ``models:/NAME/VERSION``). A member whose checkpoint cannot be read is
    skipped with a warning (the search is done); an MLflow error propagates (the finish is
    saved and retried by the sync command)."""
    from coatnet.search.checkpoints import CheckpointError, load_state
    from coatnet.search.evaluation import local_checkpoint

    uris: dict[str, str] = {}
    for member in members:
        trial_id = str(member["trial_id"])
        run_ids = runs.get(trial_id)
        if not run_ids:
            logger.warning("trial %s has no MLflow run: its model is not logged", trial_id)
            continue
        try:
            with local_checkpoint(str(member["checkpoint"])) as directory:
                state = load_state(directory)
        except CheckpointError as err:
            logger.warning("trial %s: checkpoint unusable, model not logged: %s", trial_id, err)
            continue
        uris[trial_id] = log_trial_model(
            tracking_uri=tracking_uri, run_id=run_ids[0], state_dict=state["model"],
            trial=member["trial"], role=str(member["role"]), step=int(state["epoch"]))
    best = next((m for m in members if m["role"] == "best" and str(m["trial_id"]) in uris),
                None)
    if register and best is not None:
        version = register_model(
            tracking_uri=tracking_uri, model_uri=uris[str(best["trial_id"])], name=register,
            tags={"search": search_name, "parent_run_id": parent_run_id,
                  "tune_trial_id": str(best["trial_id"])})
        uris["registered"] = f"models:/{register}/{version}"
    elif register:
        logger.warning("no best model was logged: nothing registered as %r", register)
    return uris


def register_model(*, tracking_uri: str, model_uri: str, name: str,
                   tags: Mapping[str, str]) -> str:
    """A new version of registered model ``name`` for ``model_uri`` (one per search: a retried
    finish finds the version it made); returns the version number."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    model_id = model_uri.removeprefix("models:/")
    for version in client.search_model_versions(f"name = '{name}'"):
        if model_uri == version.source or model_id == getattr(version, "model_id", None):
            return str(version.version)
    with tracking_uri_set(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=dict(tags))
    logger.info("registered %s as version %s of %r", model_uri, version.version, name)
    return str(version.version)


def _current_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def model_source_run(model_dir: Path) -> str | None:
    """The run a downloaded MLflow model was logged on (its MLmodel file)."""
    from mlflow.models import Model

    return Model.load(str(model_dir)).run_id


def load_coatnet(uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """A logged model (``models:/...``, ``runs:/<id>/model``, or a local model directory) as a
    resizable CoAtNet: the config from ``coatnet_trial.json``, the weights from the ``pt2``
    graph (loaded by MLflow, which refuses pickled payloads)."""
    import mlflow.artifacts
    import mlflow.pytorch

    local = Path(uri)
    if uri.startswith("runs:/"):  # MLflow 3 keeps models apart from run artifacts
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        uri = logged_model_uri(tracking_uri=tracking_uri or _current_uri(), run_id=run_id) \
            or uri
    if not local.is_dir():
        with tracking_uri_set(tracking_uri or _current_uri()):  # models:/ reads the global
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                             tracking_uri=tracking_uri))
    trial_file = local / "extra_files" / TRIAL_FILE
    if not trial_file.is_file():
        raise ValueError(f"{uri}: not a model this tool logged (no extra_files/{TRIAL_FILE}); "
                         "load it with mlflow.pytorch.load_model instead")
    trial = json.loads(trial_file.read_text())
    graph = mlflow.pytorch.load_model(str(local))
    model = build_coatnet(trial)
    wanted = set(model.state_dict())
    model.load_state_dict({k: v for k, v in graph.state_dict().items() if k in wanted})
    return LoadedModel(model=model.eval(), trial=trial, run_id=model_source_run(local),
                       model_dir=local)
