"""Test-only fault injection: the one hook the reliability tests use to break a running search.

Nothing in a user's search sets it. The test suite turns it on by putting a JSON fault plan in
the driver's environment (``COATNET_TEST_FAULTS='{"raise_at_epoch": 2, "marker": "/tmp/m"}'``);
the runner then carries the plan to every trial inside the trial config (so it reaches
workers on any node), and the training loop calls ``FaultPlan.before_epoch`` once per epoch.
With no plan, the loop's only cost is one ``None`` check per epoch.

What a plan can do (every key optional):

* ``raise_at_epoch`` + ``marker``: raise once at that epoch (rank 0); the marker file records
  that it fired. With ``truncate_latest_checkpoint`` the newest local checkpoint loses its
  second half first (a torn write).
* ``kill_at_epoch`` + ``kill_marker``: SIGKILL the process once at that epoch (an OOM kill, a
  lost worker); of several trials reaching it at once exactly one dies (``O_EXCL``).
* ``raise_always_if_lr``: every epoch of a trial with exactly this lr raises (fails for good).
* ``nan_loss_at_epoch``: the loss is NaN from that epoch on (a diverging trial).
* ``sleep_per_epoch_s``: sleep before each epoch (widens the window for interrupts and kills).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULTS_ENV = "COATNET_TEST_FAULTS"
CONFIG_KEY = "faults"  # where the runner puts the plan in the Tune trial config


@dataclass(frozen=True)
class FaultPlan:
    """The faults to inject into every trial of one search (see the module docstring)."""

    raise_at_epoch: int | None = None
    marker: str | None = None
    truncate_latest_checkpoint: bool = False
    kill_at_epoch: int | None = None
    kill_marker: str | None = None
    raise_always_if_lr: float | None = None
    nan_loss_at_epoch: int | None = None
    sleep_per_epoch_s: float | None = None

    def __post_init__(self) -> None:
        if self.raise_at_epoch is not None and not self.marker:
            raise ValueError("fault raise_at_epoch needs marker (a file path)")
        if self.kill_at_epoch is not None and not self.kill_marker:
            raise ValueError("fault kill_at_epoch needs kill_marker (a file path)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FaultPlan | None:
        if not data:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{FAULTS_ENV}: unknown fault(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        """The plan in ``$COATNET_TEST_FAULTS`` (JSON), or None when it is unset."""
        raw = os.environ.get(FAULTS_ENV)
        return cls.from_dict(json.loads(raw)) if raw else None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False)}

    def poisons(self, epoch: int) -> bool:
        """Whether the loss of this epoch is to be NaN."""
        return self.nan_loss_at_epoch is not None and epoch >= int(self.nan_loss_at_epoch)

    def before_epoch(self, *, epoch: int, rank: int, lr: float,
                     local_checkpoint_dir: str | None) -> None:
        """Called by the loop before each epoch: raise, kill or sleep as the plan says."""
        self._maybe_raise(epoch=epoch, rank=rank, local_dir=local_checkpoint_dir)
        self._maybe_kill(epoch=epoch, rank=rank)
        if self.raise_always_if_lr is not None and float(lr) == float(self.raise_always_if_lr):
            raise RuntimeError(f"injected permanent fault (lr={lr}) at epoch {epoch}")
        if self.sleep_per_epoch_s:
            time.sleep(float(self.sleep_per_epoch_s))

    def _maybe_raise(self, *, epoch: int, rank: int, local_dir: str | None) -> None:
        if self.raise_at_epoch is None or epoch != int(self.raise_at_epoch) or rank != 0:
            return
        marker = Path(str(self.marker))
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fired at epoch {epoch}\n")
        if self.truncate_latest_checkpoint and local_dir:
            from coatnet.search.checkpoints import CHECKPOINT_FILE, newest_first

            newest = newest_first(Path(local_dir).glob("epoch_*"))
            if newest:  # a torn write: the latest checkpoint loses its second half
                path = newest[0] / CHECKPOINT_FILE
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
        raise RuntimeError(f"injected fault at epoch {epoch}")

    def _maybe_kill(self, *, epoch: int, rank: int) -> None:
        if self.kill_at_epoch is None or epoch != int(self.kill_at_epoch) or rank != 0:
            return
        try:  # O_EXCL: of several trials reaching the epoch at once, exactly one dies
            fd = os.open(str(self.kill_marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"killed pid {os.getpid()} at epoch {epoch}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
