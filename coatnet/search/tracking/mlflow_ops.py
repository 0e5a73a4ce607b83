"""Applying one tracking operation to a trial's MLflow child run, and the outbox that feeds it.

An operation is a plain dict (JSON-able, so the outbox can journal it): ``open`` (create or
find the trial's run, log its params, tags and static metrics), ``log`` (one epoch's metrics
and tags, as one ``log_batch``) or ``close`` (final tags and run status). ``TrialRunWriter``
applies them; ``tracking_outbox`` is the outbox that journals them next to the state file
(``<state file>.pending.json``) and delivers them to a writer on one background thread.

Every operation is safe to apply twice, which the journal's at-least-once replay needs: runs
are found by tag before one is created, steps MLflow already has are skipped and closing a run
twice is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from coatnet.search.tracking.outbox import Operation, Outbox, read_journal
from coatnet.search.tracking.params import chunks
from coatnet.search.tracking.records import TrialRecords

logger = logging.getLogger(__name__)

__all__ = ["PARENT_TAG", "TRIAL_ID_TAG", "TrialRunWriter", "deliver_or_keep", "is_permanent",
           "pending_path_for", "read_pending", "search_trial_ids", "tag_list",
           "tracking_outbox"]

TRIAL_ID_TAG = "tune_trial_id"
PARENT_TAG = "mlflow.parentRunId"


def is_permanent(exc: BaseException) -> bool:
    """A 4xx answer will not change on retry (bad value, deleted run); everything else may."""
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code != 429
    return False


def tag_list(mapping: Mapping[str, Any]) -> list[RunTag]:
    """MLflow tags of the set values of ``mapping`` (truncated to MLflow's limit)."""
    return [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in mapping.items() if v is not None]


def pending_path_for(state_path: Path | str) -> Path:
    """The journal of unsent MLflow operations next to a tracking state file."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + ".pending.json")


def _is_operation(op: Operation) -> bool:
    return "op" in op


def read_pending(state_path: Path | str) -> list[Operation]:
    """Unsent operations journaled next to ``state_path`` (a torn last line is skipped)."""
    return read_journal(pending_path_for(state_path), name="MLflow", valid=_is_operation)


def _describe(op: Operation) -> str:
    return f"{op.get('op')} for trial {op.get('trial_id')}"


def tracking_outbox(*, tracking_uri: str, state_path: Path | str, writer: TrialRunWriter,
                    retry_max_s: float) -> Outbox:
    """The outbox of a search's child-run operations, journalled next to ``state_path``.

    The journal (JSON lines; an older driver wrote a JSON list) gets every operation before it
    is queued and is removed whenever the queue drains, so a driver killed with SIGKILL loses
    nothing: the next driver (a resume) or ``deliver_pending`` (the sync command) sends what is
    left. MLflow's 4xx answers are permanent (the operation is dropped with a warning); every
    other error is retried with back-off while the server is unreachable.
    """
    return Outbox(path=pending_path_for(state_path), deliver=writer.apply,
                  is_permanent=is_permanent, valid=_is_operation, describe=_describe,
                  retry_max_s=retry_max_s, name="MLflow", target=f"MLflow at {tracking_uri}",
                  thread_name="mlflow-tracking")


def deliver_or_keep(outbox: Outbox, *, timeout_s: float) -> int:
    """Wait up to ``timeout_s`` for delivery, keep what is left on disk for the next driver,
    stop the delivery thread; returns how many operations are still undelivered."""
    try:
        if not outbox.flush(timeout_s=timeout_s):
            kept = outbox.persist()  # compact: drop what was sent meanwhile
            if kept:
                logger.warning("Saved %d unsent MLflow operation(s) to %s; a resume or "
                               "`python experiments/sync_mlflow.py` will send them", kept,
                               outbox.path)
    finally:
        outbox.stop()
    return outbox.pending_count()


def search_trial_ids(*, tracking_uri: str, parent_run_id: str) -> dict[str, list[str]]:
    """tune trial id -> child run ids (oldest first) of a search's parent run."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    out: dict[str, list[str]] = {}
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        for run in page:
            out.setdefault(run.data.tags.get(TRIAL_ID_TAG, ""), []).append(run.info.run_id)
        token = page.token
        if not token:
            return out


class TrialRunWriter:
    """Applies operations to the child runs of ``parent_run_id``, one MlflowClient call batch
    each, keeping ``records`` (run ids, last logged step) up to date.

    Meant to be called from one thread (the outbox's); ``records`` is shared with the driver.
    """

    def __init__(self, *, tracking_uri: str, parent_run_id: str, experiment_id: str | None,
                 records: TrialRecords) -> None:
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.records = records
        self._client: MlflowClient | None = None
        # Trials whose run was verified in MLflow since this driver started (a resume must
        # re-verify, so this is never persisted).
        self._checked: set[str] = set()

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _experiment(self) -> str:
        if self.experiment_id is None:
            self.experiment_id = self._mlflow().get_run(self.parent_run_id).info.experiment_id
        return self.experiment_id

    def apply(self, op: Operation) -> None:
        """Apply one operation; raises what MLflow raised (the outbox retries or drops it)."""
        kind = op["op"]
        run_id = self._ensure_run(op)
        if kind == "open":
            return
        with self.records.lock:
            rec = self.records.get(op["trial_id"])
            last_step = int(rec.get("last_step") or 0)
        if kind == "log":
            self._log(op, run_id=run_id, rec=rec, last_step=last_step)
        elif kind == "close":
            self._mlflow().log_batch(run_id, tags=tag_list(op["tags"]))
            self._mlflow().set_terminated(run_id, status=op["run_status"],
                                          end_time=op["timestamp"])
            with self.records.lock:
                rec["closed_status"] = op["run_status"]
            self.records.save()

    def _log(self, op: Operation, *, run_id: str, rec: dict[str, Any], last_step: int) -> None:
        step = int(op["step"])
        metrics = op["metrics"]
        if step >= 1 and step <= last_step:
            metrics = {}  # already logged (resume replays from a checkpoint)
        entries = [Metric(k, v, op["timestamp"], step) for k, v in metrics.items()]
        run_tags = tag_list(op["tags"])
        if entries or run_tags:
            self._mlflow().log_batch(run_id, metrics=entries, tags=run_tags)
        if metrics and step > last_step:
            with self.records.lock:
                rec["last_step"] = step
            self.records.save()

    def _ensure_run(self, op: Operation) -> str:
        """The trial's child run: from the state file, else by tag, else newly created.

        Searching by tag before creating also makes a retried create (lost response) safe.
        """
        trial_id = op["trial_id"]
        with self.records.lock:
            rec = self.records.get(trial_id)
            run_id = rec.get("run_id")
            checked = trial_id in self._checked
        if run_id and checked:
            return run_id
        reopened = bool(run_id)
        if not run_id:
            run_id = self._find_run(trial_id, rec)
            reopened = run_id is not None
        if run_id is None:
            run_id = self._create_run(trial_id, op, rec)
        else:
            self._reopen_run(run_id, rec)
        self._log_open(op, run_id=run_id, rec=rec, reopened=reopened)
        with self.records.lock:
            self._checked.add(trial_id)
            if op["op"] == "open":
                rec["params_logged"] = True
        self.records.save()
        return run_id

    def _find_run(self, trial_id: str, rec: dict[str, Any]) -> str | None:
        """The oldest child run tagged with ``trial_id`` (a lost state file, a retried create)."""
        found = self._mlflow().search_runs(
            [self._experiment()],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
                f"and tags.{TRIAL_ID_TAG} = '{trial_id}'"
            ),
            max_results=10,
            order_by=["attributes.start_time ASC"],
        )
        if len(found) > 1:
            logger.warning("Trial %s has %d MLflow runs; using the oldest", trial_id, len(found))
        if not found:
            return None
        if found[0].data.params:
            with self.records.lock:
                rec["params_logged"] = True
        return found[0].info.run_id

    def _create_run(self, trial_id: str, op: Operation, rec: dict[str, Any]) -> str:
        run_name = op.get("run_name") or rec.get("run_name") or trial_id
        run = self._mlflow().create_run(
            self._experiment(),
            run_name=run_name,
            tags={PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial_id, "status": "running"},
        )
        run_id = run.info.run_id
        with self.records.lock:
            rec["run_id"] = run_id
        self.records.save()
        return run_id

    def _reopen_run(self, run_id: str, rec: dict[str, Any]) -> None:
        """Resumed: whatever the state file says, never re-log a step MLflow already has."""
        client = self._mlflow()
        history = client.get_metric_history(run_id, "val_accuracy")
        logged = max((m.step for m in history), default=0)
        info = client.get_run(run_id).info
        if info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        with self.records.lock:
            rec["run_id"] = run_id
            rec["last_step"] = max(int(rec.get("last_step") or 0), int(logged))
        self.records.save()

    def _log_open(self, op: Operation, *, run_id: str, rec: dict[str, Any],
                  reopened: bool) -> None:
        """An ``open``'s params, tags and static metrics (``params``, ``macs`` at step 0)."""
        client = self._mlflow()
        # Params are immutable in MLflow; identical re-logs are fine, so a retry is harmless.
        already = reopened and bool(rec.get("params_logged"))
        params = op.get("params") if op["op"] == "open" else None
        if params and not already:
            items = [Param(k, v) for k, v in params.items()]
            for chunk in chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
                try:
                    client.log_batch(run_id, params=chunk)
                except MlflowException as exc:
                    if not is_permanent(exc):
                        raise
                    logger.warning("MLflow rejected params of trial %s: %s", op["trial_id"],
                                   exc)
        if op["op"] == "open":
            metrics = [] if already else [
                Metric(k, v, op["timestamp"], 0) for k, v in op.get("metrics", {}).items()
            ]
            client.log_batch(run_id, metrics=metrics, tags=tag_list(op.get("tags", {})))
