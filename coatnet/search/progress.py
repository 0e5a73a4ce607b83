"""A one-line progress report of the search, so long runs show where they stand."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

from coatnet.search.results import trial_status

logger = logging.getLogger("coatnet.search")


class ProgressCallback(Callback):
    """Logs trials done / running / stopped and the best value so far, at most every
    ``interval_s`` seconds and whenever a trial finishes."""

    def __init__(self, *, metric: str, mode: str, max_epochs: int,
                 interval_s: float = 15.0) -> None:
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.interval_s = interval_s
        self._last_log = 0.0
        self._best: tuple[float, str] | None = None
        self._finished: dict[str, str] = {}

    def _better(self, value: float) -> bool:
        if self._best is None:
            return True
        return value > self._best[0] if self.mode == "max" else value < self._best[0]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        value = result.get(self.metric)
        if result.get("status") == "running" and isinstance(value, (int, float)) \
                and self._better(float(value)):
            self._best = (float(value), trial.trial_id)
        if time.monotonic() - self._last_log >= self.interval_s:
            self._log(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished[trial.trial_id] = trial_status(trial.last_result,
                                                      max_epochs=self.max_epochs)
        self._log(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished[trial.trial_id] = "failed"
        self._log(trials)

    def _log(self, trials: list) -> None:
        self._last_log = time.monotonic()
        running = sum(1 for t in trials if t.status == "RUNNING")
        pending = sum(1 for t in trials if t.status == "PENDING")
        counts: dict[str, int] = {}
        for status in self._finished.values():
            counts[status] = counts.get(status, 0) + 1
        done = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
        best = (f"best {self.metric} {self._best[0]:.4f} ({self._best[1]})" if self._best
                else f"no {self.metric} yet")
        logger.info("trials finished: %d (%s) | running: %d | pending: %d | %s",
                    len(self._finished), done, running, pending, best)
