"""MLflow tracking for the Ray Tune search: one parent run per search, one child run per trial.

Tune's driver loop must never wait on the tracking server, so the callback only records what
happened and hands it to a background thread, which talks to MLflow (one ``log_batch`` per
result) and retries while the server is unreachable. Child runs are keyed by the Tune trial id
in a small JSON state file in the experiment directory, so a resumed search logs into the same
runs and never logs a step twice.

One idea per module, imported in one direction (each only from those above it):

- ``params``: what MLflow is given (flattened params without secrets, finite numbers);
  ``server``: which tracking server, and whether it answers;
- ``outbox``: a general durable outbox (journal file, replay, one delivery thread, retries);
- ``records``: the per-trial records and their state file (``mlflow_runs.json``);
- ``mlflow_ops``: applying one operation to a child run; the outbox that feeds it;
- ``summary``: what a finished search adds (test accuracy, the front, the leaderboard table);
- ``models``: trained models as MLflow models on their trial runs, the registry, reading back;
- ``runs``: the parent run's life cycle, orphaned children, delivering unsent data later;
- ``callback``: the thin Tune callback that turns trial events into operations.
"""

from __future__ import annotations

from coatnet.search.errors import TrackingServerUnavailable
from coatnet.search.tracking.callback import EPOCH_METRICS, MLflowTrackingCallback
from coatnet.search.tracking.mlflow_ops import (
    PARENT_TAG,
    TRIAL_ID_TAG,
    pending_path_for,
    read_pending,
)
from coatnet.search.tracking.params import MAX_PARAM_VAL_LENGTH, candidate_params, flatten_params
from coatnet.search.tracking.runs import (
    PARENT_PENDING_FILE,
    SPACE_SHA_TAG,
    STATE_FILE_NAME,
    close_orphaned_runs,
    delete_unknown_trial_runs,
    deliver_pending,
    finish_parent_run,
    finish_search_run,
    pending_tracking_operations,
    search_trial_ids,
    settle_child_runs,
    start_parent_run,
    sync_experiment,
)
from coatnet.search.tracking.server import check_tracking_server, resolve_tracking_uri

__all__ = [
    "EPOCH_METRICS",
    "MAX_PARAM_VAL_LENGTH",
    "PARENT_PENDING_FILE",
    "PARENT_TAG",
    "SPACE_SHA_TAG",
    "STATE_FILE_NAME",
    "TRIAL_ID_TAG",
    "MLflowTrackingCallback",
    "TrackingServerUnavailable",
    "candidate_params",
    "check_tracking_server",
    "close_orphaned_runs",
    "delete_unknown_trial_runs",
    "deliver_pending",
    "finish_parent_run",
    "finish_search_run",
    "flatten_params",
    "pending_path_for",
    "pending_tracking_operations",
    "read_pending",
    "resolve_tracking_uri",
    "search_trial_ids",
    "settle_child_runs",
    "start_parent_run",
    "sync_experiment",
]
