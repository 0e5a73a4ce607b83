"""Faults injected into real searches: a killed driver, Ctrl-C, raising and killed trials, a
restarted MLflow server, damaged and malicious checkpoints, undelivered tracking data.

Real Ray, Optuna, MLflow server (HTTP) and TorchTrainer on CPU with synthetic data and tiny
models. Drivers run as ``experiments/search.py`` subprocesses in their own process group with
their own ``RAY_TMPDIR``; teardown kills that group and every process whose command line names
that directory (the local Ray cluster the driver started), also when a test fails.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import optuna_dashboard
from mlflow.tracking import MlflowClient

from coatnet.search.faults import FAULTS_ENV
from coatnet.search.figures import FIGURE_FILES
from coatnet.search.worker_logs import WORKER_LOG

REPO = Path(__file__).resolve().parents[1]
SEARCH = REPO / "experiments" / "search.py"
SYNC = REPO / "experiments" / "sync_mlflow.py"
pytestmark = [pytest.mark.slow, pytest.mark.cluster]
logger = logging.getLogger(__name__)

SPACE = """\
data:
  dataset: synthetic
  image_size: 32
  num_samples: 128
  num_classes: 4
  image_channel: 3
trial:
  epochs: {epochs}
  max_failures: {max_failures}
search:
{objectives}  num_samples: {num_samples}
  max_concurrent_trials: 2
  seed: {seed}
  searcher: random
  asha: {{grace_period: {epochs}, reduction_factor: 2}}  # no early stopping: runs are comparable
model:
  layout: {{type: categorical, choices: [CCTT, CCCC]}}
  depth: {{s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}}
  channels: {{s0: 8, s1: 16, s2: 16, s3: 32, s4: 32}}
  expand_scale: 2
  head_dim: 16
  path_dropout: 0.0
train:
  lr: {{type: categorical, choices: [0.003, 0.01]}}
  weight_decay: 0.01
  label_smoothing: 0.0
  batch_size: 64
  warmup_epochs: 1
"""


PARETO_OBJECTIVES = """\
  objectives: [{metric: val_accuracy, mode: max}, {metric: macs, mode: min}]
  latency: {repeats: 2, warmup: 1}
"""


def write_space(directory: Path, *, num_samples: int, epochs: int = 3, max_failures: int = 0,
                seed: int = 5, pareto: bool = False) -> Path:
    """The tiny space; ``pareto``: an accuracy-versus-MACs search (the layouts differ in MACs)."""
    path = directory / "space.yaml"
    path.write_text(SPACE.format(num_samples=num_samples, epochs=epochs,
                                 max_failures=max_failures, seed=seed,
                                 objectives=PARETO_OBJECTIVES if pareto else ""))
    return path


# ------------------------------------------------------------------------- MLflow checks
def children(client: MlflowClient, parent_run_id: str) -> list[Any]:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def assert_mlflow_consistent(uri: str, parent_run_id: str, *, trials: dict[str, int]) -> None:
    """Exactly one child per trial, none RUNNING, every epoch logged exactly once."""
    client = MlflowClient(uri)
    runs = children(client, parent_run_id)
    by_trial: dict[str, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags["tune_trial_id"], []).append(run)
    assert sorted(by_trial) == sorted(trials), (sorted(by_trial), sorted(trials))
    assert len(runs) == len(trials), "a trial has more than one MLflow run"
    for trial_id, (run,) in by_trial.items():
        assert run.info.status != "RUNNING", trial_id
        for key in ("val_accuracy", "train_loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, trials[trial_id] + 1)), (trial_id, key, steps)


def assert_front_kept(experiment: Path, uri: str, parent_run_id: str,
                      rows: list[dict[str, str]]) -> None:
    """A resumed two-objective search ends with its front: pareto.csv lists exactly the
    completed rows no other completed row dominates (accuracy up, MACs down), and the parent
    run holds it with the hypervolume."""
    done = {r["trial_id"]: (float(r["best_val_accuracy"]), float(r["macs"])) for r in rows
            if r["status"] == "completed"}

    def dominated(point: tuple[float, float]) -> bool:
        return any(o[0] >= point[0] and o[1] <= point[1] and o != point
                   for o in done.values())

    with (experiment / "pareto.csv").open() as handle:
        front = {r["trial_id"] for r in csv.DictReader(handle)}
    assert front == {t for t, p in done.items() if not dominated(p)}, (front, done)
    assert (experiment / "pareto.png").is_file()
    client = MlflowClient(uri)
    assert client.get_run(parent_run_id).data.metrics["hypervolume"] > 0
    assert {"pareto.csv", "pareto.png"} <= {a.path for a in client.list_artifacts(parent_run_id)}


# ------------------------------------------------------------------------- driver processes
class Driver:
    """``experiments/search.py`` in its own process group with a private Ray temp dir."""

    def __init__(self, workdir: Path, ray_tmp: Path, args: list[str], *, name: str,
                 faults: dict[str, Any] | None = None) -> None:
        self.ray_tmp = ray_tmp
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ)
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                   RAY_DEDUP_LOGS="0")
        env.pop("RAY_ADDRESS", None)
        env.pop(FAULTS_ENV, None)
        if faults:
            env[FAULTS_ENV] = json.dumps(faults)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(SEARCH), *args], cwd=workdir,
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"driver still running after {timeout_s}s:\n"
                                 f"{self.log()[-4000:]}") from None

    def kill_all(self) -> None:
        """SIGKILL the driver's process group and every process of its Ray session."""
        for attempt in range(50):
            pids = [self.proc.pid] if self.proc.poll() is None else []
            pids += ray_session_pids(self.ray_tmp)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if not ray_session_pids(self.ray_tmp) and self.proc.poll() is not None:
                return
            time.sleep(0.2)
        raise AssertionError(f"processes of {self.ray_tmp} survive: "
                             f"{ray_session_pids(self.ray_tmp)}")


def ray_session_pids(ray_tmp: Path) -> list[int]:
    """Processes whose command line names this test's Ray temp dir (its Ray cluster)."""
    needle = str(ray_tmp).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes() if not cmdline else b""
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            found.append(int(entry))
    return found


@pytest.fixture
def drivers(tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    """Start drivers; teardown kills each one's process group and Ray session."""
    started: list[Driver] = []
    # short: Ray puts unix sockets under it (108-byte limit)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rel", dir="/tmp"))

    def start(args: list[str], *, name: str, faults: dict[str, Any] | None = None) -> Driver:
        driver = Driver(tmp_path, ray_tmp, args, name=name, faults=faults)
        started.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in started:
            driver.kill_all()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def experiment_trials(experiment_dir: Path) -> dict[str, str]:
    """Tune's last saved experiment state: trial id -> status."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for trial_json, _runtime in data.get("trial_data", []):
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


def results_by_trial(experiment_dir: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in experiment_dir.glob("trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name.removeprefix("trial_")] = lines
    return out


def leaderboard(experiment_dir: Path) -> list[dict[str, str]]:
    with open(experiment_dir / "leaderboard.csv") as fh:
        return list(csv.DictReader(fh))


def wait_for(predicate: Callable[[], Any], *, timeout_s: float, driver: Driver | None = None,
             what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if driver is not None and driver.proc.poll() is not None:
            raise AssertionError(f"driver exited ({driver.proc.returncode}) while waiting for "
                                 f"{what}:\n{driver.log()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n"
                         f"{driver.log()[-4000:] if driver else ''}")


def snapshot(trial_dir: Path) -> dict[str, Any]:
    """What retraining would change: the results file and the checkpoint directories."""
    return {"result": (trial_dir / "result.json").read_bytes(),
            "checkpoints": sorted((p.name, (p / "checkpoint.pt").stat().st_mtime_ns)
                                  for p in trial_dir.glob("checkpoint_*")
                                  if (p / "checkpoint.pt").exists())}  # not the pruned ones


# ------------------------------------------------------------------------- the tests
def test_sigkill_driver_then_resume(drivers, tmp_path: Path, mlflow_server: str) -> None:
    """SIGKILL the driver the moment a trial's MLflow run turns FINISHED, without waiting for
    Tune to save that (the window between a trial finishing and Tune's next periodic save):
    one --resume finishes the search, the finished trials are not retrained, MLflow has N
    children, none RUNNING, no step twice, and the killed driver's lock does not block. The
    search is a two-objective one: the resumed search ends with its front."""
    n, epochs = 4, 3
    space = write_space(tmp_path, num_samples=n, epochs=epochs, pareto=True)
    args = ["--space", str(space), "--name", "killed", "--storage-path", str(tmp_path / "runs"),
            "--mlflow-uri", mlflow_server, "--experiment-name", "rel-sigkill"]
    # a trial (3 epochs x 2 s) outlasts Tune's 5 s save period, so Tune's saved state always
    # has it: the kill lands between its last save and the next one
    slow = {"sleep_per_epoch_s": 2.0}
    experiment = tmp_path / "runs" / "killed"
    first = drivers(args, name="first", faults=slow)
    client = MlflowClient(mlflow_server)

    def finished_in_mlflow() -> list[str] | None:
        try:
            state = json.loads((experiment / "search_state.json").read_text())
            runs = children(client, state["parent_run_id"])
        except (OSError, ValueError, KeyError):
            return None
        done = [r.data.tags["tune_trial_id"] for r in runs if r.info.status == "FINISHED"]
        return done or None

    done = wait_for(finished_in_mlflow, timeout_s=150, driver=first, what="a FINISHED run")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.kill_all()
    saved = experiment_trials(experiment)  # Tune's view may lag behind MLflow's
    saved_done = sorted(t for t, s in saved.items() if s == "TERMINATED")
    before = {t: snapshot(experiment / f"trial_{t}") for t in sorted(set(done) | set(saved_done))}
    state = json.loads((experiment / "search_state.json").read_text())
    assert client.get_run(state["parent_run_id"]).info.status == "RUNNING"  # orphaned
    lock = json.loads((experiment / "driver.lock").read_text())
    assert lock["pid"] == first.proc.pid  # the dead driver's lock is still on disk

    storage = f"sqlite:///{experiment / 'optuna.db'}"
    with optuna_dashboard(storage, tmp_path / "dashboard.log") as dashboard:
        at_kill = _dashboard_complete(dashboard)
        second = drivers([*args, "--resume"], name="second", faults=slow)
        # optuna-dashboard follows the stored study while the resumed search writes it
        seen = wait_for(lambda: second.proc.poll() is None and
                        _dashboard_complete(dashboard) > at_kill, timeout_s=240,
                        driver=second, what="optuna-dashboard showing a newly completed trial")
        assert seen
        assert second.wait(240) == 0, second.log()[-4000:]
    rows = leaderboard(experiment)
    trial_ids = [r["trial_id"] for r in rows]
    assert len(trial_ids) == n and len(set(trial_ids)) == n
    assert all(r["status"] == "completed" for r in rows), rows
    assert set(done) <= set(trial_ids), (done, trial_ids)
    for trial_id, earlier in before.items():  # not retrained
        after = snapshot(experiment / f"trial_{trial_id}")
        if trial_id in saved_done:  # Tune knew it had finished: not even re-reported
            assert after["result"] == earlier["result"], (trial_id, "result.json changed")
        # No checkpoint written again (one pruned afterwards is not a retrain).
        assert set(after["checkpoints"]) <= set(earlier["checkpoints"]), (
            trial_id, earlier["checkpoints"], after["checkpoints"])
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    assert_mlflow_consistent(mlflow_server, state["parent_run_id"],
                             trials={t: epochs for t in trial_ids})
    assert_front_kept(experiment, mlflow_server, state["parent_run_id"], rows)
    # the resumed finish redrew the pictures and logged them on the parent run again
    figures = {a.path for a in client.list_artifacts(state["parent_run_id"], "figures")}
    assert {f"figures/{name}" for name in FIGURE_FILES.values()} <= figures, figures
    # Ray's worker chatter went to the experiment's log file; the summary is printed last
    out = second.log()
    assert "(pid=" not in out and "pid=" in (experiment / WORKER_LOG).read_text()
    assert "View run" not in out  # nor MLflow's per-run links
    assert "Configuration for experiment" not in out and "tensorboard" not in out  # nor Tune's
    assert out.rstrip().splitlines()[-1].startswith("trials view:"), out[-2000:]
    logger.info("SIGKILL after %d finished run(s) (%d saved by Tune): resumed fine", len(done),
                len(saved_done))


def _dashboard_complete(base: str) -> int:
    """How many trials optuna-dashboard shows as complete (0 before the study exists)."""
    studies = requests.get(f"{base}/api/studies", timeout=10).json()["study_summaries"]
    if not studies:
        return 0
    trials = requests.get(f"{base}/api/studies/{studies[0]['study_id']}?after=0",
                          timeout=10).json()["trials"]
    return sum(t["state"] == "Complete" for t in trials)


def test_sigkill_before_tunes_first_save_then_resume(drivers, tmp_path: Path,
                                                     mlflow_server: str) -> None:
    """SIGKILL the driver once ``Tuner.fit`` has written ``tuner.pkl`` but Tune has not yet
    saved its experiment state (its first seconds): ``--resume`` starts Tune afresh and
    finishes the search. (Ray's restore accepts ``tuner.pkl`` alone, logs that there is no
    experiment state, runs one trial and leaves the rest unstarted, so every resume ended
    interrupted.)"""
    n, epochs = 3, 2
    space = write_space(tmp_path, num_samples=n, epochs=epochs)
    args = ["--space", str(space), "--name", "early", "--storage-path", str(tmp_path / "runs"),
            "--mlflow-uri", mlflow_server, "--experiment-name", "rel-early-kill"]
    experiment = tmp_path / "runs" / "early"
    first = drivers(args, name="first", faults={"sleep_per_epoch_s": 1.0})
    wait_for(lambda: (experiment / "tuner.pkl").exists(), timeout_s=150, driver=first,
             what="tuner.pkl")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.kill_all()
    assert not list(experiment.glob("experiment_state-*.json")), \
        "the kill came after Tune's first save: the window was missed"

    second = drivers([*args, "--resume"], name="second", faults={"sleep_per_epoch_s": 1.0})
    assert second.wait(240) == 0, second.log()[-4000:]
    assert "starting Tune afresh" in second.log()
    rows = leaderboard(experiment)
    assert len({r["trial_id"] for r in rows}) == n, rows
    assert all(r["status"] == "completed" for r in rows), rows
    state = json.loads((experiment / "search_state.json").read_text())
    assert MlflowClient(mlflow_server).get_run(state["parent_run_id"]).info.status == "FINISHED"
    assert_mlflow_consistent(mlflow_server, state["parent_run_id"],
                             trials={r["trial_id"]: epochs for r in rows})


def test_second_driver_on_the_same_experiment_is_refused(drivers, tmp_path: Path,
                                                         mlflow_server: str) -> None:
    """The same --name started twice: the second driver is refused at once with a clear
    message and changes nothing; the first finishes as if alone."""
    n, epochs = 2, 3
    space = write_space(tmp_path, num_samples=n, epochs=epochs)
    args = ["--space", str(space), "--name", "twice", "--storage-path", str(tmp_path / "runs"),
            "--mlflow-uri", mlflow_server, "--experiment-name", "rel-twice"]
    experiment = tmp_path / "runs" / "twice"
    # slow enough that the first is still running when the others have started and been
    # refused (their start-up alone takes seconds on a loaded machine)
    first = drivers(args, name="first", faults={"sleep_per_epoch_s": 8.0})
    wait_for(lambda: (experiment / "search_state.json").exists(), timeout_s=120, driver=first,
             what="the first driver's search state")
    state_before = (experiment / "search_state.json").read_bytes()
    for extra, name in (([], "second"), (["--resume"], "third")):
        other = drivers([*args, *extra], name=name)
        assert other.wait(120) == 2, other.log()[-4000:]
        errors = [line for line in other.log().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is already running" in errors[0], other.log()[-3000:]
        assert f"pid {first.proc.pid}" in errors[0]
        assert first.proc.poll() is None  # the first one is still running
    assert (experiment / "search_state.json").read_bytes() == state_before
    assert first.wait(240) == 0, first.log()[-4000:]
    rows = leaderboard(experiment)
    assert len(rows) == n and all(r["status"] == "completed" for r in rows)
    parent = json.loads(state_before)["parent_run_id"]
    assert_mlflow_consistent(mlflow_server, parent,
                             trials={r["trial_id"]: epochs for r in rows})


def test_sigints_with_resumes(drivers, tmp_path: Path, mlflow_server: str) -> None:
    """Ctrl-C at random points (``COATNET_SIGINTS``, 1 by default), resuming each time: the
    search completes, trial ids are unique, progress never goes backwards, the parent is never
    FINISHED early."""
    n, epochs = 4, 3
    wanted = max(1, int(os.environ.get("COATNET_SIGINTS", "1")))
    rng = random.Random(int(os.environ.get("COATNET_FAULT_SEED", "7")))
    space = write_space(tmp_path, num_samples=n, epochs=epochs)
    args = ["--space", str(space), "--name", "ctrlc", "--storage-path", str(tmp_path / "runs"),
            "--mlflow-uri", mlflow_server, "--experiment-name", "rel-sigint"]
    # 12 trial-epochs, 2 at a time, 2.5 s each: about 15 s of training, more than the
    # interrupts (each after new progress, plus up to 2 s) can use up
    slow = {"sleep_per_epoch_s": 2.5}
    experiment = tmp_path / "runs" / "ctrlc"
    client = MlflowClient(mlflow_server)
    interrupts = 0
    for attempt in range(8):
        resume = (experiment / "search_state.json").exists()  # else the same --name restarts
        driver = drivers([*args, "--resume"] if resume else args, name=f"run{attempt}",
                         faults=slow)
        if interrupts < wanted:
            # a random point: during start-up (imports, Ray, restore) or while trials train
            reported = sum(len(r) for r in results_by_trial(experiment).values())
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.5, 6.0))
            else:
                def progressed() -> bool:
                    return sum(len(r) for r in results_by_trial(experiment).values()) > reported

                wait_for(progressed, timeout_s=120, driver=driver, what="new progress")
                time.sleep(rng.uniform(0.0, 2.0))
            if driver.proc.poll() is None:
                os.kill(driver.proc.pid, signal.SIGINT)
                interrupts += 1
                code = driver.wait(120)
                if code == 0:
                    break  # the signal came after the last trial ended
                log = driver.log()
                assert code == 130, log[-4000:]
                assert "--resume" in log, log[-4000:]  # told how to continue
                state_file = experiment / "search_state.json"
                if state_file.exists():
                    parent_id = json.loads(state_file.read_text())["parent_run_id"]
                    # never FINISHED with trials unfinished, no child left RUNNING
                    assert client.get_run(parent_id).info.status != "FINISHED"
                    assert all(r.info.status != "RUNNING" for r in children(client, parent_id))
                continue
        assert driver.wait(240) == 0, driver.log()[-4000:]
        break
    assert interrupts == wanted, "every interrupt should have hit a running search"
    rows = leaderboard(experiment)
    trial_ids = [r["trial_id"] for r in rows]
    assert len(trial_ids) == n and len(set(trial_ids)) == n
    assert all(r["status"] == "completed" for r in rows), rows
    for trial_id, results in results_by_trial(experiment).items():
        # A resumed trial replays the epochs Tune's saved state lacks from its checkpoint's
        # history (marked: resumed_from_epoch >= epochs_done); they repeat the values first
        # reported, nothing is trained again.
        first_report = {}
        for r in results:
            first_report.setdefault(int(r["epochs_done"]), r)
        replays = [r for r in results
                   if int(r.get("resumed_from_epoch") or 0) >= r["epochs_done"]]
        for r in replays:
            assert r["val_accuracy"] == first_report[int(r["epochs_done"])]["val_accuracy"]
        epochs_seen = sorted({int(r["epochs_done"]) for r in results})
        results = [r for r in results if r not in replays]
        # Progress never goes backwards. Ray 2.60 logs a result before the save task that
        # registers its checkpoint resolves, so an interrupt in between resumes from the
        # previous checkpoint and that one epoch is reported again (by a new process).
        for before, after in zip(results, results[1:]):
            same_process = before["pid"] == after["pid"]
            assert after["epochs_done"] >= before["epochs_done"] + int(same_process), \
                (trial_id, [(r["epochs_done"], r["pid"]) for r in results])
        assert epochs_seen == list(range(1, epochs + 1))
    state = json.loads((experiment / "search_state.json").read_text())
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    assert_mlflow_consistent(mlflow_server, state["parent_run_id"],
                             trials={t: epochs for t in trial_ids})


def test_raising_killed_and_failing_trials(ray_local, tmp_path: Path, mlflow_server: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial raising at epoch 2 resumes from epoch 1's checkpoint; a worker SIGKILLed at
    epoch 3 (an OOM kill) is restarted by Tune from epoch 2's; a trial that always raises ends
    as failed; the search goes on, one MLflow run per trial."""
    from coatnet.search.runner import SearchOptions, run_search

    space = write_space(tmp_path, num_samples=4, epochs=3, max_failures=1, seed=4)
    fault = {"raise_at_epoch": 2, "marker": str(tmp_path / "raised"),
             "kill_at_epoch": 3, "kill_marker": str(tmp_path / "killed"),
             "raise_always_if_lr": 0.01}
    monkeypatch.setenv(FAULTS_ENV, json.dumps(fault))
    outcome = run_search(SearchOptions(space=space, storage_path=str(tmp_path / "runs"),
                                       name="faults", mlflow_uri=mlflow_server,
                                       experiment_name="rel-faults"))
    assert (tmp_path / "raised").exists() and (tmp_path / "killed").exists()
    statuses = {r.trial_id: r.status for r in outcome.rows}
    lrs = {r.trial_id: r.candidate.hparams.lr for r in outcome.rows}
    assert len(statuses) == 4
    assert {t for t, s in statuses.items() if s == "failed"} == \
        {t for t, lr in lrs.items() if lr == 0.01}, (statuses, lrs)
    assert sorted(lrs.values()) == [0.003, 0.003, 0.003, 0.01], "seed 4 samples these"
    results = results_by_trial(outcome.experiment_dir)
    resumed = {t: {int(r["epochs_done"]): int(r.get("resumed_from_epoch", 0))
                   for r in results[t]} for t, s in statuses.items() if s == "completed"}
    assert all(sorted(epochs) == [1, 2, 3] for epochs in resumed.values()), resumed
    # raised at the start of epoch 2: the retry started from epoch 1's checkpoint
    assert sum(r[2] == 1 for r in resumed.values()) == 1, resumed
    # SIGKILLed at the start of epoch 3: Tune restarted it from epoch 2's checkpoint
    assert sum(r[3] == 2 for r in resumed.values()) == 1, resumed
    client = MlflowClient(mlflow_server)
    runs = children(client, outcome.parent_run_id)
    assert sorted(r.data.tags["tune_trial_id"] for r in runs) == sorted(statuses)
    for run in runs:
        trial_id = run.data.tags["tune_trial_id"]
        assert run.info.status == ("FAILED" if statuses[trial_id] == "failed" else "FINISHED")
        assert run.data.tags["status"] == statuses[trial_id]
        if statuses[trial_id] == "completed":
            steps = [m.step for m in client.get_metric_history(run.info.run_id,
                                                               "val_accuracy")]
            assert steps == [1, 2, 3]
    assert outcome.mlflow_pending == 0


def test_mlflow_server_restarted_mid_search(ray_local, tmp_path: Path,
                                            mlflow_server_factory: Any,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Stop the tracking server while trials train and start it again: every metric arrives
    and the search reports nothing pending."""
    from coatnet.search.runner import SearchOptions, run_search

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"sleep_per_epoch_s": 0.5}))
    server = mlflow_server_factory("restarted")
    space = write_space(tmp_path, num_samples=2, epochs=4)
    experiment = tmp_path / "runs" / "outage"
    events: list[str] = []

    def chaos() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                runs = json.loads((experiment / "mlflow_runs.json").read_text())
            except (OSError, ValueError):
                runs = {}
            if any(r.get("run_id") for r in runs.values()):
                break
            time.sleep(0.1)
        server.stop()
        events.append("stopped")
        time.sleep(4.0)
        server.start()
        events.append("restarted")

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    caplog.set_level(logging.WARNING, logger="coatnet.search.tracking")
    outcome = run_search(SearchOptions(space=space, storage_path=str(tmp_path / "runs"),
                                       name="outage", mlflow_uri=server.uri,
                                       experiment_name="rel-outage"))
    thread.join(timeout=60)
    assert events == ["stopped", "restarted"]
    assert outcome.mlflow_pending == 0
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    assert_mlflow_consistent(server.uri, outcome.parent_run_id,
                             trials={r.trial_id: r.epochs_done for r in outcome.rows})
    assert MlflowClient(server.uri).get_run(outcome.parent_run_id).info.status == "FINISHED"


def test_sync_command_delivers_what_a_dead_server_missed(tmp_path: Path,
                                                         mlflow_server: str) -> None:
    """Tracking data journaled while the server was down (and the parent run's summary) is
    delivered by experiments/sync_mlflow.py; exit 3 while the server is still down."""
    from conftest import free_port

    from coatnet.search.tracking import (MLflowTrackingCallback, PARENT_PENDING_FILE,
                                         pending_tracking_operations, start_parent_run)

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    experiment = tmp_path / "runs" / "offline"
    experiment.mkdir(parents=True)
    parent = start_parent_run(tracking_uri=mlflow_server, experiment_name="rel-sync",
                              run_name="offline", search_settings={"x": 1}, space_text="x: 1",
                              space_sha256="0" * 64, resume_run_id=None)
    dead = f"http://127.0.0.1:{free_port()}"
    (experiment / "search_state.json").write_text(json.dumps(
        {"parent_run_id": parent, "tracking_uri": dead}))

    class FakeTrial:
        trial_id = "s0001"
        config = {"candidate": {"model": {"num_classes": 4}, "hparams": {"lr": 0.01},
                                "params": 10, "macs": 20}}
        last_result: dict[str, Any] = {}

        def __str__(self) -> str:
            return "trial_s0001"

    trial = FakeTrial()
    callback = MLflowTrackingCallback(tracking_uri=dead, parent_run_id=parent,
                                      experiment_id="0", state_path=experiment /
                                      "mlflow_runs.json", max_epochs=2, flush_timeout_s=1,
                                      retry_max_s=0.2)
    callback.setup()
    for epoch in (1, 2):
        callback.on_trial_result(iteration=0, trials=[trial], trial=trial, result={
            "epochs_done": epoch, "val_accuracy": 0.3 * epoch, "train_loss": 1.0 / epoch,
            "val_loss": 1.0, "images_per_s": 1.0, "epoch_time_s": 1.0, "status": "running"})
    callback.on_trial_complete(iteration=0, trials=[trial], trial=trial)
    callback.on_experiment_end(trials=[trial])
    # the finish also lists the best model to log and register: the sync command does both
    model = dict(image_height=32, image_width=32, image_channel=3, num_classes=4,
                 num_blocks_in_layers=[1, 1, 1, 1, 1], num_channels_in_layers=[8, 8, 16, 16, 16],
                 block_type_in_layers=["C", "C", "T", "T"], expand_scale_in_layers=2,
                 head_dim=8)
    from coatnet.search.checkpoints import save_state
    from coatnet.search.tracking.models import build_coatnet, logged_model_uri

    weights = build_coatnet({"candidate": {"model": model}}).state_dict()
    save_state({"epoch": 2, "model": weights, "model_config": model}, experiment / "ckpt")
    best = {"trial_id": "s0001", "checkpoint": str(experiment / "ckpt"), "role": "best",
            "trial": {"trial_id": "s0001", "candidate": {"model": model}}}
    (experiment / PARENT_PENDING_FILE).write_text(json.dumps({
        "parent_run_id": parent, "trial_ids": ["s0001"],
        "finish": {"status_counts": {"completed": 1}, "best_value": 0.6, "metric": "val_accuracy",
                   "leaderboard_csv": None, "best_config_yaml": None,
                   "infeasible_reasons": {}, "models": [best],
                   "register_model": "rel-sync-best", "search_name": "offline"}}))
    assert pending_tracking_operations(experiment) == 5  # open, 2 logs, close + the parent

    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    still_down = subprocess.run([sys.executable, str(SYNC), str(experiment), "--timeout", "2"],
                                capture_output=True, text=True, env=env, timeout=120)
    assert still_down.returncode == 3, still_down.stderr
    assert "still undelivered" in still_down.stderr
    synced = subprocess.run([sys.executable, str(SYNC), str(experiment), "--mlflow-uri",
                             mlflow_server], capture_output=True, text=True, env=env,
                            timeout=120)
    assert synced.returncode == 0, synced.stderr
    assert pending_tracking_operations(experiment) == 0
    client = MlflowClient(mlflow_server)
    (run,) = children(client, parent)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    finished = client.get_run(parent)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics["trials_completed"] == 1
    assert logged_model_uri(tracking_uri=mlflow_server, run_id=run.info.run_id) is not None
    (version,) = client.search_model_versions("name = 'rel-sync-best'")
    assert version.run_id == run.info.run_id


def test_corrupted_latest_checkpoint_falls_back(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from coatnet.search.checkpoints import load_latest, newest_first, save_state

    for epoch in (1, 2, 3):
        save_state({"epoch": epoch, "model": {"w": torch.full((4,), float(epoch))}},
                   tmp_path / f"epoch_{epoch:04d}")
    latest = tmp_path / "epoch_0003" / "checkpoint.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load alone might not notice
    latest.write_bytes(bytes(data))
    (tmp_path / "epoch_0002" / "checkpoint.pt").write_bytes(b"")  # and an empty one
    caplog.set_level(logging.WARNING, logger="coatnet.search.checkpoints")
    state, used = load_latest(newest_first(tmp_path.glob("epoch_*")))
    assert used.name == "epoch_0001" and state["epoch"] == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert any("epoch_0003" in m and "falling back" in m for m in warnings), warnings
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_corrupted_checkpoint_in_a_real_trial(ray_local, tmp_path: Path) -> None:
    """A trial fails at epoch 3 right after its epoch-2 checkpoint was torn: the retry
    resumes from epoch 1's checkpoint (with a warning in the trial's log)."""
    from test_trial import run_tune, trial_config

    marker = tmp_path / "fired"
    config = trial_config(epochs=3, max_failures=1,
                          faults={"raise_at_epoch": 3, "marker": str(marker),
                                 "truncate_latest_checkpoint": True})
    result = run_tune(tmp_path, config)
    assert result.error is None and marker.exists()
    frame = result.metrics_dataframe
    assert frame["epochs_done"].tolist() == [1, 2, 2, 3]
    assert frame["resumed_from_epoch"].tolist() == [0, 0, 1, 1]


def test_malicious_checkpoint_is_refused_without_side_effect(tmp_path: Path) -> None:
    from coatnet.search.checkpoints import UnsafeCheckpointError, load_latest, save_state
    from coatnet.search.train_loop import load_checkpoint_state

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    good = tmp_path / "epoch_0001"
    save_state({"epoch": 1, "model": {"w": torch.ones(2)}}, good)
    evil = tmp_path / "epoch_0002"
    evil.mkdir()
    torch.save({"epoch": 2, "model": Evil()}, evil / "checkpoint.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_checkpoint_state(evil)
    with pytest.raises(UnsafeCheckpointError):  # no silent fallback past a tampered file
        load_latest([evil, good])
    import pickle

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": 1, "model": Evil()}))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_state(raw)
    outside = tmp_path / "elsewhere"
    save_state({"epoch": 1, "model": {}}, outside)
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        load_latest([outside], allowed_roots=[tmp_path / "trial"])
    assert not marker.exists()


# ------------------------------------------------------------------------- bad CLI input
def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SEARCH), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("case", ["resume_dir", "storage_file", "data_dir", "name_taken",
                                  "bad_ray_address", "ftp_tracking_uri", "unreachable_bucket"])
def test_bad_cli_input_fails_fast_and_creates_nothing(tmp_path: Path, case: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    space = write_space(tmp_path, num_samples=2)
    extra: list[str]
    expected: str
    if case == "resume_dir":
        (tmp_path / "junk").mkdir()
        extra, expected = ["--resume", str(tmp_path / "junk")], "not a search experiment"
    elif case == "storage_file":
        (tmp_path / "afile").write_text("x")
        extra, expected = ["--storage-path", str(tmp_path / "afile")], "not a directory"
    elif case == "data_dir":
        extra, expected = ["--data-dir", str(tmp_path / "nope")], "--data-dir"
    elif case == "name_taken":
        (tmp_path / "ray_results" / "taken").mkdir(parents=True)
        (tmp_path / "ray_results" / "taken" / "notes.txt").write_text("mine")
        extra, expected = ["--name", "taken"], "is not a search experiment"
    elif case == "ftp_tracking_uri":
        extra, expected = ["--mlflow-uri", "ftp://x"], "unsupported tracking URI scheme 'ftp'"
    elif case == "unreachable_bucket":
        # the driver-side state of a bucket search would go here: it must stay empty too
        monkeypatch.setenv("COATNET_STATE_DIR", str(tmp_path / "state"))
        extra = ["--storage-path", "s3://a-bucket-that-cannot-be-reached/x"]
        expected = "--storage-path s3://a-bucket-that-cannot-be-reached/x: cannot reach"
    else:
        from conftest import free_port

        extra, expected = ["--address", f"127.0.0.1:{free_port()}"], "127.0.0.1"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    start = time.monotonic()
    proc = _cli(tmp_path, "--space", str(space), *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
