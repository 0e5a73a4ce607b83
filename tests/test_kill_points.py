"""One search SIGKILLed at many points and resumed each time, in the style of Ray's own restore
tests (``test_experiment_restore.py``): whatever the kill moment, the next resume carries on and
the finished search is clean.

Kill points (seeded by ``COATNET_FAULT_SEED``; ``COATNET_KILL_POINTS`` sets how many, 5 by
default and at least: one of each kind): during a driver's start-up, right after a trial's MLflow run turns FINISHED, right
after a new trial's MLflow run appears, at a random moment while trials train (between Tune's
periodic saves), and during the final export. After every kill the next driver is started with
``--resume``; any driver that ends by itself must end with exit 0. At the end:

- the leaderboard holds exactly the user's number of trials, all completed;
- MLflow has exactly one active child run per leaderboard trial, FINISHED, each epoch logged
  once; no other active child (runs of trials Tune never saved are deleted), the parent FINISHED
  with the same counts;
- ``mlflow_runs.json`` records every trial as completed;
- the stored Optuna study has no RUNNING trial, and less the asks of killed drivers that Tune
  never saved (recorded as orphans, failed if they were still running) one COMPLETE trial per
  leaderboard trial;
- progress never went backwards: a trial Tune had saved as finished stays finished, and its
  results and checkpoints are never written again (not retrained).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from test_reliability import (  # noqa: F401 - drivers is a fixture
    Driver,
    SPACE,
    assert_mlflow_consistent,
    drivers,
    experiment_trials,
    leaderboard,
    snapshot,
)

from coatnet.search.searcher import search_trials, storage_url

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
logger = logging.getLogger(__name__)

NUM_SAMPLES, EPOCHS = 8, 3
SLOW = {"sleep_per_epoch_s": 0.5}  # widens every window; a trial takes about 3 s
EVENT_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class KillPoint:
    kind: str  # startup | trial_started | trial_finished | training | export
    delay_s: float  # after the event (after the driver's start for startup/training)


def schedule(rng: random.Random, count: int) -> list[KillPoint]:
    """``count`` kill points spread over the search, the export one last."""
    kinds = ["trial_finished", "trial_started", "startup", "training"]
    body = [kinds[i % len(kinds)] for i in range(max(1, count - 1))]
    rng.shuffle(body)
    points = []
    for kind in body:
        if kind == "startup":
            delay = rng.uniform(0.5, 5.0)
        elif kind == "training":
            delay = rng.uniform(5.0, 10.0)
        else:
            delay = rng.choice([0.0, rng.uniform(0.0, 0.5)])
        points.append(KillPoint(kind, round(delay, 2)))
    return points + [KillPoint("export", 0.0)]


class Watch:
    """What a driver has done so far, read the way a user would: MLflow over HTTP, files."""

    def __init__(self, uri: str, experiment_dir: Path) -> None:
        self.client = MlflowClient(uri)
        self.experiment_dir = experiment_dir

    def parent_run_id(self) -> str | None:
        try:
            state = json.loads((self.experiment_dir / "search_state.json").read_text())
        except (OSError, ValueError):
            return None
        return state.get("parent_run_id")

    def children(self) -> list[Any]:
        parent = self.parent_run_id()
        if parent is None:
            return []
        try:
            experiment_id = self.client.get_run(parent).info.experiment_id
            return self.client.search_runs(
                [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        except Exception:  # noqa: BLE001 - the state file may name a run not yet visible
            return []

    def counts(self) -> tuple[int, int]:
        runs = self.children()
        return len(runs), sum(r.info.status == "FINISHED" for r in runs)

    def export_mtime(self) -> float:
        path = self.experiment_dir / "leaderboard.csv"
        return path.stat().st_mtime if path.exists() else 0.0


def run_to(driver: Driver, point: KillPoint, watch: Watch, *, first: bool) -> int | None:
    """Wait for the kill point and SIGKILL the driver (None), or the driver's own exit code.

    The first driver's start-up kill comes once the search exists (its state file is written):
    a search killed before that left nothing to resume, and ``--resume`` says so.
    """
    while first and watch.parent_run_id() is None:
        if driver.proc.poll() is not None:
            return driver.proc.returncode
        time.sleep(0.1)
    started = time.monotonic()
    base_runs, base_finished = watch.counts()
    base_export = watch.export_mtime()

    def reached() -> bool:
        if point.kind in ("startup", "training"):
            return time.monotonic() - started >= point.delay_s
        if point.kind == "export":
            return watch.export_mtime() > base_export
        runs, finished = watch.counts()
        return runs > base_runs if point.kind == "trial_started" else finished > base_finished

    while not reached():
        if driver.proc.poll() is not None:
            return driver.proc.returncode
        assert time.monotonic() - started < EVENT_TIMEOUT_S, (
            f"{point} never came:\n{driver.log()[-4000:]}")
        time.sleep(0.1)
    if point.kind not in ("startup", "training"):
        time.sleep(point.delay_s)
    if driver.proc.poll() is not None:
        return driver.proc.returncode
    os.kill(driver.proc.pid, signal.SIGKILL)
    driver.kill_all()
    return None


def study(experiment_dir: Path, study_name: str) -> optuna.Study:
    """The search's stored Optuna study."""
    return optuna.load_study(study_name=study_name, storage=storage_url(experiment_dir))


def test_sigkill_at_many_points_then_resume(drivers, tmp_path: Path, mlflow_server: str) -> None:
    seed = int(os.environ.get("COATNET_FAULT_SEED", "11"))
    count = max(5, int(os.environ.get("COATNET_KILL_POINTS", "5")))
    rng = random.Random(seed)
    points = schedule(rng, count)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(num_samples=NUM_SAMPLES, epochs=EPOCHS, max_failures=0,
                                  objectives="",
                                  seed=seed).replace("searcher: random", "searcher: tpe"))
    args = ["--space", str(space), "--name", "kills", "--storage-path", str(tmp_path / "runs"),
            "--mlflow-uri", mlflow_server, "--experiment-name", f"rel-kills-{seed}"]
    experiment = tmp_path / "runs" / "kills"
    watch = Watch(mlflow_server, experiment)
    finished_seen: dict[str, dict[str, Any]] = {}  # trial -> snapshot when first saved finished
    kills: list[KillPoint] = []
    started = time.monotonic()
    for index, point in enumerate(points):
        resume = index > 0
        driver = drivers([*args, "--resume"] if resume else args, name=f"run{index}",
                         faults=SLOW)
        code = run_to(driver, point, watch, first=index == 0)
        if code is not None:  # ended by itself: it must have finished the search
            assert code == 0, f"driver {index} exited {code}:\n{driver.log()[-4000:]}"
            break
        kills.append(point)
        saved = experiment_trials(experiment)
        for trial_id, status in saved.items():
            if status == "TERMINATED" and trial_id not in finished_seen:
                finished_seen[trial_id] = snapshot(experiment / f"trial_{trial_id}")
        gone_back = [t for t in finished_seen if saved.get(t) != "TERMINATED"]
        assert not gone_back, f"after {point}: finished trials no longer finished: {gone_back}"
        logger.info("kill %d at %s: %d trial(s) saved as finished", index, point,
                    len(finished_seen))
    else:
        final = drivers([*args, "--resume"], name="final", faults=SLOW)
        assert final.wait(300) == 0, final.log()[-4000:]
    wall = time.monotonic() - started
    logger.info("%d kills (%s), wall %.0f s", len(kills),
                ", ".join(p.kind for p in kills), wall)
    rows = leaderboard(experiment)
    trial_ids = [r["trial_id"] for r in rows]
    assert len(trial_ids) == NUM_SAMPLES and len(set(trial_ids)) == NUM_SAMPLES, trial_ids
    assert all(r["status"] == "completed" for r in rows), rows

    parent = watch.parent_run_id()
    assert parent is not None
    assert_mlflow_consistent(mlflow_server, parent, trials={t: EPOCHS for t in trial_ids})
    unsettled = {r.data.tags.get("tune_trial_id"): (r.info.status, r.data.tags.get("status"))
                 for r in watch.children() if r.info.status != "FINISHED"}
    assert not unsettled, (unsettled, [line for log in sorted(tmp_path.glob("*.log"))
                                       for line in log.read_text().splitlines()
                                       if any(t and t in line for t in unsettled)][-60:])
    parent_run = watch.client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics["trials_completed"] == NUM_SAMPLES
    assert parent_run.data.metrics["trials_total"] == NUM_SAMPLES

    records = json.loads((experiment / "mlflow_runs.json").read_text())
    assert {t: records.get(t, {}).get("status") for t in trial_ids} == \
        {t: "completed" for t in trial_ids}

    stored = study(experiment, "kills")
    states = [t.state.name for t in stored.get_trials()]
    assert "RUNNING" not in states, states
    live = search_trials(stored)
    assert sorted(t.user_attrs["tune_trial_id"] for t in live) == sorted(trial_ids), states
    assert all(t.state.name == "COMPLETE" for t in live), states
    # asks of killed drivers that Tune never saved are marked (and, if they were RUNNING,
    # failed above); the rest are one to one with the leaderboard

    for trial_id, before in finished_seen.items():  # never retrained
        after = snapshot(experiment / f"trial_{trial_id}")
        assert after["result"] == before["result"], (trial_id, "result.json changed")
        assert set(after["checkpoints"]) <= set(before["checkpoints"]), trial_id
    assert len(kills) == count, f"the search finished after only {len(kills)} of {count} kills"
