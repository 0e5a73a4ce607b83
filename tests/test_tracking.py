"""MLflow tracking against a real server and real (tiny) Tune runs.

The trainable fakes epochs with the contract's result keys, which is all tracking sees; what
is checked is read back over HTTP with MlflowClient, the way a user would see it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from coatnet.search import tracking
from coatnet.search.tracking import (
    MLflowTrackingCallback,
    TrackingServerUnavailable,
    check_tracking_server,
    close_orphaned_runs,
    finish_parent_run,
    resolve_tracking_uri,
    start_parent_run,
)

EPOCHS = 4
EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy", "images_per_s", "epoch_time_s")
SPACE_TEXT = "name: tiny\nmodel: {}\n"
SPACE_SHA = hashlib.sha256(SPACE_TEXT.encode()).hexdigest()


# --------------------------------------------------------------------------- helpers


def _candidate(case: str | None, quality: float = 0.5, **extra_hparams: Any) -> dict[str, Any]:
    """A contract-shaped candidate; ``case`` tells the fake trainable how to behave."""
    hparams = {"lr": 1e-3 * quality, "weight_decay": 0.05, "label_smoothing": 0.1,
               "batch_size": 32, "warmup_epochs": 1, **extra_hparams}
    if case is None:
        return {"model": None, "hparams": hparams, "params": None, "macs": None,
                "infeasible_reason": "params 9e9 > budget 1e6"}
    model = {"test_case": case, "quality": quality, "depths": [1, 1, 1, 1],
             "dims": [8, 16, 32, 64], "blocks": {"s1": "C", "s2": "T"}}
    return {"model": model, "hparams": hparams, "params": 12345, "macs": 67890,
            "infeasible_reason": None}


def fake_trainable(config: dict[str, Any]) -> None:
    """Reports fake epochs with the contract's keys; checkpoints every 2 epochs."""
    cand = config["candidate"]
    common = {"params": cand["params"], "macs": cand["macs"], "node_id": "node-abc",
              "device": "cpu"}
    if cand["infeasible_reason"]:
        tune.report({"train_loss": 0.0, "val_loss": 0.0, "val_accuracy": 0.0,
                     "epochs_done": 0, "images_per_s": 0.0, "epoch_time_s": 0.0,
                     "status": "infeasible", **common})
        return
    model = cand["model"]
    case, quality = model["test_case"], model["quality"]
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"]
    crash_marker = config.get("crash_marker")
    for epoch in range(start + 1, EPOCHS + 1):
        time.sleep(config.get("epoch_sleep_s", 0.05))
        if case == "raise" and epoch == 2:
            raise RuntimeError("boom at epoch 2")
        if case == "crash_once" and epoch == 4 and crash_marker and not Path(crash_marker).exists():
            Path(crash_marker).write_text("crashed")
            raise RuntimeError("simulated crash before epoch 4")
        metrics = {"train_loss": 2.0 / epoch, "val_loss": 2.1 / epoch,
                   "val_accuracy": quality * epoch / EPOCHS, "epochs_done": epoch,
                   "images_per_s": 100.0, "epoch_time_s": 0.05, "status": "running", **common}
        if case == "diverge" and epoch == 2:
            metrics.update(train_loss=1e6, val_loss=1e6, val_accuracy=0.0, status="diverged")
            tune.report(metrics)
            return
        if epoch % 2 == 0:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)


class StopCase(tune.Stopper):
    """Stops the 'stopme' trial after epoch 2 (a deterministic early stop)."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        model = (result.get("config", {}).get("candidate") or {}).get("model") or {}
        return model.get("test_case") == "stopme" and result.get("epochs_done", 0) >= 2

    def stop_all(self) -> bool:
        return False


def _parent(uri: str, experiment: str, resume: str | None = None) -> str:
    return start_parent_run(
        tracking_uri=uri, experiment_name=experiment, run_name="search",
        search_settings={"num_samples": 6, "scheduler": {"grace_period": 1},
                         "api_token": "do-not-log"},
        space_text=SPACE_TEXT, space_sha256=SPACE_SHA, resume_run_id=resume,
    )


def _children(client: MlflowClient, parent_id: str) -> list[Any]:
    exp = client.get_run(parent_id).info.experiment_id
    return list(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                   max_results=500))


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _tuner(tmp_path: Path, name: str, callback: MLflowTrackingCallback, cases: list[dict],
           *, stopper: tune.Stopper | None = None, extra: dict | None = None) -> tune.Tuner:
    return tune.Tuner(
        fake_trainable,
        param_space={"candidate": tune.grid_search(cases), "metric": "val_accuracy",
                     "mode": "max", **(extra or {})},
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", reuse_actors=True,
            scheduler=ASHAScheduler(time_attr="epochs_done", max_t=EPOCHS, grace_period=1,
                                    reduction_factor=2),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(tmp_path / "ray"), callbacks=[callback], stop=stopper,
            verbose=0, failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


class FakeTrial:
    """Just what the callback reads from a Tune trial, to re-drive it without Ray."""

    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id = trial_id
        self.config = config
        self.last_result: dict[str, Any] = {}

    def __str__(self) -> str:
        return f"fake_{self.trial_id}"


def _epoch_result(epoch: int, acc: float) -> dict[str, Any]:
    return {"train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch, "val_accuracy": acc,
            "epochs_done": epoch, "images_per_s": 50.0, "epoch_time_s": 0.1,
            "status": "running", "params": 1, "macs": 2, "node_id": "n1", "device": "cpu"}


# --------------------------------------------------------------------------- unit-ish


def test_resolve_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CLI beats env beats an absolute SQLite file in the cwd."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://cli:5000") == "http://cli:5000"
    assert resolve_tracking_uri(None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_check_tracking_server(mlflow_server: str) -> None:
    """A live server passes; a dead port fails fast with the URI in the message."""
    check_tracking_server(mlflow_server)
    check_tracking_server("sqlite:///nowhere/mlflow.db")  # local: nothing to check
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
    t0 = time.monotonic()
    with pytest.raises(TrackingServerUnavailable, match=dead.replace(".", r"\.")):
        check_tracking_server(dead, timeout_s=2)
    assert time.monotonic() - t0 < 5


def test_candidate_params_flatten_truncate_and_drop_secrets() -> None:
    cand = _candidate("ok", api_token="xyz", db_password="p", note="x" * 10_000)
    params = tracking.candidate_params({"candidate": cand})
    assert params["candidate.model.depths"] == "[1, 1, 1, 1]"
    assert params["candidate.model.blocks.s2"] == "T"
    assert params["candidate.hparams.batch_size"] == "32"
    assert len(params["candidate.hparams.note"]) == tracking.MAX_PARAM_VAL_LENGTH
    assert not any("token" in k or "password" in k for k in params)


def test_open_operations_read_the_candidate_contract(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """What an open journals (no server needed): params from the candidate's dict form, its
    static metrics and infeasible reason from the Candidate; a candidate that breaks the
    contract is tracked without those, with a warning, instead of failing the driver."""
    state_path = tmp_path / "state.json"
    callback = MLflowTrackingCallback(tracking_uri="http://127.0.0.1:9", parent_run_id="P",
                                      experiment_id="0", state_path=state_path, max_epochs=2,
                                      retry_max_s=0.2)  # a dead port: the journal keeps all
    broken = {"model": {"x": 1}, "hparams": {"lr": 0.01}, "params": 10, "macs": 20}
    trials = [FakeTrial("c1", {"candidate": _candidate("ok")}),
              FakeTrial("c2", {"candidate": _candidate(None)}),
              FakeTrial("c3", {"candidate": broken})]
    caplog.set_level(logging.WARNING, logger="coatnet.search.tracking")
    for trial in trials:
        callback.on_trial_start(iteration=0, trials=trials, trial=trial)
    callback.stop()
    ops = {op["trial_id"]: op for op in tracking.read_pending(state_path)}
    assert ops["c1"]["metrics"] == {"params": 12345.0, "macs": 67890.0}
    assert ops["c1"]["tags"] == {"tune_trial_id": "c1", "status": "running"}
    assert ops["c1"]["params"]["candidate.model.test_case"] == "ok"
    assert ops["c2"]["params"]["candidate.model"] == "None"
    assert ops["c2"]["params"]["candidate.hparams.warmup_epochs"] == "1"
    assert ops["c2"]["tags"]["infeasible_reason"] == "params 9e9 > budget 1e6"
    assert ops["c2"]["metrics"] == {}
    assert ops["c3"]["params"] == {"candidate.model.x": "1", "candidate.hparams.lr": "0.01"}
    assert ops["c3"]["metrics"] == {}
    assert any("c3" in r.getMessage() and "Candidate contract" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------- real Tune runs


def test_tune_search_is_tracked(mlflow_server: str, ray_local: None, tmp_path: Path) -> None:
    """A real Tune run with every trial outcome: one parent, one child per trial, right tags."""
    client = MlflowClient(mlflow_server)
    parent = _parent(mlflow_server, "tracking-full")
    callback = MLflowTrackingCallback(
        tracking_uri=mlflow_server, parent_run_id=parent, experiment_id=None,
        state_path=tmp_path / "ray" / "mlflow_state.json", max_epochs=EPOCHS,
    )
    # Equal curves are never cut by ASHA (it stops only below the cutoff), so every trial but
    # 'ok' reaches its own fate; 'ok' may or may not be cut early, both are checked below.
    cases = [_candidate("best", 1.0), _candidate("ok", 0.3), _candidate("stopme", 1.0),
             _candidate("raise", 1.0), _candidate("diverge", 1.0), _candidate(None)]
    results = _tuner(tmp_path, "full", callback, cases, stopper=StopCase()).fit()
    assert len(results) == len(cases)

    children = _children(client, parent)
    assert len(children) == len(cases)
    by_case = {}
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parent
        assert run.info.run_name.endswith(tags["tune_trial_id"])
        assert run.info.status != "RUNNING"
        model_case = params.get("candidate.model.test_case", "infeasible")
        by_case[model_case] = run
        assert params["candidate.hparams.batch_size"] == "32"
        # Metric histories: one entry per epoch, steps 1..n, never a duplicate.
        steps = _steps(client, run.info.run_id, "val_accuracy")
        assert steps == list(range(1, len(steps) + 1)), (model_case, steps)
        for key in EPOCH_KEYS[2:]:
            assert _steps(client, run.info.run_id, key) == steps
        if tags["status"] in ("completed", "early-stopped"):
            assert tags["node"] == "node-abc" and tags["device"] == "cpu"
            assert run.data.metrics["params"] == 12345 and run.data.metrics["macs"] == 67890
            expected = "completed" if len(steps) == EPOCHS else "early-stopped"
            assert tags["status"] == expected, (model_case, steps)

    assert by_case["best"].data.tags["status"] == "completed"
    assert by_case["best"].data.metrics["best_val_accuracy"] == pytest.approx(1.0)
    assert by_case["stopme"].data.tags["status"] == "early-stopped"
    assert _steps(client, by_case["stopme"].info.run_id, "val_accuracy") == [1, 2]
    assert by_case["raise"].data.tags["status"] == "failed"
    assert by_case["raise"].info.status == "FAILED"
    assert by_case["diverge"].data.tags["status"] == "diverged"
    # The diverged epoch's 1e6 loss stand-ins are not logged; its accuracy is.
    assert _steps(client, by_case["diverge"].info.run_id, "train_loss") == [1]
    assert _steps(client, by_case["diverge"].info.run_id, "val_accuracy") == [1, 2]
    inf = by_case["infeasible"]
    assert inf.data.tags["status"] == "infeasible"
    assert inf.data.tags["infeasible_reason"].startswith("params 9e9")
    assert _steps(client, inf.info.run_id, "val_accuracy") == []
    assert all(r.info.status == "FINISHED" for c, r in by_case.items() if c != "raise")

    counts = callback.status_counts()
    assert counts["failed"] == counts["diverged"] == counts["infeasible"] == 1
    assert counts["completed"] + counts["early-stopped"] == 3
    best = callback.best_trial()
    assert best is not None and best[1] == pytest.approx(1.0)
    assert best[2]["candidate"]["model"]["test_case"] == "best"

    # Parent: settings as params (no secrets), the space as artifact + sha tag, summary.
    leaderboard = tmp_path / "leaderboard.csv"
    leaderboard.write_text("trial_id,val_accuracy\nx,0.9\n")
    finish_parent_run(
        tracking_uri=mlflow_server, run_id=parent, status_counts=counts, best_value=best[1],
        leaderboard_csv=leaderboard, best_config_yaml=None,
        infeasible_reasons={"t": "too big"},
    )
    prun = client.get_run(parent)
    assert prun.info.status == "FINISHED"
    assert prun.data.tags["space_sha256"] == SPACE_SHA
    assert prun.data.params["scheduler.grace_period"] == "1"
    assert not any("token" in k for k in prun.data.params)
    assert prun.data.metrics["trials_failed"] == 1 and prun.data.metrics["trials_total"] == 6
    assert prun.data.metrics["best_val_accuracy"] == pytest.approx(1.0)
    artifacts = {f.path for f in client.list_artifacts(parent)}
    assert {"search_space.yaml", "leaderboard.csv", "infeasible_reasons.json"} <= artifacts
    state = json.loads((tmp_path / "ray" / "mlflow_state.json").read_text())
    assert {rec["run_id"] for rec in state.values()} == {r.info.run_id for r in children}


def test_tuner_restore_reuses_child_runs(mlflow_server: str, ray_local: None,
                                         tmp_path: Path) -> None:
    """Restoring an errored search logs into the same child run and skips replayed steps.

    The 'crash_once' trial checkpoints at epoch 2, reports epoch 3, then crashes; the resumed
    trial replays epoch 3 from the checkpoint, which must not be logged twice.
    """
    client = MlflowClient(mlflow_server)
    parent = _parent(mlflow_server, "tracking-restore")
    state_path = tmp_path / "ray" / "mlflow_state.json"
    callback = MLflowTrackingCallback(
        tracking_uri=mlflow_server, parent_run_id=parent, state_path=state_path,
        max_epochs=EPOCHS,
    )
    # crash_once is the best at every rung, so ASHA never cuts it before it crashes.
    cases = [_candidate("crash_once", 0.95), _candidate("best", 0.5)]
    extra = {"crash_marker": str(tmp_path / "crashed.marker")}
    _tuner(tmp_path, "restore", callback, cases, extra=extra).fit()
    first = {r.data.tags["tune_trial_id"]: r for r in _children(client, parent)}
    crashed = next(r for r in first.values() if r.data.tags["status"] == "failed")
    assert _steps(client, crashed.info.run_id, "val_accuracy") == [1, 2, 3]

    # Same parent run reopened, as the runner does on --resume.
    assert _parent(mlflow_server, "tracking-restore", resume=parent) == parent
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "restore"), fake_trainable,
                                  resume_errored=True)
    restored.fit()

    second = {r.data.tags["tune_trial_id"]: r for r in _children(client, parent)}
    assert set(second) == set(first)
    assert {r.info.run_id for r in second.values()} == {r.info.run_id for r in first.values()}
    again = second[crashed.data.tags["tune_trial_id"]]
    assert again.info.run_id == crashed.info.run_id
    for key in EPOCH_KEYS:
        assert _steps(client, again.info.run_id, key) == [1, 2, 3, 4], key
    assert again.data.tags["status"] == "completed"
    assert again.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in second.values())


def test_redriven_callback_is_resume_stable(mlflow_server: str, tmp_path: Path) -> None:
    """A new driver with the same state file (or, lost, only the tags) reuses the runs.

    Simulates a killed driver: results for epochs 1-3 were logged and the trial never
    completed; the next driver replays epochs 2-4. Then close_orphaned_runs cleans up.
    """
    client = MlflowClient(mlflow_server)
    parent = _parent(mlflow_server, "tracking-redrive")
    state_path = tmp_path / "state.json"
    config = {"candidate": _candidate("ok", 0.5)}
    trials = [FakeTrial("t0001", config), FakeTrial("t0002", config)]

    def drive(epochs: range, *, complete: bool) -> MLflowTrackingCallback:
        cb = MLflowTrackingCallback(tracking_uri=mlflow_server, parent_run_id=parent,
                                    state_path=state_path, max_epochs=EPOCHS)
        cb.setup()
        for trial in trials:
            cb.on_trial_start(iteration=0, trials=trials, trial=trial)
            for epoch in epochs:
                cb.on_trial_result(iteration=0, trials=trials, trial=trial,
                                   result=_epoch_result(epoch, 0.1 * epoch))
        if complete:
            cb.on_trial_complete(iteration=0, trials=trials, trial=trials[0])
        assert cb.flush(timeout_s=30)
        cb.stop()
        return cb

    drive(range(1, 4), complete=False)
    run_ids = {r.data.tags["tune_trial_id"]: r.info.run_id for r in _children(client, parent)}
    assert len(run_ids) == 2

    # The state file is lost for t0002: the tune_trial_id tag must find its run.
    state = json.loads(state_path.read_text())
    del state["t0002"]
    state_path.write_text(json.dumps(state))

    cb = drive(range(2, 5), complete=True)
    children = _children(client, parent)
    assert {r.data.tags["tune_trial_id"]: r.info.run_id for r in children} == run_ids
    for run_id in run_ids.values():
        for key in EPOCH_KEYS:
            assert _steps(client, run_id, key) == [1, 2, 3, 4]
        assert len(client.get_metric_history(run_id, "params")) == 1
    assert client.get_run(run_ids["t0001"]).data.tags["status"] == "completed"
    assert cb.run_ids() == run_ids

    # t0002 never completed: a resumed runner keeps nothing of it, so it is closed as KILLED.
    assert client.get_run(run_ids["t0002"]).info.status == "RUNNING"
    assert close_orphaned_runs(tracking_uri=mlflow_server, parent_run_id=parent,
                               keep_run_ids=[]) == 1
    assert client.get_run(run_ids["t0002"]).info.status == "KILLED"
    assert client.get_run(run_ids["t0001"]).info.status == "FINISHED"
    assert client.get_run(parent).info.status == "RUNNING"  # the parent is not a child


def _complete_while_server_is_down(trial: FakeTrial, *, parent: str,
                                   state_path: Path) -> MLflowTrackingCallback:
    """Two epochs and the end of ``trial`` through a callback whose server is down: every
    operation stays in the journal next to ``state_path``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = MLflowTrackingCallback(
            tracking_uri=f"http://127.0.0.1:{sock.getsockname()[1]}", parent_run_id=parent,
            experiment_id="0", state_path=state_path, max_epochs=2, flush_timeout_s=1,
            retry_max_s=0.2)
        down.setup()
        for epoch in (1, 2):
            down.on_trial_result(iteration=0, trials=[trial], trial=trial,
                                 result=_epoch_result(epoch, 0.3 * epoch))
        down.on_trial_complete(iteration=0, trials=[trial], trial=trial)
        down.on_experiment_end(trials=[trial])
    return down


def _finish(trial_status: dict[str, str]) -> dict[str, Any]:
    counts = {s: list(trial_status.values()).count(s) for s in set(trial_status.values())}
    return {"status_counts": counts, "best_value": 0.4, "trial_status": trial_status,
            "metric": "val_accuracy"}


def test_finish_settles_children_to_the_leaderboard(mlflow_server: str, tmp_path: Path) -> None:
    """A run a killed driver left RUNNING, or one a resume closed as KILLED whose trial then
    ended without being reopened, ends with its trial's final status; unknown runs go."""
    client = MlflowClient(mlflow_server)
    parent = _parent(mlflow_server, "tracking-settle")
    cb = MLflowTrackingCallback(tracking_uri=mlflow_server, parent_run_id=parent,
                                state_path=tmp_path / tracking.STATE_FILE_NAME, max_epochs=EPOCHS)
    cb.setup()
    trials = [FakeTrial(t, {"candidate": _candidate("ok", 0.5)})
              for t in ("s0001", "s0002", "s0003", "s0004")]
    for trial in trials:
        cb.on_trial_start(iteration=0, trials=trials, trial=trial)
        for epoch in (1, 2):
            cb.on_trial_result(iteration=0, trials=trials, trial=trial,
                               result=_epoch_result(epoch, 0.2 * epoch))
    cb.on_trial_complete(iteration=0, trials=trials, trial=trials[3])
    assert cb.flush(timeout_s=30)
    cb.stop()  # the driver is gone: s0001-s0003 RUNNING, s0004 FINISHED
    runs = {r.data.tags["tune_trial_id"]: r.info.run_id for r in _children(client, parent)}
    client.set_terminated(runs["s0001"], status="KILLED")  # closed by an interrupted resume

    statuses = {"s0001": "completed", "s0002": "failed", "s0004": "early-stopped"}
    assert tracking.finish_search_run(experiment_dir=tmp_path, tracking_uri=mlflow_server,
                                      parent_run_id=parent, trial_ids=list(statuses),
                                      finish=_finish(statuses))
    after = {r.data.tags["tune_trial_id"]: r for r in _children(client, parent)}
    assert sorted(after) == ["s0001", "s0002", "s0004"]  # s0003 unknown: deleted
    assert {t: (r.info.status, r.data.tags["status"]) for t, r in after.items()} == {
        "s0001": ("FINISHED", "completed"), "s0002": ("FAILED", "failed"),
        "s0004": ("FINISHED", "early-stopped")}
    assert client.get_run(parent).info.status == "FINISHED"
    # settling again changes nothing
    assert tracking.settle_child_runs(tracking_uri=mlflow_server, parent_run_id=parent,
                                      trial_status=statuses) == 0


def test_finish_waits_for_unsent_child_operations(mlflow_server: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Child-run operations left in the journal go first: the finish is saved for the sync
    command instead of settling children (and closing the parent) before they arrive."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(mlflow_server)
    parent = _parent(mlflow_server, "tracking-finish-unsent")
    state_path = tmp_path / tracking.STATE_FILE_NAME
    (tmp_path / "search_state.json").write_text(json.dumps(
        {"tracking_uri": mlflow_server, "parent_run_id": parent}))
    trial = FakeTrial("u0001", {"candidate": _candidate("ok", 0.5)})
    _complete_while_server_is_down(trial, parent=parent, state_path=state_path)
    assert tracking.read_pending(state_path)

    statuses = {"u0001": "completed"}
    assert not tracking.finish_search_run(experiment_dir=tmp_path, tracking_uri=mlflow_server,
                                          parent_run_id=parent, trial_ids=list(statuses),
                                          finish=_finish(statuses))
    assert client.get_run(parent).info.status == "RUNNING"
    assert (tmp_path / tracking.PARENT_PENDING_FILE).exists()
    assert tracking.pending_tracking_operations(tmp_path) > 1

    assert tracking.sync_experiment(tmp_path, timeout_s=30) == 0
    (run,) = _children(client, parent)
    assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed")
    assert _steps(client, run.info.run_id, "val_accuracy") == [1, 2]
    assert client.get_run(parent).info.status == "FINISHED"


def test_unsent_operations_survive_the_driver(mlflow_server: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """If MLflow stays down until the search ends, the next driver sends what was queued."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(mlflow_server)
    parent = _parent(mlflow_server, "tracking-pending")
    state_path = tmp_path / "state.json"
    trial = FakeTrial("p0001", {"candidate": _candidate("ok", 0.5)})
    down = _complete_while_server_is_down(trial, parent=parent, state_path=state_path)
    pending = state_path.with_name("state.json.pending.json")
    assert pending.exists()
    assert down.status_counts()["completed"] == 1

    up = MLflowTrackingCallback(tracking_uri=mlflow_server, parent_run_id=parent,
                                state_path=state_path, max_epochs=2)
    assert up.status_counts()["completed"] == 1  # read back from the state file
    up.setup()
    assert up.flush(timeout_s=30)
    up.stop()
    assert not pending.exists()
    (run,) = _children(client, parent)
    assert _steps(client, run.info.run_id, "val_accuracy") == [1, 2]
    assert run.data.tags["status"] == "completed" and run.info.status == "FINISHED"


def test_server_outage_does_not_break_tune(mlflow_server_factory: Any, ray_local: None,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Kill the server mid-search: Tune finishes, its loop never waits, data arrives later.

    MLflow's own urllib3 retries are turned off so the callback's retry loop is what is tested
    (with defaults the client itself retries for ~2 minutes before the callback sees an error).
    """
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = mlflow_server_factory("outage")
    client = MlflowClient(server.uri)
    parent = _parent(server.uri, "tracking-outage")

    class TimedCallback(MLflowTrackingCallback):
        durations: list[float] = []

        def on_trial_result(self, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            super().on_trial_result(**kwargs)
            TimedCallback.durations.append(time.perf_counter() - t0)

    callback = TimedCallback(tracking_uri=server.uri, parent_run_id=parent,
                             state_path=tmp_path / "state.json", max_epochs=EPOCHS,
                             flush_timeout_s=90, retry_max_s=1.0)
    events: list[str] = []

    def chaos() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not callback.run_ids():
            time.sleep(0.1)
        server.stop()
        events.append("stopped")
        time.sleep(2.0)
        server.start()
        events.append("restarted")

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    caplog.set_level(logging.WARNING, logger="coatnet.search.tracking")
    results = _tuner(tmp_path, "outage", callback,
                     [_candidate("best", 0.9), _candidate("best", 0.9)],  # ASHA cuts neither
                     extra={"epoch_sleep_s": 0.5}).fit()
    thread.join(timeout=90)
    assert events == ["stopped", "restarted"]
    assert not results.errors
    assert max(TimedCallback.durations) < 0.25

    children = _children(client, parent)
    assert len(children) == 2
    for run in children:
        for key in EPOCH_KEYS:
            assert _steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
        assert run.info.status == "FINISHED"
        assert run.data.tags["status"] == "completed"
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("unreachable" in m for m in messages)
    assert any("reachable again" in m for m in messages)
