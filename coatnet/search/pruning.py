"""Checkpoint retention that a killed driver cannot break: ``CheckpointPruner``.

Tune's own ``CheckpointConfig(num_to_keep)`` deletes a superseded checkpoint directory at once,
but Tune saves (and copies to storage, in the background) its experiment state only every few
seconds. After a driver is killed, the restored state can name a checkpoint that no longer
exists, and Tune fails the trial ("Could not recover from checkpoint as it does not exist on
storage anymore"); Ray Train's ``num_to_keep`` does the same for worker-group trials. So Tune
and Train keep every checkpoint and this callback prunes instead, as a tombstone: a superseded
checkpoint loses its payload, but its directory stays with a ``PRUNED`` marker in it (and the
small ``epoch.json`` that says which epoch it held). A trial
restored from a tombstone finds the directory, and its loop resumes from the trial's newest
intact checkpoint (``coatnet.search.reporting``), which is never pruned.

Kept per trial: the newest checkpoint, and the ``keep`` best by the search metric (as Tune's
``num_to_keep`` with ``checkpoint_score_attribute`` would keep them).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune import Callback

from coatnet.search.checkpoints import EPOCH_FILE, PRUNED_MARKER

logger = logging.getLogger(__name__)

class CheckpointPruner(Callback):
    """Tune callback: tombstone each trial's superseded checkpoints (see the module docstring)."""

    def __init__(self, *, keep: int, metric: str, mode: str) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: must be at least 1")
        self.keep, self.metric, self.mode = keep, metric, mode
        self._kept: dict[str, list[tuple[str, float | None]]] = {}  # trial -> (path, score)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any,
                      **info: Any) -> None:
        score = _number((trial.last_result or {}).get(self.metric))
        kept = self._kept.setdefault(trial.trial_id, [])
        if all(path != checkpoint.path for path, _ in kept):
            kept.append((checkpoint.path, score))
        survivors = self.survivors(kept)
        for path, _ in kept:
            if path not in survivors:
                _tombstone(checkpoint.filesystem, path)
        self._kept[trial.trial_id] = [entry for entry in kept if entry[0] in survivors]

    def survivors(self, kept: list[tuple[str, float | None]]) -> set[str]:
        """The newest path and the ``keep`` best scored ones (newer first among equals)."""
        sign = 1.0 if self.mode == "max" else -1.0
        scored = [(sign * score, index, path) for index, (path, score) in enumerate(kept)
                  if score is not None]
        best = sorted(scored, reverse=True)[: self.keep]
        return {kept[-1][0], *(path for _, _, path in best)}

    def get_state(self) -> dict[str, Any]:
        return {"kept": {trial: list(entries) for trial, entries in self._kept.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._kept = {trial: [tuple(entry) for entry in entries]
                      for trial, entries in (state.get("kept") or {}).items()}


def _tombstone(filesystem: Any, path: str) -> None:
    """Marker first, then the payload: killed half-way, the directory still reads as pruned."""
    import pyarrow.fs

    try:
        with filesystem.open_output_stream(f"{path.rstrip('/')}/{PRUNED_MARKER}") as out:
            out.write(b"superseded; the trial resumes from its newest intact checkpoint\n")
        selector = pyarrow.fs.FileSelector(path, recursive=False)
        for info in filesystem.get_file_info(selector):
            if info.base_name in (PRUNED_MARKER, EPOCH_FILE):
                continue
            if info.type == pyarrow.fs.FileType.Directory:
                filesystem.delete_dir(info.path)
            else:
                filesystem.delete_file(info.path)
    except OSError as err:  # storage hiccup: the checkpoint stays whole, nothing is lost
        logger.warning("could not prune checkpoint %s: %s", path, err)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
