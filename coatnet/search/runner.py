"""Assemble and run one search: Optuna TPE + ASHA in a Ray Tune ``Tuner`` over ``run_trial``.

Everything the user can get wrong is checked before Ray starts or any directory or MLflow run
is created. A search lives in ``<storage_path>/<name>``; running the same name again (or
``--resume``) continues it: finished trials are kept, unfinished ones continue from their last
checkpoint, the Optuna study carries on and MLflow keeps one child run per trial.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coatnet.search.checkpoints import atomic_write_bytes
from coatnet.search.space import SearchSpace, load_space

logger = logging.getLogger("coatnet.search")

STATE_FILE = "search_state.json"
DEFAULT_STORAGE = "ray_results"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SearchInputError(ValueError):
    """Bad command-line input (found before any compute is spent)."""


class SearchInterrupted(RuntimeError):
    """The search was stopped (Ctrl-C / SIGINT) with trials unfinished; its state is saved and
    the same ``--name`` (or ``--resume``) continues it."""

    def __init__(self, *, name: str, experiment_dir: Path, space: Path,
                 storage_path: str | None) -> None:
        self.name, self.experiment_dir, self.space = name, experiment_dir, space
        storage = f" --storage-path {storage_path}" if storage_path else ""
        self.resume_command = (f"python experiments/search.py --space {space} --name {name}"
                               f"{storage} --resume")
        super().__init__(f"search {name!r} interrupted; its state is saved in {experiment_dir}. "
                         f"Continue it with:\n    {self.resume_command}")


@dataclass(frozen=True)
class SearchOptions:
    """The CLI's overrides of a space file; ``None`` keeps the file's value."""

    space: Path
    num_samples: int | None = None
    max_concurrent_trials: int | None = None
    name: str | None = None
    storage_path: str | None = None
    resume: bool = False
    seed: int | None = None
    mlflow_uri: str | None = None
    experiment_name: str | None = None
    data_dir: str | None = None
    smoke_test: bool = False
    address: str | None = None
    use_gpu: bool | None = None
    extra_config: Mapping[str, Any] = field(default_factory=dict)  # e.g. test fault injection


@dataclass
class SearchOutcome:
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
    mlflow_pending: int = 0  # MLflow operations not delivered (sync_mlflow.py sends them)


@dataclass(frozen=True)
class _Plan:
    """Everything decided before Ray starts."""

    space: SearchSpace
    name: str
    storage_path: Path
    experiment_dir: Path
    resuming: bool
    state: dict[str, Any]
    tracking_uri: str
    experiment_name: str
    data: dict[str, Any]
    trial: dict[str, Any]


def _storage_root(options: SearchOptions) -> Path:
    """Where the driver keeps experiment dirs: the storage path, or for a bucket URI
    (s3://, gs://...) a local state dir (coatnet.search.cluster.state_root_for)."""
    from coatnet.search import cluster

    raw = options.storage_path or DEFAULT_STORAGE
    if cluster.is_remote_uri(raw):
        return cluster.state_root_for(raw)
    return cluster.local_storage_path(raw)


def _read_state(experiment_dir: Path) -> dict[str, Any] | None:
    path = experiment_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SearchInputError(f"{path}: unreadable search state ({err}); it is not an "
                               "experiment this tool can resume") from None


def _latest_experiment(root: Path, space: SearchSpace) -> Path | None:
    from coatnet.search.cluster import space_key  # a Ray job's copy moves with each upload

    candidates = []
    wanted = space_key(str(space.path.resolve()))
    if root.is_dir():
        for child in root.iterdir():
            state = _read_state(child) if child.is_dir() else None
            if state and space_key(str(state.get("space_path", ""))) == wanted:
                candidates.append((state.get("created", ""), child))
    return max(candidates)[1] if candidates else None


def plan_search(options: SearchOptions) -> _Plan:
    """Validate the space and the options and decide names and paths; creates nothing."""
    from coatnet.search.tracking import resolve_tracking_uri

    for flag, value in (("--num-samples", options.num_samples),
                        ("--max-concurrent-trials", options.max_concurrent_trials)):
        if value is not None and value < 1:
            raise SearchInputError(f"{flag}={value}: must be a positive integer")
    space = load_space(options.space)  # SpaceError lists every problem in the file
    if options.smoke_test:
        space = space.smoke_test()
    space = space.with_overrides(num_samples=options.num_samples,
                                 max_concurrent_trials=options.max_concurrent_trials,
                                 seed=options.seed)
    if options.name is not None and not _NAME_PATTERN.match(options.name):
        raise SearchInputError(f"--name={options.name!r}: use letters, digits, '.', '_' and "
                               "'-' (at most 128 characters, no '/')")
    root = _storage_root(options)
    if root.exists() and not root.is_dir():
        raise SearchInputError(f"--storage-path {root}: exists and is not a directory")
    if options.data_dir is not None and not Path(options.data_dir).expanduser().is_dir() \
            and not space.data.download:
        raise SearchInputError(f"--data-dir {options.data_dir}: no such directory (set "
                               "data.download: true in the space to fetch the dataset)")
    if options.name:
        name = options.name
    elif options.resume:
        latest = _latest_experiment(root, space)
        if latest is None:
            raise SearchInputError(f"--resume: no earlier search of {space.path} under {root}; "
                                   "pass --name NAME of the search to continue")
        name = latest.name
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{space.path.stem}{'-smoke' if options.smoke_test else ''}-{stamp}"
    experiment_dir = root / name
    state = _read_state(experiment_dir)
    if options.resume and state is None:
        raise SearchInputError(f"--resume: {experiment_dir} is not a search experiment "
                               f"(no {STATE_FILE}); start it without --resume")
    resuming = state is not None
    if not resuming and experiment_dir.is_dir() and any(experiment_dir.iterdir()):
        raise SearchInputError(f"{experiment_dir}: exists but is not a search experiment (no "
                               f"{STATE_FILE}); pick another --name")
    if resuming and state.get("space_sha256") != space.sha256:
        raise SearchInputError(
            f"{space.path}: the space file changed since search {name!r} started (sha256 "
            f"{state.get('space_sha256', '?')[:12]} -> {space.sha256[:12]}); resuming would mix "
            "two searches. Restore the old file or start a new search with another --name")

    data = space.data.model_dump()
    if options.data_dir is not None:
        data["data_dir"] = str(Path(options.data_dir).expanduser().resolve())
    if data.get("path"):
        data["path"] = str(Path(data["path"]).expanduser().resolve())
    trial = space.trial.model_dump()
    if options.use_gpu is not None:
        trial["use_gpu"] = options.use_gpu
    tracking_uri = (state or {}).get("tracking_uri") if resuming and not options.mlflow_uri \
        else resolve_tracking_uri(options.mlflow_uri)
    experiment_name = options.experiment_name or (state or {}).get("experiment_name") \
        or f"coatnet-search/{space.path.stem}"
    return _Plan(space=space, name=name, storage_path=root, experiment_dir=experiment_dir,
                 resuming=resuming, state=state or {}, tracking_uri=tracking_uri,
                 experiment_name=experiment_name, data=data, trial=trial)


def _init_ray(address: str | None) -> None:
    import ray

    from coatnet.search import cluster
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


def _default_concurrency(trial: Mapping[str, Any]) -> int:
    import ray

    from coatnet.search.cluster import default_concurrency

    return default_concurrency(trial, ray.cluster_resources())


def _write_state(plan: _Plan, parent_run_id: str) -> None:
    plan.experiment_dir.mkdir(parents=True, exist_ok=True)
    state = dict(plan.state)
    state.update({
        "space_path": str(plan.space.path.resolve()), "space_sha256": plan.space.sha256,
        "parent_run_id": parent_run_id, "tracking_uri": plan.tracking_uri,
        "experiment_name": plan.experiment_name,
        "created": state.get("created") or datetime.datetime.now().isoformat(),
    })
    atomic_write_bytes(plan.experiment_dir / STATE_FILE, json.dumps(state, indent=2).encode())


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def run_search(options: SearchOptions) -> SearchOutcome:
    """Run (or continue) a search and export its results; see the module docstring."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from coatnet.search import results as results_mod
    from coatnet.search.progress import ProgressCallback
    from coatnet.search.tracking import (MLflowTrackingCallback, check_tracking_server,
                                         finish_search_run, pending_tracking_operations,
                                         start_parent_run)
    from coatnet.search.trial import run_trial, trial_resources

    plan = plan_search(options)
    space, settings = plan.space, plan.space.search
    check_tracking_server(plan.tracking_uri)
    # Tiny CPU trials checkpoint every second; Tune then warns on each forced state snapshot,
    # which the resume guarantees need. Keep the log readable (a user value still wins).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _init_ray(options.address)
    from coatnet.search import cluster

    cluster.check_storage(raw=options.storage_path, local_root=plan.storage_path,
                          alive_nodes=cluster.alive_node_count())
    tune_storage = cluster.tune_storage_path(options.storage_path, local_root=plan.storage_path)
    tune_experiment = f"{tune_storage}/{plan.name}"

    metric, mode, epochs = settings.metric, settings.mode, plan.trial["epochs"]
    search_settings = {"name": plan.name, "space": str(space.path), **settings.model_dump(),
                       "constraints": space.constraints.model_dump(), "trial": plan.trial,
                       "data": {k: v for k, v in plan.data.items() if v is not None}}
    parent_run_id = start_parent_run(
        tracking_uri=plan.tracking_uri, experiment_name=plan.experiment_name,
        run_name=plan.name, search_settings=search_settings, space_text=space.text,
        space_sha256=space.sha256, resume_run_id=plan.state.get("parent_run_id"))
    _write_state(plan, parent_run_id)
    interrupted = _InterruptWatch()
    try:  # Ctrl-C from here on leaves MLflow marked interrupted
        mlflow_state = plan.experiment_dir / "mlflow_runs.json"

        trainable = tune.with_resources(run_trial, trial_resources(plan.trial))
        param_space = {"data": plan.data, "trial": plan.trial, "seed": settings.seed,
                       "metric": metric, "mode": mode, **dict(options.extra_config)}
        concurrency = settings.max_concurrent_trials or _default_concurrency(plan.trial)
        if plan.resuming and tune.Tuner.can_restore(tune_experiment):
            logger.info("resuming search %s from %s", plan.name, plan.experiment_dir)
            tracker = None
            # Errored trials stay failed: in the saved state only a trial that used up its
            # retries is ERROR (a killed or interrupted driver leaves its trials RUNNING).
            tuner = tune.Tuner.restore(tune_experiment, trainable=trainable,
                                       resume_unfinished=True, resume_errored=False,
                                       param_space=param_space)
        else:
            import optuna

            if settings.searcher == "tpe":
                sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
                    seed=settings.seed, n_startup_trials=settings.n_startup_trials)
            else:
                sampler = optuna.samplers.RandomSampler(seed=settings.seed)
            # Optuna 5: constraints go through Trial.set_constraint (constraints_func is
            # deprecated); infeasible candidates are then ranked below feasible ones by TPE.
            searcher = OptunaSearch(space=functools.partial(space.define_by_run,
                                                            set_constraints=True),
                                    metric=metric, mode=mode, sampler=sampler)
            scheduler = ASHAScheduler(time_attr="epochs_done", max_t=epochs,
                                      grace_period=settings.asha.grace_period,
                                      reduction_factor=settings.asha.reduction_factor,
                                      brackets=settings.asha.brackets)
            tracker = MLflowTrackingCallback(
                tracking_uri=plan.tracking_uri, parent_run_id=parent_run_id,
                state_path=mlflow_state, max_epochs=epochs, metric=metric, mode=mode)
            progress = ProgressCallback(metric=metric, mode=mode, max_epochs=epochs)
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                    num_samples=settings.num_samples, max_concurrent_trials=concurrency,
                    reuse_actors=True, trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name),
                run_config=tune.RunConfig(
                    name=plan.name, storage_path=tune_storage,
                    callbacks=[tracker, progress], verbose=0,
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=plan.trial["keep_checkpoints"],
                        checkpoint_score_attribute=metric, checkpoint_score_order=mode),
                    failure_config=tune.FailureConfig(max_failures=plan.trial["max_failures"])))
        logger.info("search %s: %d samples, up to %d at once, %d epochs each; experiment "
                    "dir %s; MLflow %s (experiment %r, parent run %s)", plan.name,
                    settings.num_samples,
                    concurrency, epochs, plan.experiment_dir, plan.tracking_uri,
                    plan.experiment_name, parent_run_id)
        with interrupted:
            grid = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C while Tune was saving its state
        _mark_interrupted(plan, parent_run_id)
        raise SearchInterrupted(name=plan.name, experiment_dir=plan.experiment_dir,
                                space=space.path, storage_path=options.storage_path) from None
    unfinished = _unfinished_trials(grid, mlflow_state, num_samples=settings.num_samples)
    if interrupted.fired or unfinished:
        logger.warning("search %s stopped with %d trial(s) unfinished", plan.name,
                       len(unfinished))
        _mark_interrupted(plan, parent_run_id)
        raise SearchInterrupted(name=plan.name, experiment_dir=plan.experiment_dir,
                                space=space.path, storage_path=options.storage_path)

    rows = results_mod.leaderboard(grid, metric=metric, mode=mode, max_epochs=epochs)
    leaderboard_csv = plan.experiment_dir / "leaderboard.csv"
    results_mod.write_leaderboard(rows, leaderboard_csv, metric=metric)
    best = next((r for r in rows if r.best_value is not None), None)
    best_config_yaml = None
    if best is not None:
        best_config_yaml = plan.experiment_dir / "best_config.yaml"
        results_mod.write_best_config(best, best_config_yaml, metric=metric)
    counts = results_mod.status_counts(rows)
    finish = {
        "status_counts": counts, "best_value": None if best is None else best.best_value,
        "leaderboard_csv": str(leaderboard_csv),
        "best_config_yaml": None if best_config_yaml is None else str(best_config_yaml),
        "metric": metric,
        "infeasible_reasons": {r.trial_id: r.candidate.get("infeasible_reason", "")
                               for r in rows if r.status == "infeasible"}}
    # every trial is closed by now: a child still RUNNING was orphaned by a killed driver
    finish_search_run(experiment_dir=plan.experiment_dir, tracking_uri=plan.tracking_uri,
                      parent_run_id=parent_run_id, trial_ids=[r.trial_id for r in rows],
                      finish=finish)
    pending = pending_tracking_operations(plan.experiment_dir)
    if pending:
        logger.warning("MLflow at %s did not receive %d operation(s); they are kept in %s. "
                       "Send them with: python experiments/sync_mlflow.py %s",
                       plan.tracking_uri, pending, plan.experiment_dir, plan.experiment_dir)
    return SearchOutcome(experiment_dir=plan.experiment_dir, leaderboard_csv=leaderboard_csv,
                         best_config_yaml=best_config_yaml,
                         best_checkpoint=None if best is None else best.checkpoint,
                         best_value=None if best is None else best.best_value,
                         status_counts=counts, parent_run_id=parent_run_id,
                         tracking_uri=plan.tracking_uri, rows=rows, metric=metric,
                         mlflow_pending=pending)


class _InterruptWatch:
    """Tells whether Tune's SIGINT/SIGUSR1 handler fired during ``fit``.

    Ray 2.60's ``tune.run`` (``_setup_signal_catching``) replaces the SIGINT handler, and on the
    first signal sets its stop event and puts back the handler it replaced. So: install a
    marker handler before ``fit``; finding it in place afterwards means Tune was interrupted.
    A second Ctrl-C then reaches the marker, which raises ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        self.fired = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> _InterruptWatch:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if not self._installed:
            return
        self.fired = signal.getsignal(signal.SIGINT) == self._handler
        signal.signal(signal.SIGINT, self._previous)


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


def _mark_interrupted(plan: _Plan, parent_run_id: str) -> None:
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
