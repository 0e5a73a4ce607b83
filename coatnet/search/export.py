"""What a finished search leaves behind, and the ``SearchOutcome`` the CLI gets.

Once every trial has ended, ``export_search`` turns Tune's results into the leaderboard, picks
the model ``best_config.yaml`` describes (with several objectives: the most accurate member of
the Pareto front, or the one ``--pick`` asks for), evaluates the chosen trials on the held-out
test split, writes the front's files (``coatnet.search.front``), closes the Optuna study's
orphans, draws the sweep's figures from it (``coatnet.search.figures``) and settles MLflow
(child runs to their final status, the parent's summary and files).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coatnet.search.front import objectives_of
from coatnet.search.plan import SearchPlan

logger = logging.getLogger("coatnet.search")

__all__ = ["SearchOutcome", "export_search"]


@dataclass
class SearchOutcome:
    """What a finished search hands back to the CLI."""

    experiment_dir: Path
    leaderboard_csv: Path
    best_config_yaml: Path | None
    best_checkpoint: str | None
    best_value: float | None
    status_counts: dict[str, int]
    parent_run_id: str
    tracking_uri: str
    rows: list[Any]
    metric: str
    best_test_accuracy: float | None = None  # the winner on the held-out test split
    mlflow_pending: int = 0  # MLflow operations not delivered (sync_mlflow.py sends them)
    front: tuple[Any, ...] = ()  # several objectives: the Pareto front, cheapest first
    pareto_csv: Path | None = None
    pareto_plot: Path | None = None
    hypervolume: float | None = None
    objectives: tuple[Any, ...] = ()
    best_model_uri: str | None = None  # the best trial's logged MLflow model
    registered_model_uri: str | None = None  # models:/NAME/VERSION with --register-model
    figures: tuple[Path, ...] = ()  # the sweep's pictures (also under figures/ on the parent)


def export_search(plan: SearchPlan, grid: Any, *, parent_run_id: str) -> SearchOutcome:
    """Leaderboard, best config and (several objectives) the Pareto front into the experiment
    directory; close the parent run."""
    from coatnet.search import results as results_mod
    from coatnet.search.front import export_front, front_of, hypervolume_history
    from coatnet.search.tracking import finish_search_run, pending_tracking_operations

    metric, mode = plan.space.search.metric, plan.space.search.mode
    objectives = objectives_of(plan.space.search)
    rows = results_mod.leaderboard(grid, metric=metric, mode=mode,
                                   max_epochs=plan.trial.epochs)
    front_ids: set[str] = set()
    if len(objectives) > 1:
        front_ids = {r.trial_id for r in front_of(rows, objectives, metric=metric)}
        rows = [dataclasses.replace(r, on_front=r.trial_id in front_ids) for r in rows]
    best = _pick(plan, rows)
    rows = _with_test_accuracy(plan, rows, evaluate={r.trial_id for r in rows if r.on_front}
                               | ({best.trial_id} if best is not None else set()))
    best = next((r for r in rows if best is not None and r.trial_id == best.trial_id), None)
    files = results_mod.export(rows, plan.experiment_dir, metric=metric, best=best)
    counts = results_mod.status_counts(rows)
    finish = {
        "status_counts": counts, "best_value": None if best is None else best.best_value,
        "trial_status": {r.trial_id: r.status for r in rows},
        "test_accuracy": {r.trial_id: r.test_accuracy for r in rows
                          if r.test_accuracy is not None},
        "best_trial_id": None if best is None else best.trial_id,
        "leaderboard_csv": str(files.leaderboard_csv),
        "best_config_yaml": None if files.best_config_yaml is None
        else str(files.best_config_yaml),
        "metric": metric,
        "infeasible_reasons": {r.trial_id: (r.candidate and r.candidate.infeasible_reason) or ""
                               for r in rows if r.status == "infeasible"}}
    front_files = None
    if len(objectives) > 1:
        front_files = export_front(rows, plan.experiment_dir, objectives=objectives,
                                   metric=metric)
        finish["front"] = {
            "pareto_csv": str(front_files.pareto_csv),
            "plot": None if front_files.plot is None else str(front_files.plot),
            "configs": [str(p) for p in front_files.configs],
            "members": [r.trial_id for r in front_files.front],
            "hypervolume": front_files.hypervolume,
            "reference": list(front_files.reference),
            "objectives": [f"{o.metric}:{o.mode}" for o in objectives],
            "history": hypervolume_history(rows, objectives, metric=metric,
                                           reference=front_files.reference)}
        logger.info("Pareto front of %s: %d trial(s), hypervolume %.6g at reference %s",
                    plan.name, len(front_files.front), front_files.hypervolume,
                    front_files.reference)
    finish["models"] = _models_to_log(plan, rows, best=best)
    finish["dataset"] = _dataset(plan)
    if plan.register_model:
        finish["register_model"] = plan.register_model
    finish["search_name"] = plan.name
    _close_study(plan, trial_ids=[r.trial_id for r in rows])
    finish["figures"] = _figures(plan)
    # every trial has ended: MLflow's child runs are settled to the leaderboard's statuses
    finish_search_run(experiment_dir=plan.experiment_dir, tracking_uri=plan.tracking_uri,
                      parent_run_id=parent_run_id, trial_ids=[r.trial_id for r in rows],
                      finish=finish)
    pending = pending_tracking_operations(plan.experiment_dir)
    if pending:
        logger.warning("MLflow at %s did not receive %d operation(s); they are kept in %s. "
                       "Send them with: python experiments/sync_mlflow.py %s",
                       plan.tracking_uri, pending, plan.experiment_dir, plan.experiment_dir)
    return SearchOutcome(experiment_dir=plan.experiment_dir,
                         leaderboard_csv=files.leaderboard_csv,
                         best_config_yaml=files.best_config_yaml,
                         best_checkpoint=None if best is None else best.checkpoint,
                         best_value=None if best is None else best.best_value,
                         best_test_accuracy=None if best is None else best.test_accuracy,
                         status_counts=counts, parent_run_id=parent_run_id,
                         tracking_uri=plan.tracking_uri, rows=rows, metric=metric,
                         mlflow_pending=pending,
                         front=() if front_files is None else front_files.front,
                         pareto_csv=None if front_files is None else front_files.pareto_csv,
                         pareto_plot=None if front_files is None else front_files.plot,
                         hypervolume=None if front_files is None
                         else front_files.hypervolume,
                         objectives=tuple(objectives),
                         best_model_uri=None if best is None
                         else finish.get("model_uris", {}).get(best.trial_id),
                         registered_model_uri=finish.get("model_uris", {}).get("registered"),
                         figures=tuple(Path(p) for p in finish["figures"]))


def _pick(plan: SearchPlan, rows: list[Any]) -> Any:
    """The row ``best_config.yaml`` describes: the most accurate front member that meets the
    ``--pick`` rule (several objectives), else the most accurate trial with a value."""
    from coatnet.search.front import pick_best

    metric, mode = plan.space.search.metric, plan.space.search.mode
    front = [r for r in rows if r.on_front]
    most_accurate = next((r for r in rows if r.best_value is not None), None)
    if not front and not plan.pick:
        return most_accurate
    candidates = front or [r for r in rows if r.status == "completed"]
    chosen = pick_best(candidates, plan.pick, metric=metric, mode=mode)
    if chosen is None and plan.pick:
        logger.warning("no trial on the front meets --pick %s; best_config.yaml is the most "
                       "accurate one instead", ",".join(str(c) for c in plan.pick))
        chosen = pick_best(candidates, (), metric=metric, mode=mode)
    return chosen or most_accurate


def _with_test_accuracy(plan: SearchPlan, rows: list[Any], *, evaluate: set[str]) -> list[Any]:
    """The rows, those in ``evaluate`` (the best, the front) carrying their accuracy on the
    held-out test split."""
    from coatnet.search.evaluation import evaluate_rows

    chosen = [r for r in rows if r.trial_id in evaluate and r.best_value is not None]
    scores = evaluate_rows(chosen, data=plan.data, seed=plan.space.search.seed)
    return [dataclasses.replace(r, test_accuracy=scores[r.trial_id])
            if r.trial_id in scores else r for r in rows]


def _models_to_log(plan: SearchPlan, rows: list[Any], *, best: Any) -> list[dict[str, Any]]:
    """What ``finish_search_run`` logs as MLflow models (``--log-models``): the best trial, and
    with ``front`` every Pareto-front member, each with the settings that trained it (the Tune
    trial config: what a fine-tune at another resolution needs)."""
    if plan.log_models == "none" or best is None:
        return []
    chosen = [best] + [r for r in rows if plan.log_models == "front" and r.on_front
                       and r.trial_id != best.trial_id]
    settings = plan.space.search
    return [{"trial_id": r.trial_id, "checkpoint": r.checkpoint,
             "role": "best" if r.trial_id == best.trial_id else "front",
             "trial": {"trial_id": r.trial_id, "candidate": r.candidate.to_dict(),
                       "data": dict(plan.data), "trial": plan.trial.to_dict(),
                       "seed": settings.seed, "latency": settings.latency.model_dump()}}
            for r in chosen if r.checkpoint and r.candidate is not None]


def _dataset(plan: SearchPlan) -> dict[str, Any] | None:
    """The dataset record MLflow gets as every run's input (None when it cannot be loaded
    here: the search is done, the record is a nicety)."""
    from coatnet.search.data import load_splits
    from coatnet.search.tracking.summary import dataset_record

    try:  # cached in-process: the test evaluation loaded it already
        info = load_splits(plan.data, seed=plan.space.search.seed).info
    except Exception as err:  # noqa: BLE001
        logger.warning("dataset not described in MLflow: %s: %s", type(err).__name__, err)
        return None
    return dataset_record(plan.data, seed=plan.space.search.seed, info=info.to_dict())


def _close_study(plan: SearchPlan, *, trial_ids: list[str]) -> None:
    """No Optuna trial stays RUNNING: fail the asks of killed drivers that Tune never saved."""
    from coatnet.search.searcher import STUDY_FILE, close_orphans, storage_url

    if (plan.experiment_dir / STUDY_FILE).exists():  # searches from before the stored study
        close_orphans(storage=storage_url(plan.experiment_dir), study_name=plan.name,
                      trial_ids=trial_ids)


FIGURES_DIR = "figures"  # in the experiment directory, and on the parent run


def _figures(plan: SearchPlan) -> list[str]:
    """The sweep's pictures, drawn anew from the stored study at every finish (a resumed
    search's too); none when there is no study or it cannot be read (never raises)."""
    from coatnet.search.searcher import STUDY_FILE, storage_url

    if not (plan.experiment_dir / STUDY_FILE).exists():
        return []
    try:
        import optuna

        from coatnet.search.figures import write_figures

        study = optuna.load_study(study_name=plan.name, storage=storage_url(plan.experiment_dir))
        drawn = write_figures(study, plan.experiment_dir / FIGURES_DIR,
                              metric=plan.space.search.metric, mode=plan.space.search.mode)
    except Exception as err:  # noqa: BLE001 - pictures are a nicety; the results are written
        logger.warning("figures not drawn: %s: %s", type(err).__name__, err)
        return []
    for reason in drawn.skipped:
        logger.info("figure skipped: %s", reason)
    return [str(p) for p in drawn.paths]
