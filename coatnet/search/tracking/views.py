"""How MLflow's UI opens a search's experiment: on its training runs, in a saved trials view.

Three experiment tags, written when the parent run is created (``set_experiment_views``):

* ``mlflow.experimentKind``: a model-training experiment, so MLflow 3 lists the runs rather
  than the GenAI overview. MLflow 3.17 also keeps a per-browser GenAI / Model training switch
  that wins over the tag; ``experiment_url`` and ``view_url`` carry
  ``workflowType=machine_learning``, so a fresh browser lands on the runs too.
* ``mlflow.experiment.primaryMetric.name``: the summary metric (``best_<metric>``), which MLflow
  charts first.
* ``mlflow.sharedViewState.<VIEW_KEY>``: a saved view (MLflow 3.15+ stores views as experiment
  tags, in an envelope ``{name, createdAt, updatedAt, state}``): every run listed, best first,
  with the summary metric and sampled-parameter columns, and chart cards for the validation
  curves, accuracy against cost and the parallel coordinates of the sampled parameters. MLflow
  leaves expanded rows out of shared views, so the trials are listed flat, sorted by the
  metric, rather than nested under a collapsed parent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from urllib.parse import quote

from mlflow.tracking import MlflowClient

__all__ = ["EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND", "PRIMARY_METRIC_TAG", "VIEW_KEY",
           "VIEW_NAME", "VIEW_TAG_PREFIX", "experiment_url", "run_url", "set_experiment_views",
           "view_state", "view_url"]

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "coatnet-search-trials"
VIEW_NAME = "coatnet-search: trials, best first"
_TRAINING_WORKFLOW = "workflowType=machine_learning"
# summary metrics the trial runs carry as single values (the compare page plots these)
SUMMARY_METRICS = ("test_accuracy", "macs", "params", "latency_ms")
CURVES = ("val_accuracy", "val_loss", "train_loss")


def _column(kind: str, key: str) -> str:
    """An ag-grid column id of MLflow's runs table, e.g. ``metrics.`best_val_accuracy```."""
    return f"{kind}.`{key}`"


def _card(kind: str, uuid: str, section: str, **fields: object) -> dict:
    """A chart card as MLflow's UI serialises one (its card classes' defaults, then ours)."""
    base: dict = {"uuid": uuid, "type": kind, "runsCountToCompare": 100,
                  "metricSectionId": section, "deleted": False, "isGenerated": False}
    if kind == "LINE":
        base.update({"metricKey": "", "lineSmoothness": 0, "xAxisScaleType": "linear",
                     "scaleType": "linear", "range": {}, "xAxisKey": "step",
                     "selectedXAxisMetricKey": "", "yAxisKey": "metric",
                     "yAxisExpressions": [], "ignoreOutliers": False,
                     "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False})
    elif kind == "SCATTER":
        base.update({"xaxis": {"key": "", "type": "METRIC"},
                     "yaxis": {"key": "", "type": "METRIC"}})
    elif kind == "PARALLEL":
        base.update({"selectedParams": [], "selectedMetrics": [], "showAllRuns": False})
    base.update(fields)
    return base


def view_state(*, metric: str, mode: str, params: Sequence[str],
               cost: str | None = "macs") -> dict:
    """The saved view's state: search facets and UI state, as MLflow's runs page keeps them."""
    best = f"best_{metric}"
    section = "coatnet-search"
    cards = [_card("LINE", f"{section}-curve-{key}", section, metricKey=key,
                   selectedMetricKeys=[key], displayName=key) for key in CURVES]
    if cost:
        cards.append(_card("SCATTER", f"{section}-cost", section,
                           xaxis={"key": cost, "type": "METRIC"},
                           yaxis={"key": best, "type": "METRIC"}))
    if params:
        cards.append(_card("PARALLEL", f"{section}-parallel", section,
                           selectedParams=list(params), selectedMetrics=[best],
                           displayName="sampled parameters"))
    columns = [_column("metrics", key) for key in (best, *SUMMARY_METRICS)]
    columns += [_column("params", key) for key in params]
    columns += [_column("attributes", key) for key in ("Models", "Dataset")]
    return {
        # search facets
        "orderByKey": _column("metrics", best), "orderByAsc": mode == "min",
        "searchFilter": "", "startTime": "ALL", "lifecycleFilter": "Active",
        "datasetsFilter": [], "modelVersionFilter": "All Runs",
        # UI state
        "selectedColumns": columns, "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": cards,
        "compareRunSections": [{"uuid": section, "name": "coatnet-search", "display": True,
                                "isReordered": False, "deleted": False,
                                "isGenerated": False}],
        "isAccordionReordered": True, "hideEmptyCharts": False,
        "viewMaximized": False, "runListHidden": False, "groupBy": None,
        "useGroupedValuesInCharts": True, "chartsSearchFilter": ""}


def set_experiment_views(client: MlflowClient, experiment_id: str, *, metric: str, mode: str,
                         params: Sequence[str], cost: str | None = "macs",
                         tags: dict[str, str] | None = None) -> None:
    """Write the three tags (a kind the user chose for the experiment stays)."""
    existing = dict(tags or {})
    if EXPERIMENT_KIND_TAG not in existing:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    client.set_experiment_tag(experiment_id, PRIMARY_METRIC_TAG, f"best_{metric}")
    now = int(time.time() * 1000)
    envelope = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now,
                "state": json.dumps(view_state(metric=metric, mode=mode, params=params,
                                               cost=cost))}
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(envelope))


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs page in MLflow's UI at ``base`` (``http://host:port``)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{_TRAINING_WORKFLOW}"


def run_url(base: str, experiment_id: str, run_id: str, *, artifact: str | None = None) -> str:
    """A run's page (or one of its artifacts) in MLflow's UI, in the training-runs sidebar."""
    page = f"artifacts/{artifact}" if artifact else "overview"
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/{page}"
            f"?{_TRAINING_WORKFLOW}")


def view_url(base: str, experiment_id: str) -> str:
    """The experiment's runs page opened in the saved trials view."""
    return f"{experiment_url(base, experiment_id)}&viewStateShareKey={quote(VIEW_KEY)}"
