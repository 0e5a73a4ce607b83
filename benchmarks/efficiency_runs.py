"""The runs file of ``search_efficiency.py``: every finished run, kept so that a benchmark can
be continued by a later process and its report rebuilt without training anything again.

One gzip member per run, each one JSON line: the settings that make runs comparable (``key``:
the space file's sha256, budget, epochs per trial, concurrency, objectives), the method and
seed, the run's wall time, the commit and date it ran on, and its per-epoch rows (the fields
the report reads). A run is reused only under the same key; runs under another key stay in the file,
untouched. Delete the file to measure everything anew.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunKey", "RunsFile", "runs_path"]

FIELDS = ("t", "trial", "epoch", "status", "val_accuracy", "test_accuracy", "params", "macs",
          "latency_ms", "resumed")


@dataclass(frozen=True)
class RunKey:
    """What two runs must share to sit in one table."""

    space_sha256: str
    budget: int
    epochs: int
    concurrency: int
    objectives: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, *, space: Path, budget: int, epochs: int, concurrency: int,
           objectives: Sequence[tuple[str, str]]) -> RunKey:
        return cls(space_sha256=hashlib.sha256(space.read_bytes()).hexdigest(), budget=budget,
                   epochs=epochs, concurrency=concurrency,
                   objectives=tuple((m, mode) for m, mode in objectives))

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "objectives": [list(o) for o in self.objectives]}


def runs_path(results: Path) -> Path:
    """The runs file next to a results file: ``X.md`` -> ``X.runs.jsonl.gz``."""
    return results.with_suffix(".runs.jsonl.gz")


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in FIELDS if k in row}
    for name, digits in (("t", 3), ("latency_ms", 4)):
        if isinstance(out.get(name), float):
            out[name] = round(out[name], digits)
    return out


def _commit(where: Path = Path(__file__).parent) -> str | None:
    """The short commit the run measured, ``+dirty`` when tracked files had changed since."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=where, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class RunsFile:
    """The runs recorded at ``path`` under ``key``: ``done()`` reads them, ``append`` adds
    one as soon as it has finished (an interrupted benchmark keeps every finished run)."""

    def __init__(self, path: Path, *, key: RunKey) -> None:
        self.path, self.key = path, key

    def done(self) -> dict[tuple[str, int], tuple[list[dict[str, Any]], float]]:
        """``(method, seed) -> (rows, wall seconds)`` of the runs under this key."""
        if not self.path.exists():
            return {}
        found: dict[tuple[str, int], tuple[list[dict[str, Any]], float]] = {}
        read = 0
        try:
            with gzip.open(self.path, "rt") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    run = json.loads(line)
                    read += 1
                    if run.get("key") == self.key.as_json():
                        found[(run["method"], int(run["seed"]))] = (
                            run["rows"], float(run["wall_s"]))
        except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(
                f"{self.path}: the runs file is unreadable after its first {read} run(s) "
                f"({type(exc).__name__}: {exc}); a run was probably cut while it was written. "
                "Move the file away (or pass --runs with a new path) to measure those runs "
                "again.") from exc
        return found

    def append(self, *, method: str, seed: int, rows: list[dict[str, Any]],
               wall_s: float) -> None:
        record = {"key": self.key.as_json(), "method": method, "seed": seed,
                  "wall_s": round(wall_s, 1), "commit": _commit(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "rows": [_compact(r) for r in rows]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(self.path, "at") as fh:  # one gzip member per run
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
