"""The per-trial tracking records of one parent run, and their state file (``mlflow_runs.json``).

A record maps a Tune trial id to what tracking knows of it: its MLflow child run (``run_id``),
the last epoch MLflow has (``last_step``), its status, best value and config. The driver thread
(Tune events) and the delivery thread (MLflow answers) both update records, under ``lock``.
The state file is rewritten atomically after each change that matters for a resume, so it is
always at least as new as anything Tune pickled: it is what makes a resumed search log into
the same child runs and never log a step twice.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coatnet.search.checkpoints import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["TrialRecords", "atomic_write_json", "read_json"]


def atomic_write_json(path: Path, data: Any) -> None:
    """Write via a temp file + rename so a killed driver never leaves a torn state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, default=str, indent=1, sort_keys=True)
    atomic_write_bytes(path, text.encode())


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (with a warning)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable tracking state %s: %s", path, exc)
        return None


class TrialRecords:
    """trial id -> record, for the trials of ``parent_run_id``, saved to ``path``.

    Hold ``lock`` while reading or changing a record (``get`` hands out the live dict).
    """

    def __init__(self, path: Path | str, *, parent_run_id: str) -> None:
        self.path = Path(path)
        self.parent_run_id = parent_run_id
        self.lock = threading.RLock()
        self._records: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        """Adopt records of this parent run from the state file (a resumed search)."""
        data = read_json(self.path) or {}
        with self.lock:
            for trial_id, rec in data.items():
                if not isinstance(rec, dict) or rec.get("parent_run_id") not in (
                    None,
                    self.parent_run_id,
                ):
                    continue
                mine = self._records.setdefault(trial_id, {})
                last_step = max(int(rec.get("last_step") or 0), int(mine.get("last_step") or 0))
                mine.update(rec)
                mine["last_step"] = last_step

    def save(self) -> None:
        """Write every record to the state file (a failure is logged, not raised)."""
        snapshot = self.snapshot()
        try:
            atomic_write_json(self.path, snapshot)
        except OSError as exc:
            logger.warning("Could not write MLflow tracking state %s: %s", self.path, exc)

    def get(self, trial_id: str) -> dict[str, Any]:
        """The live record of ``trial_id``, created with its defaults (caller holds ``lock``)."""
        rec = self._records.setdefault(trial_id, {})
        rec.setdefault("parent_run_id", self.parent_run_id)
        rec.setdefault("last_step", 0)
        rec.setdefault("status", "running")
        return rec

    def existing(self, trial_id: str) -> dict[str, Any]:
        """The record of ``trial_id`` as it is, {} if there is none (caller holds ``lock``)."""
        return self._records.get(trial_id, {})

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(trial id, live record) pairs (caller holds ``lock``)."""
        return iter(list(self._records.items()))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A deep copy of every record."""
        with self.lock:
            return copy.deepcopy(self._records)

    def merge(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Fill in records from Tune's saved callback state (``get_state``).

        Only what a record lacks is taken, except ``last_step``, which takes the larger: the
        state file is written after each successful log, so what it says is newer.
        """
        with self.lock:
            for trial_id, rec in records.items():
                mine = self._records.setdefault(trial_id, {})
                for key, value in rec.items():
                    if key == "last_step":
                        mine[key] = max(int(value or 0), int(mine.get(key, 0) or 0))
                    elif mine.get(key) is None:
                        mine[key] = value


@dataclass(frozen=True)
class RecordedRunIds:
    """The MLflow child run id recorded for a Tune trial in ``path`` (None before its run
    exists); a picklable lookup for the searcher, which Tune pickles with its state."""

    path: str

    def __call__(self, trial_id: str) -> str | None:
        record = (read_json(Path(self.path)) or {}).get(trial_id)
        run_id = record.get("run_id") if isinstance(record, dict) else None
        return str(run_id) if run_id else None
