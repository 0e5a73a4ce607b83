"""Run one search: Optuna TPE + ASHA in a Ray Tune ``Tuner`` over ``run_trial``.

``run_search`` plans the search first (``coatnet.search.plan``: everything the user can get
wrong is checked before Ray starts or any directory or MLflow run is created), then starts or
restores the ``Tuner``, and at the end exports the results and closes the MLflow parent run.
A search lives in ``<storage_path>/<name>``; running the same name again (or ``--resume``)
continues it: finished trials are kept, unfinished ones continue from their last checkpoint,
the Optuna study carries on and MLflow keeps one child run per trial.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coatnet.search import cluster
from coatnet.search.errors import SearchInputError, SearchInterrupted
from coatnet.search.faults import CONFIG_KEY as FAULTS_CONFIG_KEY
from coatnet.search.export import SearchOutcome, export_search
from coatnet.search.faults import FaultPlan
from coatnet.search.front import objectives_of
from coatnet.search.interrupts import InterruptWatch
from coatnet.search.lock import DriverLock
from coatnet.search.plan import STATE_FILE, SearchOptions, SearchPlan, plan_search, write_state
from coatnet.search.restore import (StagedStateGuard, TrialLogKeeper, saved_experiment,
                                    set_aside_torn_sessions)
from coatnet.search.worker_logs import WORKER_LOG, route_worker_output

logger = logging.getLogger("coatnet.search")

SAVE_PERIOD_S = "5"  # Tune's experiment-state save period (TUNE_GLOBAL_CHECKPOINT_S wins)


def run_search(options: SearchOptions) -> SearchOutcome:
    """Run (or continue) a search and export its results; see the module docstring."""
    from coatnet.search.tracking import check_tracking_server

    plan = plan_search(options)
    check_tracking_server(plan.tracking_uri)
    if options.storage_path and cluster.is_remote_uri(options.storage_path):
        cluster.check_remote_storage(options.storage_path)
    # Tiny CPU trials checkpoint every second; Tune then warns on each forced state snapshot,
    # which the resume guarantees need. Keep the log readable (a user value still wins).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune saves its experiment state every 10+ s by default; what a killed driver did since
    # the last save is redone (trials it started are sampled anew). 5 s loses less.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SAVE_PERIOD_S)
    lock = DriverLock(plan.experiment_dir, name=plan.name)
    try:
        if plan.experiment_dir.is_dir():  # an existing search: refuse a second driver at once,
            lock.acquire()                # before Ray starts (a new one creates nothing yet)
        _init_ray(options.address)
        cluster.check_storage(raw=options.storage_path, local_root=plan.storage_path,
                              alive_nodes=cluster.alive_node_count())
        route_worker_output(None if options.verbose else plan.experiment_dir / WORKER_LOG)
        if not lock.held:
            lock.acquire()  # a second driver of a new search is refused here
            if not plan.resuming and (plan.experiment_dir / STATE_FILE).exists():
                plan = plan_search(options)  # a driver that held the lock before us began it
        return _run_locked(plan, options)
    finally:
        lock.release()


def _run_locked(plan: SearchPlan, options: SearchOptions) -> SearchOutcome:
    """The search itself, with the experiment's driver lock held."""
    from coatnet.search.tracking import STATE_FILE_NAME, start_parent_run

    space, settings = plan.space, plan.space.search
    tune_storage = cluster.tune_storage_path(options.storage_path, local_root=plan.storage_path)

    search_settings = {"name": plan.name, "space": str(space.path), **settings.model_dump(),
                       "constraints": space.constraints.model_dump(),
                       "trial": plan.trial.to_dict(),
                       "data": {k: v for k, v in plan.data.items() if v is not None}}
    parent_run_id = start_parent_run(
        tracking_uri=plan.tracking_uri, experiment_name=plan.experiment_name,
        run_name=plan.name, search_settings=search_settings, space_text=space.text,
        space_sha256=space.sha256, resume_run_id=plan.state.get("parent_run_id"),
        metric=settings.metric, mode=settings.mode, view_params=space.sampled_names(),
        cost=next((o.metric for o in objectives_of(settings)[1:]), "macs"))
    write_state(plan, parent_run_id)
    mlflow_state = plan.experiment_dir / STATE_FILE_NAME
    interrupted = InterruptWatch()
    try:  # Ctrl-C from here on leaves MLflow marked interrupted
        concurrency = settings.max_concurrent_trials or _default_concurrency(plan)
        tuner = _tuner(plan, tune_storage=tune_storage, parent_run_id=parent_run_id,
                       mlflow_state=mlflow_state, concurrency=concurrency)
        logger.info("search %s: %d samples, up to %d at once, %d epochs each; experiment "
                    "dir %s; MLflow %s (experiment %r, parent run %s)", plan.name,
                    settings.num_samples, concurrency, plan.trial.epochs, plan.experiment_dir,
                    plan.tracking_uri, plan.experiment_name, parent_run_id)
        with interrupted, _tune_output(verbose=options.verbose):
            grid = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C while Tune was saving its state
        _mark_interrupted(plan, parent_run_id)
        raise _interrupted_error(plan, options) from None
    unfinished = _unfinished_trials(grid, mlflow_state, num_samples=settings.num_samples)
    if interrupted.fired or unfinished:
        logger.warning("search %s stopped with %d trial(s) unfinished", plan.name,
                       len(unfinished))
        _mark_interrupted(plan, parent_run_id)
        raise _interrupted_error(plan, options)
    with _ctrl_c_waits():
        return export_search(plan, grid, parent_run_id=parent_run_id)


def _tuner(plan: SearchPlan, *, tune_storage: str, parent_run_id: str, mlflow_state: Path,
           concurrency: int) -> Any:
    """A restored ``Tuner`` when the experiment can be restored, else a new one."""
    from ray import tune

    from coatnet.search.trial import run_trial, trial_resources

    settings = plan.space.search
    trainable = tune.with_resources(run_trial, trial_resources(plan.trial))
    param_space: dict[str, Any] = {"data": plan.data, "trial": plan.trial.to_dict(),
                                   "seed": settings.seed, "metric": settings.metric,
                                   "mode": settings.mode,
                                   "latency": settings.latency.model_dump()}
    faults = FaultPlan.from_env()  # test-only (coatnet.search.faults); None for every user
    if faults is not None:
        param_space[FAULTS_CONFIG_KEY] = faults.to_dict()
    tune_experiment = f"{tune_storage}/{plan.name}"
    if plan.resuming and not cluster.is_remote_uri(tune_storage):
        set_aside_torn_sessions(Path(tune_experiment))
    restorable = plan.resuming and saved_experiment(tune_experiment)
    if plan.resuming and not restorable:
        logger.warning("Tune never saved the state of search %s (its driver was stopped within "
                       "seconds of starting Tune): starting Tune afresh; the Optuna study and "
                       "the MLflow parent run carry on", plan.name)
    if restorable:
        logger.info("resuming search %s from %s", plan.name, plan.experiment_dir)
        # Errored trials stay failed: in the saved state only a trial that used up its
        # retries is ERROR (a killed or interrupted driver leaves its trials RUNNING).
        return tune.Tuner.restore(tune_experiment, trainable=trainable,
                                  resume_unfinished=True, resume_errored=False,
                                  param_space=param_space)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode,
            search_alg=_searcher(plan, mlflow_state=mlflow_state),
            scheduler=_scheduler(plan), num_samples=settings.num_samples,
            max_concurrent_trials=concurrency, reuse_actors=True,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=tune_storage,
            callbacks=_callbacks(plan, parent_run_id=parent_run_id, mlflow_state=mlflow_state),
            verbose=0,
            # Tune keeps every checkpoint; CheckpointPruner keeps trial.keep_checkpoints of
            # them whole and tombstones the rest (coatnet.search.pruning says why)
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None, checkpoint_score_attribute=settings.metric,
                checkpoint_score_order=settings.mode),
            failure_config=tune.FailureConfig(max_failures=plan.trial.max_failures)))


@contextlib.contextmanager
def _tune_output(*, verbose: bool) -> Iterator[None]:
    """Without ``verbose``, Tune's own output engine is off for the fit: at verbosity 0 its
    default engine still prints a "Configuration for experiment" box and a TensorBoard hint,
    while the legacy one (``RAY_AIR_NEW_OUTPUT=0``) prints nothing. A user's value wins."""
    if verbose or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def _searcher(plan: SearchPlan, *, mlflow_state: Path) -> Any:
    import optuna

    from coatnet.search.searcher import StudySearch, storage_url
    from coatnet.search.tracking.records import RecordedRunIds

    settings = plan.space.search
    if settings.searcher == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=settings.seed, n_startup_trials=settings.n_startup_trials)
    elif settings.searcher == "nsga2":
        # Optuna's default population (50) would make any search of fewer trials random
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed,
                                                population_size=nsga2_population(settings))
    else:
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    objectives = objectives_of(settings)
    # Optuna 5: constraints go through Trial.set_constraint (constraints_func is
    # deprecated); infeasible candidates are then ranked below feasible ones by TPE.
    return StudySearch(space=functools.partial(plan.space.define_by_run, set_constraints=True),
                       metric=[o.metric for o in objectives],
                       mode=[o.mode for o in objectives], sampler=sampler,
                       storage=storage_url(plan.experiment_dir), study_name=plan.name,
                       max_epochs=plan.trial.epochs, enqueue=settings.enqueue,
                       start=_cost_spread_start(plan, objectives=objectives),
                       run_id_of=RecordedRunIds(str(mlflow_state)))


def _cost_spread_start(plan: SearchPlan, *, objectives: Any) -> Any:
    """TPE with a cost objective and ``search.start: cost_spread``: the startup trials the
    space's ``enqueue`` leaves, spread over the first cost (``space.cost_start``); else None."""
    from coatnet.search.space.cost_start import cost_spread_start

    settings = plan.space.search
    n = min(settings.n_startup_trials, settings.num_samples) - len(settings.enqueue)
    if settings.searcher != "tpe" or settings.start != "cost_spread" or len(objectives) < 2 \
            or n <= 0:
        return None
    return functools.partial(cost_spread_start, plan.space, n=n, cost=objectives[1].metric,
                             seed=settings.seed)


def nsga2_population(settings: Any) -> int:
    """NSGA-II's population: a fifth of the samples (at least 4, at most Optuna's 50), so a
    search sees a few generations."""
    return max(4, min(50, int(settings.num_samples) // 5))


def _scheduler(plan: SearchPlan) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    from coatnet.search.schedulers import ParetoASHA

    asha = plan.space.search.asha
    if asha is None:  # search.asha: null - every trial runs all its epochs (Tune's FIFO)
        return None
    objectives = objectives_of(plan.space.search)
    if len(objectives) > 1:  # ASHA by accuracy alone would cut the cheap end of the front
        if asha.brackets != 1:
            logger.warning("search.asha.brackets = %d: the accuracy-versus-cost early "
                           "stopping has one bracket", asha.brackets)
        return ParetoASHA(objectives=objectives, max_t=plan.trial.epochs,
                          time_attr="epochs_done", grace_period=asha.grace_period,
                          reduction_factor=asha.reduction_factor)
    return ASHAScheduler(time_attr="epochs_done", max_t=plan.trial.epochs,
                         grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor, brackets=asha.brackets)


def _callbacks(plan: SearchPlan, *, parent_run_id: str, mlflow_state: Path) -> list[Any]:
    from coatnet.search.progress import ProgressCallback
    from coatnet.search.pruning import CheckpointPruner
    from coatnet.search.tracking import (PARENT_PENDING_FILE, MLflowTrackingCallback,
                                         pending_path_for)

    settings, epochs = plan.space.search, plan.trial.epochs
    tracker = MLflowTrackingCallback(
        tracking_uri=plan.tracking_uri, parent_run_id=parent_run_id, state_path=mlflow_state,
        max_epochs=epochs, metric=settings.metric, mode=settings.mode)
    pruner = CheckpointPruner(keep=plan.trial.keep_checkpoints, metric=settings.metric,
                              mode=settings.mode)
    own = (STATE_FILE, mlflow_state.name, pending_path_for(mlflow_state).name,
           PARENT_PENDING_FILE)
    return [tracker, pruner, TrialLogKeeper(),
            StagedStateGuard(experiment_dir_name=plan.experiment_dir.name, names=own),
            ProgressCallback(metric=settings.metric, mode=settings.mode, max_epochs=epochs)]


@contextlib.contextmanager
def _ctrl_c_waits() -> Iterator[None]:
    """Every trial has ended: a Ctrl-C while the results are written would only lose the
    outcome of a finished search (the parent run may be FINISHED already), so it is ignored
    until they are (main thread only; the previous handler comes back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    logger.info("all trials ended: writing the results (Ctrl-C waits until they are written)")
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_ray(address: str | None) -> None:
    import ray

    from coatnet.search.trial import apply_recommended_env, recommended_env_vars

    if ray.is_initialized():
        return
    apply_recommended_env()  # a local cluster inherits these; a remote one gets the runtime env
    address = address or os.environ.get("RAY_ADDRESS")
    cluster.check_ray_reachable(address)  # ray.init waits minutes on a dead address
    runtime_env = cluster.driver_runtime_env(recommended_env_vars())
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING,
                 log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SearchInputError(f"cannot reach the Ray cluster at {address!r}: {err}") from err


def _default_concurrency(plan: SearchPlan) -> int:
    import ray

    return cluster.default_concurrency(plan.trial, ray.cluster_resources())


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _interrupted_error(plan: SearchPlan, options: SearchOptions) -> SearchInterrupted:
    return SearchInterrupted(name=plan.name, experiment_dir=plan.experiment_dir,
                             space=plan.space.path, storage_path=options.storage_path)


def _unfinished_trials(grid: Any, mlflow_state: Path, *, num_samples: int) -> list[str]:
    """Trials without a final status (the tracker records one for every trial that ended,
    in this driver or an earlier one), or placeholders for samples never started."""
    from coatnet.search.results import STATUSES

    try:
        records = json.loads(mlflow_state.read_text())
    except (OSError, ValueError):
        records = {}
    unfinished = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") \
            or Path(result.path).name.removeprefix("trial_")
        status = (records.get(trial_id) or {}).get("status")
        if status not in STATUSES:
            unfinished.append(str(trial_id))
    unfinished += ["(not started)"] * max(0, num_samples - len(grid))
    return unfinished


def _mark_interrupted(plan: SearchPlan, parent_run_id: str) -> None:
    """Leave MLflow consistent after an interruption: no child RUNNING, the parent KILLED
    (never FINISHED with trials unfinished); a resume reopens them."""
    from coatnet.search.tracking import close_orphaned_runs

    try:
        from mlflow.tracking import MlflowClient

        close_orphaned_runs(tracking_uri=plan.tracking_uri, parent_run_id=parent_run_id,
                            keep_run_ids=())
        client = MlflowClient(plan.tracking_uri)
        client.set_tag(parent_run_id, "interrupted", "true")
        client.set_terminated(parent_run_id, status="KILLED")
    except Exception as err:  # MLflow down: the resume fixes the statuses
        logger.warning("could not mark the MLflow runs of %s as interrupted: %s", plan.name,
                       err)


# Re-exported so that callers keep one import for running a search.
__all__ = ["SearchInputError", "SearchInterrupted", "SearchOptions", "SearchOutcome",
           "plan_search", "run_search"]
