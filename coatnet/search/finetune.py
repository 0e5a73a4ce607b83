"""Fine-tune a searched trial at another resolution, the paper's protocol (train at 224, tune at
384), through the same Ray Train loop as the search.

``run_finetune``: resolve the source trial (``coatnet.search.sources``), check everything before
any compute (sizes, epochs, MLflow), measure the source model at its own size and at the new one
with interpolated relative biases (the *before*), move it to the new size
(``coatnet.search.transfer.at_image_size``: tables interpolated and stored with
``update_relative_bias_and_indices``), train it for ``epochs`` with the trial's hyperparameters
(``--lr`` / ``--batch-size`` override) on the same data resized, measure it again (the *after*),
and log a child run under the search's parent run: tags ``stage=finetune``, the source trial
and both sizes; per-epoch metrics; the before/after tables; the checkpoint; the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coatnet.config import MIN_IMAGE_SIDE
from coatnet.search.errors import SearchInputError
from coatnet.search.sources import TrialSource, resolve_trial
from coatnet.search.transfer import SizeResult

logger = logging.getLogger(__name__)

__all__ = ["FinetuneOptions", "FinetuneOutcome", "run_finetune"]

STAGE_TAG = "stage"
_EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_time_s",
                  "images_per_s")


@dataclass(frozen=True)
class FinetuneOptions:
    """``experiments/finetune.py``'s arguments."""

    source: str  # experiment dir, checkpoint dir, model dir or URI, or a trial's run id
    image_size: int
    epochs: int
    trial_id: str | None = None
    lr: float | None = None  # default: the trial's
    batch_size: int | None = None  # default: the trial's
    mlflow_uri: str | None = None  # default: the search's
    output: Path | None = None  # default: <experiment dir>/finetune/<name>
    data_dir: str | None = None  # where the dataset lives on this machine, if it moved
    from_scratch: bool = False  # the baseline: same architecture and settings, random weights


@dataclass(frozen=True)
class FinetuneOutcome:
    source: TrialSource
    image_size: int
    output_dir: Path
    checkpoint: Path
    before: tuple[SizeResult, ...]  # the source model at its size and at the new one
    after: tuple[SizeResult, ...]  # the fine-tuned model at the new size
    history: tuple[dict[str, Any], ...]  # every epoch's metrics
    run_id: str  # the fine-tune's MLflow run
    model_uri: str
    tracking_uri: str
    scratch: bool = False  # the baseline run (--from-scratch), not a fine-tune


def _check(options: FinetuneOptions) -> None:
    if options.image_size < MIN_IMAGE_SIDE:
        raise SearchInputError(f"--image-size={options.image_size}: below the smallest size a "
                               f"CoAtNet takes ({MIN_IMAGE_SIDE} px: five stride-2 stages)")
    if options.epochs < 1:
        raise SearchInputError(f"--epochs={options.epochs}: must be a positive integer")
    if options.lr is not None and not options.lr > 0:
        raise SearchInputError(f"--lr={options.lr}: must be a positive number")
    if options.batch_size is not None and options.batch_size < 1:
        raise SearchInputError(f"--batch-size={options.batch_size}: must be a positive integer")


def run_finetune(options: FinetuneOptions) -> FinetuneOutcome:
    """Fine-tune, evaluate before and after, log to MLflow (see the module docstring)."""
    from coatnet.search.tracking import check_tracking_server, resolve_tracking_uri

    _check(options)
    source = resolve_trial(options.source, trial_id=options.trial_id,
                           tracking_uri=options.mlflow_uri)
    if options.image_size == source.image_size:
        raise SearchInputError(f"--image-size={options.image_size}: the trial was trained at "
                               "that size already; pick another one")
    tracking_uri = options.mlflow_uri or source.tracking_uri or resolve_tracking_uri(None)
    check_tracking_server(tracking_uri)
    data = dict(source.trial["data"])
    if options.data_dir:
        data["data_dir"] = str(Path(options.data_dir).expanduser().resolve())
    name = (f"{_stage(options)}-{source.trial_id}-{options.image_size}px-"
            f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    output = options.output or ((source.experiment_dir or Path("ray_results")) / "finetune"
                                / name)
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    run_id = _start_run(source, tracking_uri=tracking_uri, name=name, options=options)
    try:
        outcome = _finetune(source, options=options, data=data, output=output,
                            tracking_uri=tracking_uri, run_id=run_id)
    except BaseException:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_terminated(run_id, status="FAILED")
        raise
    return outcome


def _finetune(source: TrialSource, *, options: FinetuneOptions, data: dict[str, Any],
              output: Path, tracking_uri: str, run_id: str) -> FinetuneOutcome:
    from coatnet.search.checkpoints import load_state, save_state
    from coatnet.search.transfer import at_image_size, evaluate_at_sizes, format_sizes

    seed = int(source.trial.get("seed") or 0)
    size = options.image_size
    model = source.model()
    before = evaluate_at_sizes(model, data=data, seed=seed, sizes=[source.image_size, size])
    logger.info("before fine-tuning:\n%s", format_sizes(before))
    moved = at_image_size(model, size)
    save_state({"epoch": 0, "model": moved.state_dict(),
                "model_config": moved.config.to_dict()}, output / "init")
    trial = _finetuned_trial(source, moved, options=options, data=data)
    result = _train(trial, init_from=None if options.from_scratch else output / "init",
                    output=output)
    checkpoint = output / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(result, checkpoint)
    state = load_state(checkpoint)
    tuned = dataclasses.replace(source, trial=trial, state_dict=state["model"]).model()
    after = evaluate_at_sizes(tuned, data=data, seed=seed, sizes=[size])
    logger.info("after fine-tuning:\n%s", format_sizes(after))
    history = tuple(state.get("history") or ())
    model_uri = _log_result(tracking_uri=tracking_uri, run_id=run_id, trial=trial,
                            state=state, before=before, after=after, history=history,
                            checkpoint=checkpoint)
    return FinetuneOutcome(source=source, image_size=size, output_dir=output,
                           checkpoint=checkpoint, before=tuple(before), after=tuple(after),
                           history=history, run_id=run_id, model_uri=model_uri,
                           tracking_uri=tracking_uri, scratch=options.from_scratch)


def _finetuned_trial(source: TrialSource, moved: Any, *, options: FinetuneOptions,
                     data: dict[str, Any]) -> dict[str, Any]:
    """The Tune-style trial config of the fine-tune (what its logged model carries)."""
    from coatnet.complexity import count_params_and_macs

    candidate = dict(source.trial["candidate"])
    hparams = dict(candidate["hparams"])
    if options.lr is not None:
        hparams["lr"] = options.lr
    if options.batch_size is not None:
        hparams["batch_size"] = options.batch_size
    complexity = count_params_and_macs(moved.config)
    settings = {**dict(source.trial["trial"]), "epochs": options.epochs}
    return {"trial_id": f"{source.trial_id}-{options.image_size}px",
            "candidate": {**candidate, "model": moved.config.to_dict(), "hparams": hparams,
                          "params": complexity.params, "macs": complexity.macs},
            "data": {**data, "image_size": options.image_size}, "trial": settings,
            "seed": source.trial.get("seed") or 0, "latency": source.trial.get("latency"),
            "stage": _stage(options),
            "source": {"trial_id": source.trial_id, "image_size": source.image_size,
                       "origin": source.origin, "run_id": source.run_id}}


def _stage(options: FinetuneOptions) -> str:
    return "scratch" if options.from_scratch else "finetune"


def _train(trial: dict[str, Any], *, init_from: Path | None, output: Path) -> Path:
    """Train through ``train_loop_per_worker`` in a ``TorchTrainer``; the last checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from coatnet.search.contracts import (REPORT_TO_TRAIN, Candidate, LoopConfig, LoopRuntime,
                                          TrialSettings)
    from coatnet.search.train_loop import train_loop_per_worker
    from coatnet.search.trial import IN_PROCESS, apply_recommended_env, execution_mode

    settings = TrialSettings.from_dict(trial["trial"])
    candidate = Candidate.from_dict(trial["candidate"])
    loop = LoopConfig(model=dict(candidate.model), hparams=candidate.hparams,
                      data=trial["data"], trial=settings, seed=int(trial["seed"]),
                      macs=candidate.macs, latency=trial.get("latency"),
                      runtime=LoopRuntime(report_to=REPORT_TO_TRAIN,
                                          init_from=None if init_from is None
                                          else str(init_from),
                                          local_checkpoint_dir=str(output / "epochs")))
    apply_recommended_env()
    if execution_mode(settings) == IN_PROCESS:  # Train's local mode: no worker group to start
        scaling = ScalingConfig(num_workers=0)
    else:
        resources = {"CPU": float(settings.cpus_per_worker)}
        if settings.use_gpu:
            resources["GPU"] = 1.0
        scaling = ScalingConfig(num_workers=int(settings.num_workers),
                                use_gpu=bool(settings.use_gpu),
                                resources_per_worker=resources)
    logger.info("fine-tuning %s at %d px for %d epoch(s)", trial["trial_id"],
                loop.model["image_height"], settings.epochs)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop.to_dict(),
                           scaling_config=scaling,
                           run_config=RunConfig(name="train", storage_path=str(output / "ray")))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the fine-tune of {trial['trial_id']} ended without a checkpoint "
                           "(it diverged: try a smaller --lr)")
    return Path(result.checkpoint.path)


def _start_run(source: TrialSource, *, tracking_uri: str, name: str,
               options: FinetuneOptions) -> str:
    """The fine-tune's MLflow run: a child of the search's parent run when known."""
    from mlflow.tracking import MlflowClient

    from coatnet.search.tracking import PARENT_TAG

    client = MlflowClient(tracking_uri)
    tags = {STAGE_TAG: _stage(options), "source_trial_id": source.trial_id,
            "source_run_id": source.run_id or "", "source": source.origin,
            "image_size_from": str(source.image_size), "image_size_to": str(options.image_size)}
    if source.parent_run_id:
        tags[PARENT_TAG] = source.parent_run_id
        experiment_id = client.get_run(source.parent_run_id).info.experiment_id
    else:
        found = client.get_experiment_by_name("coatnet-finetune")
        experiment_id = found.experiment_id if found else client.create_experiment(
            "coatnet-finetune")
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    params = {"epochs": options.epochs, "image_size": options.image_size,
              "source_image_size": source.image_size, "lr": options.lr or "trial's",
              "batch_size": options.batch_size or "trial's"}
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    logger.info("MLflow run %s (%s) at %s", run.info.run_id, name, tracking_uri)
    return run.info.run_id


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value))


def _log_result(*, tracking_uri: str, run_id: str, trial: dict[str, Any],
                state: dict[str, Any], before: list[SizeResult], after: list[SizeResult],
                history: tuple[dict[str, Any], ...], checkpoint: Path) -> str:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from coatnet.search.tracking.models import log_trial_model
    from coatnet.search.tracking.params import now_ms
    from coatnet.search.transfer import sizes_table

    client = MlflowClient(tracking_uri)
    now = now_ms()
    metrics = [Metric(key, float(epoch[key]), now, int(epoch["epochs_done"]))
               for epoch in history for key in _EPOCH_METRICS if key in epoch]
    size = after[0].image_size
    source_at_new = next(r for r in before if r.image_size == size)
    summary = {"before_val_accuracy": source_at_new.val_accuracy,
               "source_val_accuracy": before[0].val_accuracy,
               "after_val_accuracy": after[0].val_accuracy,
               "before_test_accuracy": source_at_new.test_accuracy,
               "test_accuracy": after[0].test_accuracy, "latency_ms": after[0].latency_ms,
               "macs": trial["candidate"]["macs"], "params": trial["candidate"]["params"]}
    metrics += [Metric(k, float(v), now, 0) for k, v in summary.items() if v is not None]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    client.log_table(run_id, data=sizes_table(before, stage="before"),
                     artifact_file="evaluation/before.json")
    client.log_table(run_id, data=sizes_table(after, stage="after"),
                     artifact_file="evaluation/after.json")
    client.log_artifacts(run_id, str(checkpoint), artifact_path="checkpoint")
    uri = log_trial_model(tracking_uri=tracking_uri, run_id=run_id, state_dict=state["model"],
                          trial=trial, role=str(trial["stage"]), step=int(state["epoch"]))
    client.set_tag(run_id, "status", "completed")
    client.set_terminated(run_id, status="FINISHED")
    return uri


def describe(outcome: FinetuneOutcome) -> str:
    """The CLI's summary: before and after, where everything went."""
    from coatnet.search.transfer import format_sizes

    how = "trained from scratch" if outcome.scratch else "fine-tuned"
    lines = [format_sizes(outcome.before, title=f"source trial {outcome.source.trial_id} "
                          f"(trained at {outcome.source.image_size} px), before:"), "",
             format_sizes(outcome.after, title=f"{how} at {outcome.image_size} px for "
                          f"{len(outcome.history)} epoch(s), after:"), "",
             f"checkpoint:  {outcome.checkpoint}",
             f"MLflow:      {outcome.tracking_uri} (run {outcome.run_id}, "
             f"stage={'scratch' if outcome.scratch else 'finetune'})",
             f"model:       {outcome.model_uri}"]
    return "\n".join(lines)

