"""The Tune side of tracking: a thin callback that turns trial events into outbox operations.

Tune's driver loop must never wait on the tracking server, so each hook only updates the
trial's record (``records``: the state file ``mlflow_runs.json``) and puts a plain-dict
operation into the outbox; the outbox's background thread applies it to MLflow
(``mlflow_ops``: one ``log_batch`` per result) and retries while the server is unreachable.
Child runs are keyed by the Tune trial id in the state file, so a resumed search logs into the
same runs and never logs a step twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from coatnet.search.contracts import Candidate
from coatnet.search.results import STATUSES, trial_status
from coatnet.search.tracking.mlflow_ops import (
    TRIAL_ID_TAG,
    TrialRunWriter,
    deliver_or_keep,
    tracking_outbox,
)
from coatnet.search.tracking.outbox import Operation
from coatnet.search.tracking.params import (candidate_params, finite_number, now_ms,
                                            sampled_params)
from coatnet.search.tracking.records import TrialRecords

logger = logging.getLogger(__name__)

__all__ = ["EPOCH_METRICS", "MLflowTrackingCallback"]

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "images_per_s", "epoch_time_s")
# A diverged trial reports 1e6 stand-ins for these; they would only wreck the charts.
_DIVERGED_STAND_INS = ("train_loss", "val_loss")
# Rebuilt on unpickling, never pickled: locks, the delivery thread, per-driver facts.
_RUNTIME_ATTRS = ("_records", "_writer", "_outbox", "_last_result", "_opened")


def _candidate_of(trial_id: str, config: Mapping[str, Any]) -> Candidate | None:
    """The trial's candidate, None when its config has none or one that breaks the contract.

    Tracking only mirrors the search, so a candidate it cannot read costs a warning (and the
    candidate's static metrics and infeasible reason in MLflow), never the driver; the trial
    itself fails at its own boundary.
    """
    raw = config.get("candidate")
    if not raw:
        return None
    try:
        return Candidate.from_dict(raw)
    except (TypeError, ValueError) as exc:
        logger.warning("Trial %s: candidate does not match the Candidate contract (%s); its "
                       "params, macs and infeasible reason are not tracked", trial_id, exc)
        return None


class MLflowTrackingCallback(Callback):
    """Tune callback that mirrors every trial into a nested MLflow child run.

    All MLflow traffic happens on a daemon thread fed by a queue of plain-dict operations, so a
    slow or dead server costs Tune nothing; operations are retried (with back-off) until they
    succeed or are rejected with a 4xx. The state file maps trial id -> {run_id, last_step, ...}
    and is what makes a resumed search reuse the same child runs.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        parent_run_id: str,
        experiment_id: str | None = None,
        state_path: Path | str,
        max_epochs: int,
        metric: str = "val_accuracy",
        mode: str = "max",
        flush_timeout_s: float = 60.0,
        retry_max_s: float = 15.0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.state_path = Path(state_path)
        self.max_epochs = int(max_epochs)
        self.metric = metric
        self.mode = mode
        self.flush_timeout_s = flush_timeout_s
        self.retry_max_s = retry_max_s
        self._init_runtime()

    # ---- pickling: Tune pickles RunConfig (and so this callback) into tuner.pkl

    def _init_runtime(self) -> None:
        # The state file is the source of truth for the records, and newer than any pickle.
        self._records = TrialRecords(self.state_path, parent_run_id=self.parent_run_id)
        self._records.load()
        self._writer = TrialRunWriter(tracking_uri=self.tracking_uri,
                                      parent_run_id=self.parent_run_id,
                                      experiment_id=self.experiment_id, records=self._records)
        self._outbox = tracking_outbox(tracking_uri=self.tracking_uri,
                                       state_path=self.state_path, writer=self._writer,
                                       retry_max_s=self.retry_max_s)
        self._last_result: dict[str, dict[str, Any]] = {}
        # Per-driver fact: which trials were announced here (never persisted).
        self._opened: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in _RUNTIME_ATTRS:
            state.pop(key, None)
        state["_records"] = {}  # the state file is the source of truth, and newer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()  # a restored Tuner unpickles us; the state file is newer

    # ---- Tune hooks (driver thread: no network I/O here)

    def setup(self, **info: Any) -> None:
        # Only a driver that really runs sends what an earlier one left in the journal.
        self._outbox.replay()
        self._outbox.start()

    def get_state(self) -> dict | None:
        return {"records": self._records.snapshot()}

    def set_state(self, state: dict) -> None:
        self._records.merge((state or {}).get("records", {}))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open_trial(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open_trial(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        trial_id = trial.trial_id
        self._open_trial(trial)
        self._last_result[trial_id] = dict(result)
        status = result.get("status")
        step = int(result.get("epochs_done") or 0)
        value = finite_number(result.get(self.metric))
        better = False
        with self._records.lock:
            rec = self._records.get(trial_id)
            if value is not None and status not in ("diverged", "infeasible"):
                best = rec.get("best")
                if best is None or (value > best if self.mode == "max" else value < best):
                    rec["best"] = value
                    better = True
            best = rec.get("best")
        metrics: dict[str, float] = {}
        if step >= 1:
            for key in EPOCH_METRICS:
                if status == "diverged" and key in _DIVERGED_STAND_INS:
                    continue
                number = finite_number(result.get(key))
                if number is not None:
                    metrics[key] = number
            if best is not None and better:
                metrics[f"best_{self.metric}"] = best
            latency = finite_number(result.get("latency_ms"))  # measured once per candidate
            if latency is not None:
                metrics["latency_ms"] = latency
        tags = {
            "node": result.get("node_id") or result.get("hostname"),
            "hostname": result.get("hostname"),
            "device": result.get("device"),
            "latency_device": result.get("latency_device"),
        }
        self._enqueue(
            {
                "op": "log",
                "trial_id": trial_id,
                "step": step,
                "timestamp": now_ms(),
                "metrics": metrics,
                "tags": {k: str(v) for k, v in tags.items() if v is not None},
            }
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = self._last_of(trial)
        self._close_trial(trial, self._final_status(last), "FINISHED", last)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close_trial(trial, "failed", "FAILED", self._last_of(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Tune also ends the experiment on Ctrl-C: trials still open were interrupted. Close
        # their runs as KILLED (a resume reopens them) so that none is left RUNNING.
        with self._records.lock:
            open_ids = [t for t in self._opened
                        if self._records.existing(t).get("status") == "running"]
        by_id = {t.trial_id: t for t in trials}
        for trial_id in open_ids:
            with self._records.lock:
                self._records.get(trial_id)["status"] = "interrupted"
            self._records.save()
            trial = by_id.get(trial_id)
            last = self._last_of(trial) if trial is not None else {}
            self._enqueue({
                "op": "close", "trial_id": trial_id, "status": "interrupted",
                "run_status": "KILLED", "best": None, "timestamp": now_ms(),
                "tags": {"status": "interrupted",
                         "epochs_done": str(int(last.get("epochs_done") or 0))},
            })
        if open_ids:
            logger.warning("Search interrupted with %d trial(s) unfinished; their MLflow runs "
                           "are closed as KILLED until the search is resumed", len(open_ids))
        deliver_or_keep(self._outbox, timeout_s=self.flush_timeout_s)
        # Tune's last save may have copied an older state file over ours: write it again
        self._records.save()

    # ---- public queries

    def status_counts(self) -> dict[str, int]:
        """Trials per final status (all five statuses present; 'running' if any are open)."""
        counts = {s: 0 for s in STATUSES}
        with self._records.lock:
            for _, rec in self._records.items():
                status = rec.get("status", "running")
                counts[status] = counts.get(status, 0) + 1
        return counts

    def best_trial(self) -> tuple[str, float, dict] | None:
        """(trial_id, best value, trial config) over trials with a real result, or None."""
        best: tuple[str, float, dict] | None = None
        for trial_id, rec in self._records.snapshot().items():
            value = rec.get("best")
            if value is None or rec.get("status") in ("diverged", "infeasible"):
                continue
            if best is None or (value > best[1] if self.mode == "max" else value < best[1]):
                best = (trial_id, float(value), rec.get("config") or {})
        return best

    def run_ids(self) -> dict[str, str]:
        """trial_id -> MLflow child run id for every trial that has a run so far."""
        with self._records.lock:
            return {t: r["run_id"] for t, r in self._records.items() if r.get("run_id")}

    def flush(self, *, timeout_s: float | None = None) -> bool:
        """Wait until every queued operation reached MLflow; False if it timed out."""
        return self._outbox.flush(timeout_s=timeout_s)

    def stop(self) -> None:
        """Stop the background thread (queued operations stay queued)."""
        self._outbox.stop()

    def pending_count(self) -> int:
        """Operations not yet delivered (queued or being sent)."""
        return self._outbox.pending_count()

    # ---- internals (driver side)

    def _open_trial(self, trial: Any) -> None:
        trial_id = trial.trial_id
        with self._records.lock:
            rec = self._records.get(trial_id)
            if trial_id in self._opened:
                return
            self._opened.add(trial_id)
            rec["status"] = "running"  # a resumed errored trial is live again
            rec["run_name"] = str(trial)
            config = dict(trial.config or {})
            rec["config"] = json.loads(json.dumps(config, default=str))
        candidate = _candidate_of(trial_id, config)
        tags = {
            TRIAL_ID_TAG: trial_id,
            "status": "running",
            "infeasible_reason": None if candidate is None else candidate.infeasible_reason,
        }
        metrics = {}
        if candidate is not None:
            for key, value in (("params", candidate.params), ("macs", candidate.macs)):
                number = finite_number(value)
                if number is not None:
                    metrics[key] = number
        self._enqueue(
            {
                "op": "open",
                "trial_id": trial_id,
                "run_name": str(trial),
                "params": {**candidate_params(config), **sampled_params(config)},
                "tags": {k: str(v) for k, v in tags.items() if v is not None},
                "metrics": metrics,
                "timestamp": now_ms(),
            }
        )

    def _final_status(self, last: Mapping[str, Any]) -> str:
        return trial_status(last, max_epochs=self.max_epochs)

    def _last_of(self, trial: Any) -> dict[str, Any]:
        seen = self._last_result.get(trial.trial_id)
        return seen if seen is not None else dict(getattr(trial, "last_result", None) or {})

    def _close_trial(
        self, trial: Any, status: str, run_status: str, last: Mapping[str, Any]
    ) -> None:
        self._open_trial(trial)
        with self._records.lock:
            rec = self._records.get(trial.trial_id)
            rec["status"] = status
            best = rec.get("best")
        self._records.save()
        tags = {"status": status, "epochs_done": int(last.get("epochs_done") or 0)}
        if status == "infeasible":
            candidate = _candidate_of(trial.trial_id, trial.config or {})
            if candidate is not None and candidate.infeasible_reason:
                tags["infeasible_reason"] = candidate.infeasible_reason
        self._enqueue(
            {
                "op": "close",
                "trial_id": trial.trial_id,
                "status": status,
                "run_status": run_status,
                "best": best,
                "tags": {k: str(v) for k, v in tags.items()},
                "timestamp": now_ms(),
            }
        )

    def _enqueue(self, op: Operation) -> None:
        self._outbox.put(op)
