"""The MLflow life cycle of a search: its parent run, orphaned children, unsent data.

One parent run per search (settings as params, the space file as an artifact and its sha256 as
a tag) and one child run per trial (written by the callback through the outbox). This module
opens, reopens and closes the parent, cleans up children a killed driver left behind, and
delivers what never reached the server: the journal of child-run operations
(``<STATE_FILE_NAME>.pending.json``) and the parent's summary (``PARENT_PENDING_FILE``), both
in the experiment directory, which ``experiments/sync_mlflow.py`` sends later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

from coatnet.search.results import STATUSES
from coatnet.search.tracking.mlflow_ops import (
    PARENT_TAG,
    TRIAL_ID_TAG,
    TrialRunWriter,
    deliver_or_keep,
    read_pending,
    search_trial_ids,
    tracking_outbox,
)
from coatnet.search.tracking.params import chunks, finite_number, flatten_params, now_ms
from coatnet.search.tracking.records import TrialRecords, atomic_write_json, read_json
from coatnet.search.tracking.summary import (log_dataset, log_figures, log_front,
                                             log_leaderboard_table, log_test_accuracy)
from coatnet.search.tracking.views import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND,
                                           set_experiment_views)

logger = logging.getLogger(__name__)

__all__ = ["PARENT_PENDING_FILE", "SPACE_SHA_TAG", "STATE_FILE_NAME", "close_orphaned_runs",
           "delete_unknown_trial_runs", "deliver_pending", "finish_parent_run",
           "finish_search_run", "pending_tracking_operations", "search_trial_ids",
           "settle_child_runs", "start_parent_run", "sync_experiment"]

SPACE_SHA_TAG = "space_sha256"
STATE_FILE_NAME = "mlflow_runs.json"  # in the experiment directory (runner.run_search)
PARENT_PENDING_FILE = "mlflow_parent_pending.json"
_RETRY_MAX_S = 15.0  # the longest back-off between delivery attempts of the sync command


# --------------------------------------------------------------------------- parent run


def start_parent_run(
    *,
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    search_settings: dict,
    space_text: str,
    space_sha256: str,
    resume_run_id: str | None,
    metric: str = "val_accuracy",
    mode: str = "max",
    view_params: Sequence[str] = (),
    cost: str | None = None,
) -> str:
    """Create (or, on resume, reopen) the parent run of a search and return its id.

    Settings become params, the space file an artifact and its sha256 a tag, so any run in the
    UI can be traced back to the exact space that produced it. The experiment gets its views
    (``tracking.views``): opened on the training runs, in a trials view sorted by ``metric``
    with ``view_params`` as columns and parallel coordinates and ``cost`` against the metric.
    """
    client = MlflowClient(tracking_uri)
    if resume_run_id:
        run = client.get_run(resume_run_id)
        old_sha = run.data.tags.get(SPACE_SHA_TAG)
        if old_sha and old_sha != space_sha256:
            logger.warning(
                "Resuming parent run %s with a different search space (sha256 %s, was %s)",
                resume_run_id,
                space_sha256,
                old_sha,
            )
            client.set_tag(resume_run_id, "space_sha256_on_resume", space_sha256)
        client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        resumes = int(run.data.tags.get("resume_count", "0")) + 1
        client.set_tag(resume_run_id, "resume_count", str(resumes))
        logger.info("Reopened MLflow parent run %s", resume_run_id)
        return resume_run_id

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(
            experiment_name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        existing: dict[str, str] = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    else:
        experiment_id, existing = experiment.experiment_id, dict(experiment.tags)
    set_experiment_views(client, experiment_id, metric=metric, mode=mode, params=view_params,
                         cost=cost, tags=existing)
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={SPACE_SHA_TAG: space_sha256, "role": "search"},
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten_params(search_settings, "").items()]
    for chunk in chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    client.log_text(run_id, space_text, "search_space.yaml")
    logger.info("Started MLflow parent run %s in experiment %s", run_id, experiment_name)
    return run_id


def finish_parent_run(
    *,
    tracking_uri: str,
    run_id: str,
    status_counts: dict,
    best_value: float | None,
    leaderboard_csv: Path | None,
    best_config_yaml: Path | None,
    infeasible_reasons: dict[str, str] | None,
    status: str = "FINISHED",
    metric: str = "val_accuracy",
) -> None:
    """Log the search summary (trials per status, best value, result files) and close the run."""
    client = MlflowClient(tracking_uri)
    now = now_ms()
    counts = {s: 0 for s in STATUSES}
    counts.update({k: int(v) for k, v in status_counts.items()})
    metrics = [Metric(f"trials_{k.replace('-', '_')}", float(v), now, 0) for k, v in counts.items()]
    metrics.append(Metric("trials_total", float(sum(counts.values())), now, 0))
    if best_value is not None and finite_number(best_value) is not None:
        metrics.append(Metric(f"best_{metric}", float(best_value), now, 0))
    client.log_batch(run_id, metrics=metrics)
    for path in (leaderboard_csv, best_config_yaml):
        if path is not None and Path(path).exists():
            client.log_artifact(run_id, str(path))
        elif path is not None:
            logger.warning("Result file %s does not exist; not logged to MLflow", path)
    if leaderboard_csv is not None and Path(leaderboard_csv).exists():
        log_leaderboard_table(client, run_id, Path(leaderboard_csv))
    if infeasible_reasons:
        client.log_dict(run_id, dict(infeasible_reasons), "infeasible_reasons.json")
    client.set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- child runs


def close_orphaned_runs(
    *, tracking_uri: str, parent_run_id: str, keep_run_ids: Iterable[str]
) -> int:
    """Mark children a killed driver left RUNNING as KILLED; returns how many were closed.

    ``keep_run_ids`` are the runs the resumed search will keep logging into.
    """
    client = MlflowClient(tracking_uri)
    keep = set(keep_run_ids)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    closed = 0
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
            ),
            max_results=1000,
            page_token=token,
        )
        for run in page:
            if run.info.run_id in keep:
                continue
            client.set_terminated(run.info.run_id, status="KILLED")
            closed += 1
        token = page.token
        if not token:
            break
    if closed:
        logger.info("Closed %d orphaned MLflow child run(s) of %s as KILLED", closed, parent_run_id)
    return closed


def delete_unknown_trial_runs(*, tracking_uri: str, parent_run_id: str,
                              trial_ids: Iterable[str]) -> int:
    """Soft-delete child runs of trials the search does not have.

    A driver killed between Tune's experiment snapshots can have started a trial that the
    resumed search never knew (Tune restores its last snapshot, and the trial's candidate goes
    back to Optuna): its MLflow run would be one child too many.
    """
    client = MlflowClient(tracking_uri)
    known = set(trial_ids)
    deleted = 0
    for trial_id, run_ids in search_trial_ids(tracking_uri=tracking_uri,
                                              parent_run_id=parent_run_id).items():
        if trial_id in known:
            continue
        for run_id in run_ids:
            client.set_tag(run_id, "orphaned", "trial lost with a killed driver")
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
            client.delete_run(run_id)
            deleted += 1
    if deleted:
        logger.warning("Deleted %d MLflow child run(s) of trials that a killed driver started "
                       "but the search does not have (soft delete: `mlflow gc` or restore)",
                       deleted)
    return deleted


def settle_child_runs(*, tracking_uri: str, parent_run_id: str,
                      trial_status: Mapping[str, str]) -> int:
    """Give every trial's child run the MLflow status its final leaderboard status implies
    (``failed``: FAILED, any other: FINISHED); returns how many runs were changed.

    The leaderboard is the last word of a finished search: a run a killed driver left RUNNING,
    or closed as KILLED before a resumed driver finished the trial without reopening it, ends
    with the status (and ``status`` tag) of its trial. Children of trials the search does not
    have and still RUNNING are closed as KILLED (``delete_unknown_trial_runs`` deletes them).
    """
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    settled: list[str] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        for run in page:
            final = trial_status.get(run.data.tags.get(TRIAL_ID_TAG, ""))
            if final is None:
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, status="KILLED")
                continue
            wanted = "FAILED" if final == "failed" else "FINISHED"
            if run.info.status == wanted and run.data.tags.get("status") == final:
                continue
            client.set_tag(run.info.run_id, "status", final)
            client.set_terminated(run.info.run_id, status=wanted)
            settled.append(f"{run.data.tags.get(TRIAL_ID_TAG)} {run.info.status}->{wanted}")
        token = page.token
        if not token:
            break
    if settled:
        logger.info("Settled %d MLflow child run(s) of %s to their trial's final status: %s",
                    len(settled), parent_run_id, ", ".join(settled))
    return len(settled)


# --------------------------------------------------------------------------- unsent data


def pending_tracking_operations(experiment_dir: Path | str) -> int:
    """How many MLflow operations of a search never reached the server (0: all arrived)."""
    experiment_dir = Path(experiment_dir)
    count = len(read_pending(experiment_dir / STATE_FILE_NAME))
    return count + int((experiment_dir / PARENT_PENDING_FILE).exists())


def finish_search_run(*, experiment_dir: Path | str, tracking_uri: str, parent_run_id: str,
                      trial_ids: Iterable[str] | None, finish: dict[str, Any]) -> bool:
    """End a finished search in MLflow: drop runs of trials the search does not have, settle
    every child to its trial's final status (``finish["trial_status"]``; older saved finishes
    without it close orphaned children), log the summary and close the parent.

    Child-run operations still in the journal (the last flush timed out) go first: the finish
    is then saved (``PARENT_PENDING_FILE``) for the sync command, which sends them and then
    finishes, as it does when MLflow is unreachable. Returns whether the parent was closed.
    """
    experiment_dir = Path(experiment_dir)
    pending_file = experiment_dir / PARENT_PENDING_FILE
    unsent = len(read_pending(experiment_dir / STATE_FILE_NAME))

    def save_for_sync() -> None:
        atomic_write_json(pending_file, {"parent_run_id": parent_run_id,
                                         "trial_ids": None if trial_ids is None
                                         else list(trial_ids), "finish": finish})

    if unsent:
        logger.warning("%d MLflow child-run operation(s) of %s are not delivered yet; the parent "
                       "run is finished after them by `python experiments/sync_mlflow.py %s`",
                       unsent, parent_run_id, experiment_dir)
        save_for_sync()
        return False
    try:
        if trial_ids is not None:
            delete_unknown_trial_runs(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                      trial_ids=trial_ids)
        statuses = finish.get("trial_status")
        if isinstance(statuses, dict):
            settle_child_runs(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                              trial_status=statuses)
        else:
            close_orphaned_runs(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                keep_run_ids=())
        log_test_accuracy(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                          test_accuracy=dict(finish.get("test_accuracy") or {}),
                          best_trial_id=finish.get("best_trial_id"))
        if finish.get("models"):
            from coatnet.search.tracking.models import log_search_models

            # the URIs go back to the caller in the same dict (the CLI prints them)
            finish["model_uris"] = log_search_models(
                tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                members=finish["models"], register=finish.get("register_model"),
                runs=search_trial_ids(tracking_uri=tracking_uri, parent_run_id=parent_run_id),
                search_name=str(finish.get("search_name", "")))
        if finish.get("dataset"):
            runs = search_trial_ids(tracking_uri=tracking_uri, parent_run_id=parent_run_id)
            log_dataset(MlflowClient(tracking_uri),
                        [parent_run_id] + [r for ids in runs.values() for r in ids],
                        finish["dataset"])
        if finish.get("front"):
            log_front(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                      front=finish["front"])
        if finish.get("figures"):
            log_figures(MlflowClient(tracking_uri), parent_run_id, finish["figures"])
        finish_parent_run(
            tracking_uri=tracking_uri, run_id=parent_run_id,
            status_counts=finish["status_counts"], best_value=finish["best_value"],
            leaderboard_csv=Path(finish["leaderboard_csv"]) if finish.get("leaderboard_csv")
            else None,
            best_config_yaml=Path(finish["best_config_yaml"]) if finish.get("best_config_yaml")
            else None,
            infeasible_reasons=finish.get("infeasible_reasons"),
            metric=finish.get("metric", "val_accuracy"))
    except Exception as exc:  # noqa: BLE001 - MLflow down or flaky: keep it for sync
        logger.warning("Could not finish the MLflow parent run %s (%s: %s); saved to %s for "
                       "`python experiments/sync_mlflow.py %s`", parent_run_id,
                       type(exc).__name__, exc, pending_file, experiment_dir)
        save_for_sync()
        return False
    pending_file.unlink(missing_ok=True)
    return True


def deliver_pending(*, tracking_uri: str, parent_run_id: str, state_path: Path | str,
                    max_epochs: int = 1, timeout_s: float = 120.0) -> int:
    """Send what earlier drivers left in the journal; returns how many operations are left.

    ``max_epochs`` is accepted for older callers; delivering needs no trial status.
    """
    records = TrialRecords(state_path, parent_run_id=parent_run_id)
    records.load()
    writer = TrialRunWriter(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                            experiment_id=None, records=records)
    outbox = tracking_outbox(tracking_uri=tracking_uri, state_path=state_path, writer=writer,
                             retry_max_s=_RETRY_MAX_S)
    outbox.replay()
    return deliver_or_keep(outbox, timeout_s=timeout_s)


def sync_experiment(experiment_dir: Path | str, *, tracking_uri: str | None = None,
                    timeout_s: float = 120.0) -> int:
    """Deliver everything a search left unsent (journal, then the parent run's summary);
    returns how many operations are still undelivered."""
    experiment_dir = Path(experiment_dir)
    state = json.loads((experiment_dir / "search_state.json").read_text())
    uri = tracking_uri or state["tracking_uri"]
    parent_run_id = state["parent_run_id"]
    left = deliver_pending(tracking_uri=uri, parent_run_id=parent_run_id,
                           state_path=experiment_dir / STATE_FILE_NAME, timeout_s=timeout_s)
    saved = read_json(experiment_dir / PARENT_PENDING_FILE)
    if left == 0 and isinstance(saved, dict):
        finish_search_run(experiment_dir=experiment_dir, tracking_uri=uri,
                          parent_run_id=saved.get("parent_run_id", parent_run_id),
                          trial_ids=saved.get("trial_ids"), finish=saved["finish"])
    return pending_tracking_operations(experiment_dir)
