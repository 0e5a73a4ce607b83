"""MLflow tracking for the Ray Tune search: one parent run per search, one child run per trial.

Tune's driver loop must never wait on the tracking server, so the callback only records what
happened and hands it to a background thread, which talks to MLflow (one ``log_batch`` per
result) and retries while the server is unreachable. Child runs are keyed by the Tune trial id
in a small JSON state file in the experiment directory, so a resumed search logs into the same
runs and never logs a step twice.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from ray.tune import Callback

from coatnet.search.checkpoints import atomic_write_bytes
from coatnet.search.results import STATUSES, trial_status

logger = logging.getLogger(__name__)

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "images_per_s", "epoch_time_s")
# A diverged trial reports 1e6 stand-ins for these; they would only wreck the charts.
_DIVERGED_STAND_INS = ("train_loss", "val_loss")
_SECRET_MARKERS = ("token", "password", "secret")
TRIAL_ID_TAG = "tune_trial_id"
PARENT_TAG = "mlflow.parentRunId"
SPACE_SHA_TAG = "space_sha256"


class TrackingServerUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached before the search started."""


# --------------------------------------------------------------------------- helpers


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """--mlflow-uri wins, then MLFLOW_TRACKING_URI, then a SQLite file in the cwd.

    The default is an absolute path so Ray workers and a later resume from another directory
    still hit the same database.
    """
    if cli_uri:
        return cli_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking_server(uri: str, *, timeout_s: float = 5) -> None:
    """Fail before any trial starts when an http(s) tracking server is unreachable.

    Otherwise hours of training would run while every log call times out in the background.
    Non-http URIs (sqlite, file) are local and need no check.
    """
    if not _is_http(uri):
        return
    base = uri.rstrip("/")
    problem = ""
    try:
        resp = requests.get(f"{base}/health", timeout=timeout_s)
        if resp.status_code == 200:
            return
        # /health may be hidden behind a proxy; the REST API answering at all is enough.
        resp = requests.get(
            f"{base}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            timeout=timeout_s,
        )
        if resp.status_code in (200, 401, 403):
            return
        problem = f"HTTP {resp.status_code}"
    except requests.RequestException as exc:
        problem = f"{type(exc).__name__}: {exc}"
    raise TrackingServerUnavailable(
        f"MLflow tracking server at {uri} is not reachable ({problem}). Start it, or pass "
        "another --mlflow-uri / MLFLOW_TRACKING_URI, before starting the search."
    )


def _is_secret(key: str) -> bool:
    low = key.lower()
    return any(marker in low for marker in _SECRET_MARKERS)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    return text[:MAX_PARAM_VAL_LENGTH]


def flatten_params(data: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """Flatten a nested dict into MLflow params (dotted keys, truncated values, no secrets)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if _is_secret(full):
            continue
        if isinstance(value, Mapping):
            out.update(flatten_params(value, full))
        else:
            out[full] = _param_value(value)
    return out


def candidate_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The flattened candidate.model.* and candidate.hparams.* of a Tune trial config."""
    candidate = config.get("candidate") or {}
    params: dict[str, str] = {}
    for section in ("model", "hparams"):
        value = candidate.get(section)
        if isinstance(value, Mapping):
            params.update(flatten_params(value, f"candidate.{section}"))
        elif value is None and section == "model":
            params["candidate.model"] = "None"
    return params


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _tags(mapping: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in mapping.items() if v is not None]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _atomic_write_json(path: Path, data: Any) -> None:
    """Write via a temp file + rename so a killed driver never leaves a torn state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, default=str, indent=1, sort_keys=True)
    atomic_write_bytes(path, text.encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable tracking state %s: %s", path, exc)
        return None


def _is_permanent(exc: BaseException) -> bool:
    """A 4xx answer will not change on retry (bad value, deleted run); everything else may."""
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code != 429
    return False


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
) -> str:
    """Create (or, on resume, reopen) the parent run of a search and return its id.

    Settings become params, the space file an artifact and its sha256 a tag, so any run in the
    UI can be traced back to the exact space that produced it.
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
        experiment_id = client.create_experiment(experiment_name)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={SPACE_SHA_TAG: space_sha256, "role": "search"},
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten_params(search_settings, "").items()]
    for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
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
    now = _now_ms()
    counts = {s: 0 for s in STATUSES}
    counts.update({k: int(v) for k, v in status_counts.items()})
    metrics = [Metric(f"trials_{k.replace('-', '_')}", float(v), now, 0) for k, v in counts.items()]
    metrics.append(Metric("trials_total", float(sum(counts.values())), now, 0))
    if best_value is not None and _finite_number(best_value) is not None:
        metrics.append(Metric(f"best_{metric}", float(best_value), now, 0))
    client.log_batch(run_id, metrics=metrics)
    for path in (leaderboard_csv, best_config_yaml):
        if path is not None and Path(path).exists():
            client.log_artifact(run_id, str(path))
        elif path is not None:
            logger.warning("Result file %s does not exist; not logged to MLflow", path)
    if infeasible_reasons:
        client.log_dict(run_id, dict(infeasible_reasons), "infeasible_reasons.json")
    client.set_terminated(run_id, status=status)


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


def pending_path_for(state_path: Path | str) -> Path:
    """The journal of unsent MLflow operations next to a tracking state file."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + ".pending.json")


def read_pending(state_path: Path | str) -> list[dict[str, Any]]:
    """Unsent operations journaled next to ``state_path`` (a torn last line is skipped)."""
    path = pending_path_for(state_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("Ignoring unreadable MLflow journal %s: %s", path, exc)
        return []
    if text.lstrip().startswith("["):  # the older format: one JSON list
        try:
            return [op for op in json.loads(text) if isinstance(op, dict)]
        except ValueError as exc:
            logger.warning("Ignoring unreadable MLflow journal %s: %s", path, exc)
            return []
    ops = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except ValueError:
            logger.warning("%s:%d: torn journal line skipped (the driver died while writing "
                           "it)", path, number)
            continue
        if isinstance(op, dict) and "op" in op:
            ops.append(op)
    return ops


def deliver_pending(*, tracking_uri: str, parent_run_id: str, state_path: Path | str,
                    max_epochs: int = 1, timeout_s: float = 120.0) -> int:
    """Send what earlier drivers left in the journal; returns how many operations are left."""
    callback = MLflowTrackingCallback(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                      state_path=state_path, max_epochs=max_epochs,
                                      flush_timeout_s=timeout_s)
    callback._replay_pending()
    try:
        if not callback.flush(timeout_s=timeout_s):
            callback._persist_pending()
    finally:
        callback.stop()
    return callback.pending_count()


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


STATE_FILE_NAME = "mlflow_runs.json"  # in the experiment directory (runner.run_search)
PARENT_PENDING_FILE = "mlflow_parent_pending.json"


def pending_tracking_operations(experiment_dir: Path | str) -> int:
    """How many MLflow operations of a search never reached the server (0: all arrived)."""
    experiment_dir = Path(experiment_dir)
    count = len(read_pending(experiment_dir / STATE_FILE_NAME))
    return count + int((experiment_dir / PARENT_PENDING_FILE).exists())


def finish_search_run(*, experiment_dir: Path | str, tracking_uri: str, parent_run_id: str,
                      trial_ids: Iterable[str] | None, finish: dict[str, Any]) -> bool:
    """End a finished search in MLflow: close orphaned children, drop runs of trials the
    search does not have, log the summary and close the parent. If MLflow is unreachable the
    arguments are saved (``PARENT_PENDING_FILE``) for the sync command; returns success."""
    experiment_dir = Path(experiment_dir)
    pending_file = experiment_dir / PARENT_PENDING_FILE
    try:
        if trial_ids is not None:
            delete_unknown_trial_runs(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                                      trial_ids=trial_ids)
        close_orphaned_runs(tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                            keep_run_ids=())
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
        _atomic_write_json(pending_file, {"parent_run_id": parent_run_id,
                                          "trial_ids": None if trial_ids is None
                                          else list(trial_ids), "finish": finish})
        return False
    pending_file.unlink(missing_ok=True)
    return True


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
    saved = _read_json(experiment_dir / PARENT_PENDING_FILE)
    if left == 0 and isinstance(saved, dict):
        finish_search_run(experiment_dir=experiment_dir, tracking_uri=uri,
                          parent_run_id=saved.get("parent_run_id", parent_run_id),
                          trial_ids=saved.get("trial_ids"), finish=saved["finish"])
    return pending_tracking_operations(experiment_dir)


# --------------------------------------------------------------------------- callback


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
        self._records: dict[str, dict[str, Any]] = {}
        self._load_state()

    # ---- pickling: Tune pickles RunConfig (and so this callback) into tuner.pkl

    def _init_runtime(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._ops: collections.deque[dict[str, Any]] = collections.deque()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None
        self._last_result: dict[str, dict[str, Any]] = {}
        self._outage_since: float | None = None
        # Per-driver facts: which trials were announced here and whose run was verified in
        # MLflow since this driver started (a resume must re-verify, so never persisted).
        self._opened: set[str] = set()
        self._checked: set[str] = set()
        self._seq = 0  # numbers journal lines; ops are applied in this order


    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_lock", "_cond", "_ops", "_busy", "_stop", "_thread", "_client",
                    "_last_result", "_outage_since", "_opened", "_checked", "_seq"):
            state.pop(key, None)
        state["_records"] = {}  # the state file is the source of truth, and newer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()
        self._load_state()  # a restored Tuner unpickles us; the state file is newer

    @property
    def _pending_path(self) -> Path:
        """The journal of unsent operations (JSON lines; an older driver wrote a JSON list).

        Every operation is appended here before it is queued and the file is removed whenever
        the queue drains, so a driver killed with SIGKILL loses nothing: the next driver (a
        resume) or ``deliver_pending`` (the sync command) sends what is left. Replaying is
        safe: runs are found by tag before one is created, steps already in MLflow are skipped
        and closing a run twice is harmless.
        """
        return pending_path_for(self.state_path)

    # ---- state file

    def _load_state(self) -> None:
        """Adopt records of this parent run from the state file (a resumed search)."""
        data = _read_json(self.state_path) or {}
        with self._lock:
            for trial_id, rec in data.items():
                if not isinstance(rec, dict) or rec.get("parent_run_id") not in (
                    None,
                    self.parent_run_id,
                ):
                    continue
                mine = self._records.setdefault(trial_id, {})
                last_step = max(int(rec.get("last_step") or 0), int(mine.get("last_step") or 0))
                mine.update(rec)
                mine["last_step"] = last_step

    def _replay_pending(self) -> None:
        """Queue what an earlier driver could not send (only when this one really runs)."""
        pending = read_pending(self.state_path)
        with self._cond:
            if pending:
                logger.info("Replaying %d MLflow operation(s) left by a previous driver",
                            len(pending))
                queued = list(self._ops)
                self._ops.clear()
                self._ops.extend(pending)
                self._ops.extend(queued)
                self._seq = 0
                for op in self._ops:
                    self._seq += 1
                    op["seq"] = self._seq
                self._rewrite_journal()
                self._cond.notify_all()
            elif not self._ops:
                self._pending_path.unlink(missing_ok=True)

    def _rewrite_journal(self) -> None:
        """Replace the journal with the queue as it is (caller holds the lock)."""
        ops = list(self._ops)
        if not ops:
            self._pending_path.unlink(missing_ok=True)
            return
        self._pending_path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(op, default=str) + "\n" for op in ops)
        atomic_write_bytes(self._pending_path, text.encode())

    def _journal(self, op: dict[str, Any]) -> None:
        """Append one operation to the journal (caller holds the lock)."""
        try:
            self._pending_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._pending_path, "a") as fh:
                fh.write(json.dumps(op, default=str) + "\n")
        except OSError as exc:
            logger.warning("Could not journal an MLflow operation to %s: %s",
                           self._pending_path, exc)

    def _save_state(self) -> None:
        with self._lock:
            snapshot = copy.deepcopy(self._records)
        try:
            _atomic_write_json(self.state_path, snapshot)
        except OSError as exc:
            logger.warning("Could not write MLflow tracking state %s: %s", self.state_path, exc)

    def _record(self, trial_id: str) -> dict[str, Any]:
        rec = self._records.setdefault(trial_id, {})
        rec.setdefault("parent_run_id", self.parent_run_id)
        rec.setdefault("last_step", 0)
        rec.setdefault("status", "running")
        return rec

    # ---- Tune hooks (driver thread: no network I/O here)

    def setup(self, **info: Any) -> None:
        self._replay_pending()
        self._ensure_thread()

    def get_state(self) -> dict | None:
        with self._lock:
            return {"records": copy.deepcopy(self._records)}

    def set_state(self, state: dict) -> None:
        with self._lock:
            for trial_id, rec in (state or {}).get("records", {}).items():
                mine = self._records.setdefault(trial_id, {})
                for key, value in rec.items():
                    if key == "last_step":
                        # The state file is written after each successful log, so it is newer.
                        mine[key] = max(int(value or 0), int(mine.get(key, 0) or 0))
                    elif mine.get(key) is None:
                        mine[key] = value

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
        value = _finite_number(result.get(self.metric))
        better = False
        with self._lock:
            rec = self._record(trial_id)
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
                number = _finite_number(result.get(key))
                if number is not None:
                    metrics[key] = number
            if best is not None and better:
                metrics[f"best_{self.metric}"] = best
        tags = {
            "node": result.get("node_id") or result.get("hostname"),
            "hostname": result.get("hostname"),
            "device": result.get("device"),
        }
        self._enqueue(
            {
                "op": "log",
                "trial_id": trial_id,
                "step": step,
                "timestamp": _now_ms(),
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
        with self._lock:
            open_ids = [t for t in self._opened
                        if self._records.get(t, {}).get("status") == "running"]
        by_id = {t.trial_id: t for t in trials}
        for trial_id in open_ids:
            with self._lock:
                self._records[trial_id]["status"] = "interrupted"
            self._save_state()
            trial = by_id.get(trial_id)
            last = self._last_of(trial) if trial is not None else {}
            self._enqueue({
                "op": "close", "trial_id": trial_id, "status": "interrupted",
                "run_status": "KILLED", "best": None, "timestamp": _now_ms(),
                "tags": {"status": "interrupted",
                         "epochs_done": str(int(last.get("epochs_done") or 0))},
            })
        if open_ids:
            logger.warning("Search interrupted with %d trial(s) unfinished; their MLflow runs "
                           "are closed as KILLED until the search is resumed", len(open_ids))
        if not self.flush(timeout_s=self.flush_timeout_s):
            self._persist_pending()
        self.stop()

    # ---- public queries

    def status_counts(self) -> dict[str, int]:
        """Trials per final status (all five statuses present; 'running' if any are open)."""
        counts = {s: 0 for s in STATUSES}
        with self._lock:
            for rec in self._records.values():
                status = rec.get("status", "running")
                counts[status] = counts.get(status, 0) + 1
        return counts

    def best_trial(self) -> tuple[str, float, dict] | None:
        """(trial_id, best value, trial config) over trials with a real result, or None."""
        best: tuple[str, float, dict] | None = None
        with self._lock:
            for trial_id, rec in self._records.items():
                value = rec.get("best")
                if value is None or rec.get("status") in ("diverged", "infeasible"):
                    continue
                if best is None or (value > best[1] if self.mode == "max" else value < best[1]):
                    best = (trial_id, float(value), copy.deepcopy(rec.get("config") or {}))
        return best

    def run_ids(self) -> dict[str, str]:
        """trial_id -> MLflow child run id for every trial that has a run so far."""
        with self._lock:
            return {t: r["run_id"] for t, r in self._records.items() if r.get("run_id")}

    def flush(self, *, timeout_s: float | None = None) -> bool:
        """Wait until every queued operation reached MLflow; False if it timed out."""
        self._ensure_thread()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._ops or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    logger.warning(
                        "MLflow at %s: %d operation(s) still unsent after %.0fs",
                        self.tracking_uri,
                        len(self._ops) + int(self._busy),
                        timeout_s,
                    )
                    return False
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
        return True

    def stop(self) -> None:
        """Stop the background thread (queued operations stay queued)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    # ---- internals (driver side)

    def _open_trial(self, trial: Any) -> None:
        trial_id = trial.trial_id
        with self._lock:
            rec = self._record(trial_id)
            if trial_id in self._opened:
                return
            self._opened.add(trial_id)
            rec["status"] = "running"  # a resumed errored trial is live again
            rec["run_name"] = str(trial)
            config = dict(trial.config or {})
            rec["config"] = json.loads(json.dumps(config, default=str))
        candidate = config.get("candidate") or {}
        tags = {
            TRIAL_ID_TAG: trial_id,
            "status": "running",
            "infeasible_reason": candidate.get("infeasible_reason"),
        }
        metrics = {}
        for key in ("params", "macs"):
            number = _finite_number(candidate.get(key))
            if number is not None:
                metrics[key] = number
        self._enqueue(
            {
                "op": "open",
                "trial_id": trial_id,
                "run_name": str(trial),
                "params": candidate_params(config),
                "tags": {k: str(v) for k, v in tags.items() if v is not None},
                "metrics": metrics,
                "timestamp": _now_ms(),
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
        with self._lock:
            rec = self._record(trial.trial_id)
            rec["status"] = status
            best = rec.get("best")
        self._save_state()
        tags = {"status": status, "epochs_done": int(last.get("epochs_done") or 0)}
        candidate = (trial.config or {}).get("candidate") or {}
        if status == "infeasible" and candidate.get("infeasible_reason"):
            tags["infeasible_reason"] = candidate["infeasible_reason"]
        self._enqueue(
            {
                "op": "close",
                "trial_id": trial.trial_id,
                "status": status,
                "run_status": run_status,
                "best": best,
                "tags": {k: str(v) for k, v in tags.items()},
                "timestamp": _now_ms(),
            }
        )

    def _enqueue(self, op: dict[str, Any]) -> None:
        with self._cond:
            self._seq += 1
            op["seq"] = self._seq
            self._journal(op)
            self._ops.append(op)
            self._cond.notify_all()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = False
            self._thread = threading.Thread(
                target=self._worker, name="mlflow-tracking", daemon=True
            )
            self._thread.start()

    def _persist_pending(self) -> None:
        """Keep unsent operations on disk; the next driver (a resume) replays them."""
        with self._lock:
            pending = len(self._ops)
            if pending:
                try:
                    self._rewrite_journal()  # compact: drop what was sent meanwhile
                except OSError as exc:
                    logger.warning("Could not save unsent MLflow operations: %s", exc)
                    return
        if pending:
            logger.warning(
                "Saved %d unsent MLflow operation(s) to %s; a resume or "
                "`python experiments/sync_mlflow.py` will send them", pending,
                self._pending_path)

    def pending_count(self) -> int:
        """Operations not yet delivered (queued or being sent)."""
        with self._lock:
            return len(self._ops)

    # ---- internals (background thread)

    def _worker(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                while not self._ops and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                op = self._ops[0]
                self._busy = True
            done = True
            try:
                self._apply(op)
                if self._outage_since is not None:
                    logger.warning(
                        "MLflow at %s reachable again after %.0fs; sending queued data",
                        self.tracking_uri,
                        time.monotonic() - self._outage_since,
                    )
                    self._outage_since = None
                delay = 0.5
            except Exception as exc:  # never let tracking break the search
                if _is_permanent(exc):
                    logger.warning("MLflow rejected %s for trial %s, dropped: %s",
                                   op.get("op"), op.get("trial_id"), exc)
                else:
                    done = False
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        logger.warning(
                            "MLflow at %s unreachable (%s); keeping %d operation(s) queued "
                            "and retrying",
                            self.tracking_uri,
                            exc,
                            len(self._ops),
                        )
                    else:
                        logger.debug("MLflow retry failed: %s", exc)
            with self._cond:
                if done and self._ops and self._ops[0] is op:
                    self._ops.popleft()
                    if not self._ops:  # everything delivered: the journal is obsolete
                        try:
                            self._pending_path.unlink(missing_ok=True)
                        except OSError:
                            pass
                self._busy = False
                self._cond.notify_all()
                if not done:
                    self._cond.wait(timeout=delay)
                    delay = min(delay * 2, self.retry_max_s)

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _experiment(self) -> str:
        if self.experiment_id is None:
            self.experiment_id = self._mlflow().get_run(self.parent_run_id).info.experiment_id
        return self.experiment_id

    def _apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        run_id = self._ensure_run(op)
        client = self._mlflow()
        if kind == "open":
            return
        with self._lock:
            rec = self._record(op["trial_id"])
            last_step = int(rec.get("last_step") or 0)
        if kind == "log":
            step = int(op["step"])
            metrics = op["metrics"]
            if step >= 1 and step <= last_step:
                metrics = {}  # already logged (resume replays from a checkpoint)
            entries = [Metric(k, v, op["timestamp"], step) for k, v in metrics.items()]
            tags = _tags(op["tags"])
            if entries or tags:
                client.log_batch(run_id, metrics=entries, tags=tags)
            if metrics and step > last_step:
                with self._lock:
                    rec["last_step"] = step
                self._save_state()
        elif kind == "close":
            client.log_batch(run_id, tags=_tags(op["tags"]))
            client.set_terminated(run_id, status=op["run_status"], end_time=op["timestamp"])
            with self._lock:
                rec["closed_status"] = op["run_status"]
            self._save_state()

    def _ensure_run(self, op: dict[str, Any]) -> str:
        """The trial's child run: from the state file, else by tag, else newly created.

        Searching by tag before creating also makes a retried create (lost response) safe.
        """
        trial_id = op["trial_id"]
        client = self._mlflow()
        with self._lock:
            rec = self._record(trial_id)
            run_id = rec.get("run_id")
            checked = trial_id in self._checked
        if run_id and checked:
            return run_id
        reopened = False
        if not run_id:
            found = client.search_runs(
                [self._experiment()],
                filter_string=(
                    f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
                    f"and tags.{TRIAL_ID_TAG} = '{trial_id}'"
                ),
                max_results=10,
                order_by=["attributes.start_time ASC"],
            )
            if len(found) > 1:
                logger.warning(
                    "Trial %s has %d MLflow runs; using the oldest", trial_id, len(found)
                )
            if found:
                run_id = found[0].info.run_id
                reopened = True
                if found[0].data.params:
                    with self._lock:
                        rec["params_logged"] = True
        else:
            reopened = True
        if run_id is None:
            run_name = op.get("run_name") or rec.get("run_name") or trial_id
            run = client.create_run(
                self._experiment(),
                run_name=run_name,
                tags={PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial_id, "status": "running"},
            )
            run_id = run.info.run_id
            with self._lock:
                rec["run_id"] = run_id
            self._save_state()
        else:
            # Resumed: whatever the state file says, never re-log a step MLflow already has.
            history = client.get_metric_history(run_id, "val_accuracy")
            logged = max((m.step for m in history), default=0)
            info = client.get_run(run_id).info
            if info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            with self._lock:
                rec["run_id"] = run_id
                rec["last_step"] = max(int(rec.get("last_step") or 0), int(logged))
            self._save_state()
        # Params are immutable in MLflow; identical re-logs are fine, so a retry is harmless.
        already = reopened and bool(rec.get("params_logged"))
        params = op.get("params") if op["op"] == "open" else None
        if params and not already:
            items = [Param(k, v) for k, v in params.items()]
            for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
                try:
                    client.log_batch(run_id, params=chunk)
                except MlflowException as exc:
                    if not _is_permanent(exc):
                        raise
                    logger.warning("MLflow rejected params of trial %s: %s", trial_id, exc)
        if op["op"] == "open":
            metrics = [] if already else [
                Metric(k, v, op["timestamp"], 0) for k, v in op.get("metrics", {}).items()
            ]
            client.log_batch(run_id, metrics=metrics, tags=_tags(op.get("tags", {})))
        with self._lock:
            self._checked.add(trial_id)
            if op["op"] == "open":
                rec["params_logged"] = True
        self._save_state()
        return run_id
