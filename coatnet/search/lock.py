"""One driver per experiment directory: ``DriverLock``.

Two drivers on the same experiment (the same ``--name`` started twice) would both restore
Tune's state, both write ``mlflow_runs.json`` and both train the same trials. The lock is an
``flock`` on ``<experiment_dir>/driver.lock``: the kernel drops it when the holder exits, even on
SIGKILL or an OOM kill, so a lock left by a killed driver never blocks a resume. The file keeps
the holder's pid, host and start time, for the message that refuses a second driver.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from coatnet.search.errors import SearchAlreadyRunning

LOCK_FILE = "driver.lock"


class DriverLock:
    """``with DriverLock(experiment_dir, name=...)``: hold the experiment for this process."""

    def __init__(self, experiment_dir: Path, *, name: str) -> None:
        self.path = Path(experiment_dir) / LOCK_FILE
        self.name = name
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started "
                   f"{holder.get('started')}") if holder else "another process"
            raise SearchAlreadyRunning(
                f"search {self.name!r} is already running ({who}); its experiment directory "
                f"{self.path.parent} takes one driver at a time. Wait for it to finish or stop "
                "it, then resume with --resume") from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (acquired, not yet released)."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> DriverLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
