"""What a restore needs kept whole: Tune state files that a killed driver left torn are set
aside before ``Tuner.restore``, a failed trial's result logs reach storage before Tune
restarts it (``TrialLogKeeper``), and Tune's restore-time copies of this search's own state
files never go back over the live ones (``StagedStateGuard``).

Each driver session writes its own ``experiment_state-<session>.json`` (and the searcher's,
the search generator's and the callbacks' state next to it), rewriting them every few seconds
and copying them to storage in the background, not atomically. A driver killed during that
copy can leave the newest session's file cut short; Tune restores from the newest file, fails
on it, and every later ``--resume`` fails the same way. ``set_aside_torn_sessions`` moves such
a session's files into ``torn-state/`` (nothing is deleted), so Tune restores the newest
session that reads whole; trials of the torn session resume from their own checkpoints or are
sampled again.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.tune import Callback

logger = logging.getLogger(__name__)

TORN_DIR = "torn-state"
_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl",
          "callback-states-{}.pkl")
_PREFIX, _SUFFIX = "experiment_state-", ".json"
_TRIAL_LOGS = ("result.json", "progress.csv")


def sessions(experiment_dir: Path) -> list[str]:
    """The driver sessions that saved Tune state here, oldest first (Tune's own order)."""
    names = sorted(p.name for p in Path(experiment_dir).glob(f"{_PREFIX}*{_SUFFIX}"))
    return [name[len(_PREFIX):-len(_SUFFIX)] for name in names]


def saved_experiment(uri: str) -> bool:
    """Whether Tune saved the experiment at ``uri`` (a local path or a storage URI) at least
    once: ``tuner.pkl`` and an ``experiment_state-*.json``.

    ``Tuner.fit`` writes ``tuner.pkl`` at once and the experiment state only at its first
    periodic save, a few seconds later. A driver killed in between leaves just ``tuner.pkl``,
    which ``Tuner.can_restore`` accepts; ``Tuner.restore`` then logs that no experiment state
    exists and runs a broken search (one trial, the rest never started). Such a search starts
    Tune afresh instead; its study and MLflow parent run carry on.
    """
    filesystem, path = pyarrow.fs.FileSystem.from_uri(
        uri if "://" in uri else str(Path(uri).resolve()))
    try:
        names = [info.base_name for info in filesystem.get_file_info(
            pyarrow.fs.FileSelector(path, allow_not_found=True))]
    except OSError as err:
        logger.warning("could not list the Tune experiment at %s (%s); starting Tune afresh",
                       uri, err)
        return False
    return "tuner.pkl" in names and any(
        name.startswith(_PREFIX) and name.endswith(_SUFFIX) for name in names)


def set_aside_torn_sessions(experiment_dir: Path) -> list[str]:
    """Move the newest sessions whose files do not read whole into ``torn-state/``, until the
    newest one reads; returns the sessions moved. The oldest session always stays."""
    experiment_dir = Path(experiment_dir)
    found = sessions(experiment_dir)
    moved: list[str] = []
    while len(found) > 1 and not _reads_whole(experiment_dir, found[-1]):
        session = found.pop()
        target = experiment_dir / TORN_DIR / session
        target.mkdir(parents=True, exist_ok=True)
        for template in _FILES:
            path = experiment_dir / template.format(session)
            if path.exists():
                shutil.move(str(path), target / path.name)
        moved.append(session)
        logger.warning("Tune's saved state of session %s is torn (a driver was killed while "
                       "writing it); set aside in %s, resuming from session %s", session,
                       target, found[-1])
    return moved


def _reads_whole(experiment_dir: Path, session: str) -> bool:
    for template in _FILES:
        path = experiment_dir / template.format(session)
        if not path.exists():  # written after the experiment state: may be missing
            continue
        try:
            data = path.read_bytes()
            # Tune pickles some of these under a .json name (search_gen_state): go by content
            if data[:1] == b"\x80":
                pickle.loads(data)  # noqa: S301 - this search's own state, as Tune loads it
            else:
                json.loads(data)
        except Exception:  # noqa: BLE001 - any failure to read means torn
            return False
    return True


class TrialLogKeeper(Callback):
    """Copies a failed trial's result logs to storage before Tune restarts it.

    Tune's loggers write ``result.json`` / ``progress.csv`` in the driver's staging directory
    and copy them to storage only with its periodic experiment save; when a trial is
    restarted after a failure (a raising or OOM-killed trial process), Tune first copies the
    storage copy back over the staging one (``LoggerCallback._restore_from_remote``). A
    failure within a save period would so erase the epochs logged since the last save, and
    with them the leaderboard's history of that trial. ``on_trial_recover`` runs after Tune
    schedules the restart and before the restarted trial starts logging.
    """

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any,
                         **info: Any) -> None:
        storage = trial.storage
        for name in _TRIAL_LOGS:
            local = Path(trial.local_path, name)
            remote = f"{storage.trial_fs_path.rstrip('/')}/{name}"
            if not local.is_file() or str(local.resolve()) == str(Path(remote).resolve()):
                continue
            try:
                pyarrow.fs.copy_files(str(local), remote,
                                      destination_filesystem=storage.storage_filesystem)
            except Exception as err:  # noqa: BLE001 - a log copy must never stop a search
                logger.warning("could not copy %s of trial %s to storage before its restart: "
                               "%s", name, trial.trial_id, err)


class StagedStateGuard(Callback):
    """Keeps Tune from copying stale copies of this search's own state files over the live ones.

    On restore Tune copies every ``.json`` and ``.pkl`` of the experiment directory into the
    driver's staging directory (``TuneController.resume`` -> ``sync_down_experiment_state``) and
    later copies that directory back to storage with every experiment save. The tracker's
    ``mlflow_runs.json`` and the plan's ``search_state.json`` live in the experiment directory
    itself: their copies taken at restore would overwrite the newer files (trials recorded as
    still running, so the search ends "interrupted"). ``setup`` runs after the restore and
    before the first save, and deletes those copies from the staging directory.
    """

    def __init__(self, *, experiment_dir_name: str, names: tuple[str, ...]) -> None:
        self.experiment_dir_name = experiment_dir_name
        self.names = names

    def setup(self, **info: Any) -> None:
        for path in staged_copies(self.experiment_dir_name, self.names):
            try:
                path.unlink()
                logger.debug("dropped Tune's staged copy %s", path)
            except OSError as err:
                logger.warning("could not drop Tune's staged copy %s: %s", path, err)


def staged_copies(experiment_dir_name: str, names: tuple[str, ...]) -> list[Path]:
    """This driver's staged copies of ``names`` (under Ray's session directory)."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - no local Ray node: nothing staged here
        return []
    staging = Path(session, "artifacts").glob(f"*/{experiment_dir_name}/driver_artifacts")
    return [directory / name for directory in staging for name in names
            if (directory / name).is_file()]
