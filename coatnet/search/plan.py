"""Plan a search before anything starts: validate the options and the space, pick the name,
the experiment directory and the MLflow settings, and decide whether this is a resume.

``plan_search`` creates nothing (no Ray, no directory, no MLflow run), so every mistake a user
can make is reported before any compute is spent. The experiment directory's
``search_state.json`` (written by ``write_state`` once the parent MLflow run exists) is what
lets a later ``--resume`` find and continue the search.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from coatnet.search import cluster
from coatnet.search.checkpoints import atomic_write_bytes
from coatnet.search.contracts import TrialSettings
from coatnet.search.errors import SearchInputError
from coatnet.search.front import Condition, parse_pick
from coatnet.search.lock import LOCK_FILE
from coatnet.search.space import SearchSpace, load_space

STATE_FILE = "search_state.json"
LOG_MODELS = ("front", "best", "none")
DEFAULT_STORAGE = "ray_results"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# what MLflow 3 can track to (``+driver`` suffixes allowed, e.g. postgresql+psycopg2)
TRACKING_SCHEMES = frozenset({"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                              "databricks"})


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
    pick: str | None = None  # e.g. "macs<=1e6": which front member best_config.yaml is
    log_models: str = "front"  # MLflow models logged at the end: front | best | none
    register_model: str | None = None  # register the best model under this name
    verbose: bool = False  # Ray's worker output on the terminal (else ray_workers.log)


@dataclass(frozen=True)
class SearchPlan:
    """Everything decided before Ray starts."""

    space: SearchSpace
    name: str
    storage_path: Path
    experiment_dir: Path
    resuming: bool
    state: dict[str, Any]
    tracking_uri: str
    experiment_name: str
    data: dict[str, Any]  # the data: section, paths resolved (coatnet.search.data reads it)
    trial: TrialSettings
    pick: tuple[Condition, ...] = ()  # --pick, parsed (coatnet.search.front)
    log_models: str = "front"
    register_model: str | None = None


def _storage_root(options: SearchOptions) -> Path:
    """Where the driver keeps experiment dirs: the storage path, or for a bucket URI
    (s3://, gs://...) a local state dir (coatnet.search.cluster.state_root_for)."""
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
    # compared by space_key: a Ray job's copy of the file moves with each upload
    candidates = []
    wanted = cluster.space_key(str(space.path.resolve()))
    if root.is_dir():
        for child in root.iterdir():
            state = _read_state(child) if child.is_dir() else None
            if state and cluster.space_key(str(state.get("space_path", ""))) == wanted:
                candidates.append((state.get("created", ""), child))
    return max(candidates)[1] if candidates else None


def plan_search(options: SearchOptions) -> SearchPlan:
    """Validate the space and the options and decide names and paths; creates nothing."""
    from coatnet.search.tracking import resolve_tracking_uri

    for flag, value in (("--num-samples", options.num_samples),
                        ("--max-concurrent-trials", options.max_concurrent_trials)):
        if value is not None and value < 1:
            raise SearchInputError(f"{flag}={value}: must be a positive integer")
    if options.log_models not in LOG_MODELS:
        raise SearchInputError(f"--log-models={options.log_models!r}: must be one of "
                               f"{', '.join(LOG_MODELS)}")
    if options.register_model is not None and not _NAME_PATTERN.match(options.register_model):
        raise SearchInputError(f"--register-model={options.register_model!r}: use letters, "
                               "digits, '.', '_' and '-' (at most 128 characters)")
    if options.register_model and options.log_models == "none":
        raise SearchInputError("--register-model needs a logged model: drop --log-models none")
    try:
        pick = parse_pick(options.pick)
    except ValueError as err:
        raise SearchInputError(str(err)) from None
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
    if not resuming and experiment_dir.is_dir() and any(
            p.name != LOCK_FILE for p in experiment_dir.iterdir()):
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
    trial = TrialSettings.from_dict(space.trial.model_dump())
    if options.use_gpu is not None:
        trial = dataclasses.replace(trial, use_gpu=options.use_gpu)
    tracking_uri = (state or {}).get("tracking_uri") if resuming and not options.mlflow_uri \
        else resolve_tracking_uri(options.mlflow_uri)
    experiment_name = options.experiment_name or (state or {}).get("experiment_name") \
        or f"coatnet-search/{space.path.stem}"
    if options.mlflow_uri:
        source = f"--mlflow-uri {options.mlflow_uri}"
    elif resuming and state.get("tracking_uri"):
        source = f"the tracking URI {tracking_uri} recorded in {experiment_dir / STATE_FILE}"
    else:
        source = f"MLFLOW_TRACKING_URI={tracking_uri}"
    check_tracking_uri(tracking_uri, source=source)
    return SearchPlan(space=space, name=name, storage_path=root, experiment_dir=experiment_dir,
                      resuming=resuming, state=state or {}, tracking_uri=tracking_uri,
                      experiment_name=experiment_name, data=data, trial=trial, pick=pick,
                      log_models=options.log_models, register_model=options.register_model)


def check_tracking_uri(uri: str, *, source: str) -> None:
    """Refuse a tracking URI MLflow cannot store runs in (before MLflow fails on it with a
    registry traceback, and before Ray starts)."""
    scheme = urlparse(uri).scheme.lower()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if base in TRACKING_SCHEMES or (not scheme and uri):
        return
    raise SearchInputError(
        f"{source}: unsupported tracking URI scheme {scheme!r}; use an MLflow server "
        "(http://HOST:PORT or https://...), a database (sqlite:///PATH, postgresql://, "
        "mysql://, mssql://), a local directory (file:///PATH) or databricks")


def write_state(plan: SearchPlan, parent_run_id: str) -> None:
    """Record the search in its directory (what ``--resume`` and a changed space check read)."""
    plan.experiment_dir.mkdir(parents=True, exist_ok=True)
    state = dict(plan.state)
    state.update({
        "space_path": str(plan.space.path.resolve()), "space_sha256": plan.space.sha256,
        "parent_run_id": parent_run_id, "tracking_uri": plan.tracking_uri,
        "experiment_name": plan.experiment_name,
        "created": state.get("created") or datetime.datetime.now().isoformat(),
    })
    atomic_write_bytes(plan.experiment_dir / STATE_FILE, json.dumps(state, indent=2).encode())
