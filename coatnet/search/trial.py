"""One Tune trial = one candidate: ``run_trial`` is the Tune function trainable.

Two execution modes, picked from the trial settings (``execution_mode``):

* ``in_process`` (one CPU worker, the embedded default): ``TorchTrainer`` with
  ``ScalingConfig(num_workers=0)`` runs the loop inside the Tune trial's own actor, which Tune
  can reuse (``reuse_actors=True``): ~0.2 s to the first step instead of 14-16 s for a worker
  group. In Ray 2.60 this "local mode" (``LocalController``) calls no Train callbacks, keeps no
  storage and does not retry, and every ``ray.train.*`` session call raises inside a Tune
  session, so the loop reports to Tune itself (``ray.tune.report`` with the checkpoint), and
  ``run_trial`` retries failed attempts (``trial.max_failures``) from the last checkpoint.
* ``worker_group`` (several workers, or GPUs): a real ``TorchTrainer`` worker group (DDP),
  ``RunConfig(name="train-<trial id>")`` stored under the Tune trial's directory,
  ``FailureConfig(max_failures)``. Rank-0 reports are forwarded from the Train controller to
  this function through a Ray queue, and reported to Tune here *with* the checkpoint; the
  stock ``TuneReportCallback`` forwards only metrics (plus a ``checkpoint_path`` metric), so
  Tune would hold no checkpoint for the trial.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from coatnet.search.contracts import (REPORT_TO_TRAIN, REPORT_TO_TUNE, STATUS_INFEASIBLE,
                                      Candidate, EpochReport, LoopConfig, LoopRuntime,
                                      TrialSettings)
from coatnet.search.faults import CONFIG_KEY as FAULTS_CONFIG_KEY
from coatnet.search.train_loop import DIVERGED_LOSS, node_id, train_loop_per_worker

logger = logging.getLogger(__name__)

IN_PROCESS = "in_process"
WORKER_GROUP = "worker_group"
DRIVER_CPU = 0.01  # what a worker-group trial's driver function reserves
_DONE = "__coatnet_train_done__"
_QUEUE_POLL_S = 1.0
_ABORT_TIMEOUT_S = 30.0

def recommended_env_vars() -> dict[str, str]:
    """Ray Train settings that cut a worker group's start and stop latency.

    The controller polls workers every 2 s by default (a finished run waits for the next poll)
    and starts a preemption watcher per run; Tune gives a reused actor's old trial thread 2 s. Set these before Ray starts (os.environ defaults
    or the runtime env); ``run_trial`` also sets them as defaults in the trial process, from
    where Train propagates them to its controller and workers.
    """
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            # a reused Tune actor waits this long for the previous trial's thread, which
            # may be aborting its Train run (default 2 s)
            "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}


def apply_recommended_env() -> None:
    """``os.environ.setdefault`` for every ``recommended_env_vars`` entry (user values win)."""
    for key, value in recommended_env_vars().items():
        os.environ.setdefault(key, value)


def _settings(trial: TrialSettings | Mapping[str, Any] | None) -> TrialSettings:
    return trial if isinstance(trial, TrialSettings) else TrialSettings.from_dict(trial)


def execution_mode(trial: TrialSettings | Mapping[str, Any] | None) -> str:
    """``in_process`` for one CPU worker, ``worker_group`` for several workers or GPUs."""
    settings = _settings(trial)
    if int(settings.num_workers) <= 1 and not settings.use_gpu:
        return IN_PROCESS
    return WORKER_GROUP


def trial_resources(trial: TrialSettings | Mapping[str, Any] | None) -> dict[str, float]:
    """What the runner passes to ``tune.with_resources(run_trial, ...)``.

    In-process trials train in the Tune actor, so it reserves the worker's CPUs (and GPU). A
    worker-group trial's function only waits on the Train controller: it reserves a sliver of
    CPU, so that the workers' own placement group gets the cores (two one-core trials run at
    once on a two-core machine).
    """
    settings = _settings(trial)
    if execution_mode(settings) == IN_PROCESS:
        return {"cpu": float(settings.cpus_per_worker), "gpu": 0.0}
    return {"cpu": DRIVER_CPU, "gpu": 0.0}


def build_loop_config(config: Mapping[str, Any], candidate: Candidate | None = None,
                      ) -> LoopConfig:
    """The Tune trial config (docs/design.md) -> the per-worker loop config."""
    candidate = candidate or Candidate.from_dict(config["candidate"])
    if candidate.model is None:
        raise ValueError("candidate.model is None: an infeasible candidate never trains")
    data = dict(config["data"])
    return LoopConfig(model=dict(candidate.model), hparams=candidate.hparams, data=data,
                      trial=_settings(config.get("trial")),
                      seed=int(config.get("seed", data.get("seed", 0))), macs=candidate.macs,
                      faults=config.get(FAULTS_CONFIG_KEY) or None,
                      latency=config.get("latency") or None)


def _infeasible_report(candidate: Candidate) -> dict[str, Any]:
    return EpochReport(train_loss=DIVERGED_LOSS, val_loss=DIVERGED_LOSS, val_accuracy=0.0,
                       epochs_done=0, images_per_s=0.0, epoch_time_s=0.0,
                       status=STATUS_INFEASIBLE, params=candidate.params, macs=candidate.macs,
                       node_id=node_id(), device="none",
                       infeasible_reason=str(candidate.infeasible_reason)).to_metrics()


# ---------------------------------------------------------------------------------- trainable
def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: train one candidate, or report it infeasible at once."""
    import ray.tune

    candidate = Candidate.from_dict(config["candidate"])
    if not candidate.feasible:
        logger.info("infeasible candidate, not training: %s", candidate.infeasible_reason)
        ray.tune.report(_infeasible_report(candidate))
        return
    apply_recommended_env()
    loop_config = build_loop_config(config, candidate)
    if execution_mode(loop_config.trial) == IN_PROCESS:
        _run_in_process(loop_config)
    else:
        _run_worker_group(loop_config)


def _trial_id() -> str:
    import ray.tune

    return ray.tune.get_context().get_trial_id()


def _run_in_process(loop_config: LoopConfig) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_at = time.time()
    max_failures = int(loop_config.trial.max_failures)
    trial_id = _trial_id()
    # private (0700, unguessable): run_trial only ever resumes from checkpoints it wrote here
    local_dir = Path(tempfile.mkdtemp(prefix=f"coatnet-inproc-{trial_id}-"))
    resume_from = None
    failures = 0
    try:
        while True:
            runtime = LoopRuntime(report_to=REPORT_TO_TUNE, resume_from=resume_from,
                                  local_checkpoint_dir=str(local_dir), started_at=started_at)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=dataclasses.replace(loop_config, runtime=runtime).to_dict(),
                scaling_config=ScalingConfig(num_workers=0),
                run_config=RunConfig(name=f"train-{trial_id}"))
            try:
                trainer.fit()
                return
            except Exception as exc:  # SystemExit (Tune stopping the trial) passes through
                failures += 1
                if 0 <= max_failures < failures:
                    raise
                # the newest local epoch_* (an older one if it is damaged); none yet: Tune's
                # checkpoint of a restored trial, else scratch
                if any(local_dir.glob("epoch_*")):
                    resume_from = str(local_dir)
                logger.warning("trial %s attempt %d of %d failed (%s: %s); retrying from %s",
                               trial_id, failures, max_failures + 1, type(exc).__name__, exc,
                               resume_from or "Tune's checkpoint or scratch")
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


class ForwardToTrialCallback(UserCallback):
    """Train ``UserCallback`` (runs in the Train controller): hand rank-0 reports and
    checkpoints to ``run_trial`` through a Ray queue, with the controller's handle so that
    ``run_trial`` can abort the run when Tune stops the trial."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        import ray

        controller = ray.get_runtime_context().current_actor
        self._queue.put({"metrics": dict(metrics[0]), "checkpoint": checkpoint,
                         "controller": controller})

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in worker_exceptions.items():
            logger.warning("train worker %d failed: %s", rank, error)


def _storage_for_train() -> tuple[str, Any]:
    """The Tune trial's own directory (and its filesystem), to keep Train runs inside it."""
    from ray.train._internal.session import get_session

    storage = get_session().storage
    return storage.trial_fs_path, storage.storage_filesystem


def _run_worker_group(loop_config: LoopConfig) -> None:
    import ray
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    started_at = time.time()
    trial = loop_config.trial
    trial_id = _trial_id()
    from coatnet.search.reporting import unsaved_trial_checkpoint

    # Tune restored this trial: start from its last checkpoint (or, when Tune's saved state
    # names none, from the newest one in the trial's directory)
    restored = ray.tune.get_checkpoint() or unsaved_trial_checkpoint()
    resume_from = None
    if restored is not None:
        resume_from = restored.path
    runtime = LoopRuntime(report_to=REPORT_TO_TRAIN, resume_from=resume_from,
                          started_at=started_at)

    storage_path, filesystem = _storage_for_train()
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    resources = {"CPU": float(trial.cpus_per_worker)}
    if trial.use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.replace(loop_config, runtime=runtime).to_dict(),
        scaling_config=ScalingConfig(num_workers=int(trial.num_workers),
                                     use_gpu=bool(trial.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"train-{trial_id}", storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=int(trial.max_failures)),
            # every checkpoint is kept: Tune's CheckpointPruner tombstones superseded ones
            # (Train deleting them would break a restore from Tune's saved state)
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=[ForwardToTrialCallback(queue)]))

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the trial thread below
            outcome["error"] = exc
        finally:
            try:
                queue.put(_DONE)
            except Exception:  # the queue died with the trial; nothing left to tell
                pass

    thread = threading.Thread(target=fit, name=f"train-{trial_id}", daemon=True)
    thread.start()
    controller = None
    finished = False
    last_epoch = 0
    try:
        while True:
            try:
                item = queue.get(block=True, timeout=_QUEUE_POLL_S)
            except Empty:
                if not thread.is_alive() and queue.empty():
                    break
                continue
            if item == _DONE:
                break
            controller = item["controller"]
            last_epoch = int(item["metrics"].get("epochs_done") or 0)
            checkpoint = item["checkpoint"]
            if checkpoint is not None:
                ray.tune.report(item["metrics"], checkpoint=ray.tune.Checkpoint(
                    path=checkpoint.path, filesystem=checkpoint.filesystem))
            else:
                ray.tune.report(item["metrics"])
        finished = True
    finally:
        if not finished and controller is not None and thread.is_alive():
            # Tune stopped the trial (tune.report raised SystemExit): end the Train run too,
            # so a reused actor's next trial does not share the machine with a zombie run.
            # Wait for the abort: it removes the workers' placement group. If the controller
            # merely died, Ray 2.60 leaves that group to a detached PlacementGroupCleaner that
            # polls the State API, which needs the dashboard; without it the CPUs leak.
            # Tune also ends a trial at its last epoch (ASHA's max_t): that is no early stop.
            log = logger.info if last_epoch >= int(trial.epochs) else logger.warning
            log("trial %s stopped by Tune after epoch %d; ending its Train run", trial_id,
                last_epoch)
            try:
                ray.get(controller.abort.remote(), timeout=_ABORT_TIMEOUT_S)
            except Exception:  # abort ends the controller actor: an actor error is success
                pass
    thread.join(timeout=30)
    try:
        ray.kill(queue.actor)
    except Exception:
        pass
    if "error" in outcome:
        raise outcome["error"]


__all__ = ["DRIVER_CPU", "IN_PROCESS", "WORKER_GROUP", "apply_recommended_env",
           "build_loop_config", "execution_mode", "recommended_env_vars", "run_trial",
           "trial_resources"]
