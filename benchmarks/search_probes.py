"""Timing probes that search_overhead.py puts into the search's trials, and reading them back.

How the times are taken (all ``time.time()`` on this one machine):

* *start -> first step*: the loop's own ``startup_s`` metric, i.e. from ``run_trial``'s entry
  (``runtime.started_at``; in the plain loop the objective sets it right after sampling the
  candidate) to the first training batch in hand, before its forward pass.
* *dead time*: from the moment the last epoch's report is handed to the reporter (training
  and validation of the last epoch done) to the next trial's first step. It holds the final
  checkpoint save, the report, trial teardown, the searcher, the next trial's set-up and the
  first batch.
* In the search system the benchmark wraps ``run_trial`` (``timed_run_trial``, put in place in
  the driver before ``run_search`` imports it) so that inside each trial actor it wraps
  ``train_loop.make_reporter``'s reporter with a timer (``TimedReporter``) that appends one
  JSON line per report to a file, the *sink*; the plain loop uses the same timer. Nothing in
  the repository is edited; the patches live only in the benchmark's processes.

The probes run inside Ray trial actors and Train workers: search_overhead.py registers this
module with ``ray.cloudpickle.register_pickle_by_value``, so they travel by value (as functions
of a ``__main__`` script do) and the workers need not import it. For the same reason the
functions that run there use the standard library only (no ``harness``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import harness  # driver-side reading back only

class TimedReporter:
    """Wraps a train_loop reporter; appends one JSON line per report (before reporting, since
    Tune may end the trial inside the last report)."""

    def __init__(self, inner: Any, runtime: Any, sink: str) -> None:
        self._inner = inner
        self._runtime = runtime
        self._sink = sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        line = {"t_report": time.time(), "epoch": epoch, "pid": os.getpid(),
                "started_at": self._runtime.started_at,
                "startup_s": metrics.get("startup_s"),
                "epoch_time_s": metrics.get("epoch_time_s"),
                "val_accuracy": metrics.get("val_accuracy"), "status": metrics.get("status")}
        try:
            self._inner.report(metrics, state=state, epoch=epoch)
            line["returned"] = True
        finally:  # Tune may end the trial inside the last report (it raises there)
            line["t_done"] = time.time()
            with open(self._sink, "a") as fh:
                fh.write(json.dumps(line) + "\n")


def install_timer(sink: str) -> None:
    """Wrap the reporter factory the loop calls (``coatnet.search.train_loop.make_reporter``)
    in *this* process (idempotent)."""
    import coatnet.search.train_loop as tl

    if getattr(tl.make_reporter, "_overhead_timer", False):
        return
    original = tl.make_reporter

    def make(runtime: Any) -> Any:
        return TimedReporter(original(runtime), runtime, sink)

    make._overhead_timer = True  # type: ignore[attr-defined]
    tl.make_reporter = make


def timed_loop_factory(sink: str) -> Any:
    """A train_loop_per_worker that notes when the loop is entered (in the worker), installs
    the report timer there, then runs the real loop."""
    def train_loop_per_worker(config: dict[str, Any]) -> None:
        import coatnet.search.train_loop as tl

        t_loop = time.time()
        install_timer(sink)
        with open(sink, "a") as fh:
            fh.write(json.dumps({"t_loop_enter": t_loop, "pid": os.getpid(),
                                 "started_at": (config.get("runtime") or {}).get("started_at")})
                     + "\n")
        tl.train_loop_per_worker(config)

    return train_loop_per_worker


def timed_run_trial_for(sink: str) -> Any:
    """A stand-in for coatnet.search.trial.run_trial that installs the timers in the trial
    actor (and, through the loop function, in Train workers), then calls the real one. The
    sink path travels inside the function (pickled by value), not in the trial config."""

    def run_trial(config: dict[str, Any]) -> None:
        import coatnet.search.trial as trial_mod
        from coatnet.search.trial import run_trial as real  # the unpatched one in an actor

        install_timer(sink)
        if not getattr(trial_mod.train_loop_per_worker, "_overhead_timer", False):
            loop = timed_loop_factory(sink)
            loop._overhead_timer = True  # type: ignore[attr-defined]
            trial_mod.train_loop_per_worker = loop
        t_enter = time.time()
        try:
            real(config)
        finally:
            with open(sink, "a") as fh:
                fh.write(json.dumps({"t_enter": t_enter, "t_exit": time.time(),
                                     "pid": os.getpid()}) + "\n")

    return run_trial


# ------------------------------------------------------------------------------- reading back
# (in the driver only, after the run)


def read_sink(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sink's report lines, and its other lines (run_trial entries and loop entries)."""
    reports, calls = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            (reports if "t_report" in row else calls).append(row)
    return reports, calls


def trials_from_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group report lines per trial attempt (keyed by started_at), ordered by first step."""
    by_start: dict[float, list[dict[str, Any]]] = {}
    for row in reports:
        by_start.setdefault(row["started_at"], []).append(row)
    trials = []
    for started_at, rows in by_start.items():
        rows.sort(key=lambda r: r["t_report"])
        startup = next((r["startup_s"] for r in rows if r["startup_s"] is not None), None)
        trials.append({"epoch_time_s": sum(r["epoch_time_s"] or 0.0 for r in rows),
                       "report_s": sum(r["t_done"] - r["t_report"] for r in rows[:-1]),
                       "started_at": started_at, "startup_s": startup,
                       "first_step": started_at + startup if startup is not None else None,
                       "last_report": rows[-1]["t_report"], "epochs": len(rows),
                       "val_accuracy": rows[-1]["val_accuracy"], "status": rows[-1]["status"]})
    trials.sort(key=lambda t: t["started_at"])
    return trials


def summarize_trials(trials: list[dict[str, Any]], *, t0: float, t1: float) -> dict[str, Any]:
    """The figures of one search call (``t0`` .. ``t1``) from its trials."""
    startup = harness.summarize(t["startup_s"] for t in trials if t["startup_s"] is not None)
    gaps = harness.summarize(b["first_step"] - a["last_report"]
                             for a, b in zip(trials, trials[1:]))
    busy = sum(t["last_report"] - t["first_step"] for t in trials)
    return {
        "wall_s": t1 - t0, "trials": len(trials),
        "startup_median_s": startup.median if startup else None,
        "startup_max_s": startup.max if startup else None,
        "dead_median_s": gaps.median if gaps else None,
        "dead_max_s": gaps.max if gaps else None,
        "dead_sum_s": gaps.sum if gaps else 0,
        "busy_s": busy,
        "epoch_time_sum_s": sum(t["epoch_time_s"] for t in trials),
        "report_block_sum_s": sum(t["report_s"] for t in trials),
        "before_first_step_s": trials[0]["first_step"] - t0 if trials else None,
        "after_last_report_s": t1 - trials[-1]["last_report"] if trials else None,
        "val_accuracy": [t["val_accuracy"] for t in trials],
    }


def loop_entries(calls: list[dict[str, Any]]) -> list[float]:
    """Per trial attempt (by start), run_trial entry -> first worker's loop entry, seconds."""
    loop_enter: dict[float, float] = {}
    for row in calls:
        if "t_loop_enter" in row:
            key = row["started_at"]
            loop_enter[key] = min(loop_enter.get(key, row["t_loop_enter"]), row["t_loop_enter"])
    return [loop_enter[k] - k for k in sorted(loop_enter)]


def tune_results(experiment_dir: Path) -> list[list[dict[str, Any]]]:
    """Every trial's reported results (Tune's result.json lines), ordered by trial start."""
    out = []
    for path in experiment_dir.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out.append(rows)
    out.sort(key=lambda rows: str(rows[0].get("trial_id", "")))
    return out
