"""Torn Tune state left by a killed driver is set aside before the restore; whole state stays."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from coatnet.search.restore import (TORN_DIR, StagedStateGuard, sessions,
                                    set_aside_torn_sessions)


def save_session(directory: Path, session: str) -> None:
    (directory / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": []}))
    # Tune pickles the search generator's state under a .json name
    (directory / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": 3}))
    (directory / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"n": 1}))


def test_a_torn_newest_session_is_set_aside(tmp_path: Path) -> None:
    save_session(tmp_path, "2026-12-01_10-00-00")
    save_session(tmp_path, "2026-12-01_10-05-00")
    newest = tmp_path / "searcher-state-2026-12-01_10-05-00.pkl"
    newest.write_bytes(newest.read_bytes()[:5])  # the copy was cut short
    assert set_aside_torn_sessions(tmp_path) == ["2026-12-01_10-05-00"]
    assert sessions(tmp_path) == ["2026-12-01_10-00-00"]
    kept = sorted(p.name for p in (tmp_path / TORN_DIR / "2026-12-01_10-05-00").iterdir())
    assert kept == ["experiment_state-2026-12-01_10-05-00.json",
                    "search_gen_state-2026-12-01_10-05-00.json",
                    "searcher-state-2026-12-01_10-05-00.pkl"]


def test_whole_state_and_a_lone_session_stay(tmp_path: Path) -> None:
    save_session(tmp_path, "a")
    save_session(tmp_path, "b")
    (tmp_path / "searcher-state-b.pkl").unlink()  # killed before the searcher's first save
    assert set_aside_torn_sessions(tmp_path) == []  # the pickled generator state reads whole
    (tmp_path / "experiment_state-b.json").write_text('{"trial_da')
    (tmp_path / "experiment_state-a.json").write_text('{"trial_da')
    assert set_aside_torn_sessions(tmp_path) == ["b"]  # the oldest always stays
    assert sessions(tmp_path) == ["a"]


def test_a_torn_generator_state_sets_its_session_aside(tmp_path: Path) -> None:
    save_session(tmp_path, "a")
    save_session(tmp_path, "b")
    generator = tmp_path / "search_gen_state-b.json"
    generator.write_bytes(generator.read_bytes()[:-3])
    assert set_aside_torn_sessions(tmp_path) == ["b"]


def test_a_failed_trials_logs_reach_storage_before_its_restart(tmp_path: Path) -> None:
    """Tune restores a restarted trial's result logs from storage: the keeper puts the
    staging copies (all epochs so far) there first."""
    from types import SimpleNamespace

    import pyarrow.fs

    from coatnet.search.restore import TrialLogKeeper

    staging, storage = tmp_path / "staging" / "trial_1", tmp_path / "storage" / "trial_1"
    staging.mkdir(parents=True)
    storage.mkdir(parents=True)
    (staging / "result.json").write_text('{"epochs_done": 1}\n{"epochs_done": 2}\n')
    (staging / "progress.csv").write_text("epochs_done\n1\n2\n")
    (storage / "result.json").write_text('{"epochs_done": 1}\n')  # synced one save ago
    trial = SimpleNamespace(trial_id="1", local_path=str(staging), storage=SimpleNamespace(
        trial_fs_path=str(storage), storage_filesystem=pyarrow.fs.LocalFileSystem()))
    TrialLogKeeper().on_trial_recover(iteration=3, trials=[trial], trial=trial)
    assert (storage / "result.json").read_text().count("epochs_done") == 2
    assert (storage / "progress.csv").read_text() == "epochs_done\n1\n2\n"


def test_tunes_staged_copies_of_the_search_state_are_dropped(ray_local) -> None:
    """Tune copies the experiment's .json files into its staging directory on restore and
    uploads them back with every save: the search's own files must not be among them."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    staging = session / "artifacts" / "2026-01-01_00-00-00" / "guarded" / "driver_artifacts"
    staging.mkdir(parents=True)
    for name in ("mlflow_runs.json", "search_state.json", "experiment_state-x.json"):
        (staging / name).write_text("{}")
    other = session / "artifacts" / "2026-01-01_00-00-00" / "other" / "driver_artifacts"
    other.mkdir(parents=True)
    (other / "mlflow_runs.json").write_text("{}")
    StagedStateGuard(experiment_dir_name="guarded",
                     names=("mlflow_runs.json", "search_state.json")).setup()
    assert sorted(p.name for p in staging.iterdir()) == ["experiment_state-x.json"]  # Tune's
    assert (other / "mlflow_runs.json").exists()  # another experiment's is left alone
