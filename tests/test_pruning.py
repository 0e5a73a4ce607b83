"""Checkpoint tombstones: the pruner keeps the newest and the best checkpoints whole, and a
restore that names a pruned or an older checkpoint resumes from the trial's newest intact one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import ray.tune

from coatnet.search.checkpoints import CHECKPOINT_FILE, EPOCH_FILE, PRUNED_MARKER, save_state
from coatnet.search.pruning import CheckpointPruner
from coatnet.search.reporting import _load_checkpoint_with_fallback


def write(trial_dir: Path, index: int) -> Path:
    directory = trial_dir / f"checkpoint_{index:06d}"
    save_state({"epoch": index + 1, "model": {}}, directory)
    return directory


def test_pruner_keeps_newest_and_best_and_tombstones_the_rest(tmp_path: Path) -> None:
    pruner = CheckpointPruner(keep=2, metric="val_accuracy", mode="max")
    trial = SimpleNamespace(trial_id="t1", last_result={})
    scores = [0.5, 0.9, 0.2, 0.7, 0.1]
    fs = pyarrow.fs.LocalFileSystem()
    for index, score in enumerate(scores):
        directory = write(tmp_path, index)
        trial.last_result = {"val_accuracy": score}
        pruner.on_checkpoint(0, [], trial, SimpleNamespace(path=str(directory), filesystem=fs))
    whole = {p.name for p in tmp_path.iterdir() if (p / CHECKPOINT_FILE).exists()}
    pruned = {p.name for p in tmp_path.iterdir() if (p / PRUNED_MARKER).exists()}
    # best two by score (0.9, 0.7) and the newest (0.1)
    assert whole == {"checkpoint_000001", "checkpoint_000003", "checkpoint_000004"}
    assert pruned == {"checkpoint_000000", "checkpoint_000002"}
    # the payload and its digest are gone; the directory stays with its epoch sidecar
    assert all(sorted(c.name for c in (tmp_path / name).iterdir()) == [PRUNED_MARKER, EPOCH_FILE]
               for name in pruned)
    restored = CheckpointPruner(keep=2, metric="val_accuracy", mode="max")
    restored.set_state(pruner.get_state())
    assert restored.get_state() == pruner.get_state()


def test_mode_min_keeps_the_lowest(tmp_path: Path) -> None:
    pruner = CheckpointPruner(keep=1, metric="val_loss", mode="min")
    kept = [("a", 0.3), ("b", 0.1), ("c", 0.5)]
    assert pruner.survivors(kept) == {"b", "c"}


def test_restore_from_a_pruned_or_older_checkpoint_uses_the_newest_intact(tmp_path: Path) -> None:
    trial_dir = tmp_path / "exp" / "trial_1"
    first, second, third = (write(trial_dir, i) for i in range(3))
    (second / CHECKPOINT_FILE).unlink()
    (second / PRUNED_MARKER).write_text("pruned")
    for named in (first, second):  # Tune's saved state can name either after a kill
        state = _load_checkpoint_with_fallback(ray.tune.Checkpoint.from_directory(str(named)))
        assert state is not None and state["epoch"] == 3
    (third / CHECKPOINT_FILE).write_bytes(b"torn")  # the newest is damaged: the next intact one
    state = _load_checkpoint_with_fallback(ray.tune.Checkpoint.from_directory(str(second)))
    assert state is not None and state["epoch"] == 1
