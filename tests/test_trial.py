"""run_trial under a real Ray Tune: in-process trials, worker-group (gloo DDP) trials,
infeasible candidates, divergence and fault recovery. Tiny models on synthetic data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from coatnet.search.trial import (
    DRIVER_CPU,
    IN_PROCESS,
    WORKER_GROUP,
    apply_recommended_env,
    execution_mode,
    recommended_env_vars,
    run_trial,
    trial_resources,
)

apply_recommended_env()  # before the session's Ray starts, so its processes inherit them

pytestmark = pytest.mark.cluster

MODEL = dict(image_height=32, image_width=32, image_channel=3, num_classes=4,
             num_blocks_in_layers=[1, 1, 1, 1, 1], num_channels_in_layers=[8, 8, 16, 16, 16],
             block_type_in_layers=["C", "C", "T", "T"], expand_scale_in_layers=2, head_dim=8)
DATA = dict(dataset="synthetic", image_size=32, num_classes=4, image_channel=3,
            num_samples=320, val_fraction=0.25)
HPARAMS = dict(lr=3e-3, weight_decay=0.01, label_smoothing=0.1, batch_size=32, warmup_epochs=1)


def trial_config(*, epochs: int = 3, num_workers: int = 1, cpus: float = 1.0,
                 max_failures: int = 0, faults: dict[str, Any] | None = None,
                 infeasible: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "candidate": {"model": None if infeasible else MODEL, "hparams": HPARAMS,
                      "params": 1234, "macs": 5678, "infeasible_reason": infeasible},
        "data": dict(DATA),
        "trial": dict(epochs=epochs, num_workers=num_workers, use_gpu=False,
                      cpus_per_worker=cpus, max_failures=max_failures, num_data_workers=0,
                      compile=False, keep_checkpoints=2),
        "metric": "val_accuracy", "mode": "max", "seed": 0,
    }
    if faults:
        config["faults"] = faults
    return config


def run_tune(tmp_path: Path, config: dict[str, Any], *, name: str = "exp"):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(run_trial, trial_resources(config["trial"])),
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0))
    grid = tuner.fit()
    assert len(grid) == 1
    return grid[0]


def epochs_reported(result) -> list[int]:
    return [int(v) for v in result.metrics_dataframe["epochs_done"].tolist()]


def test_modes_and_resources() -> None:
    assert execution_mode({"num_workers": 1, "use_gpu": False}) == IN_PROCESS
    assert execution_mode({"num_workers": 2, "use_gpu": False}) == WORKER_GROUP
    assert execution_mode({"num_workers": 1, "use_gpu": True}) == WORKER_GROUP
    assert trial_resources({"num_workers": 1, "cpus_per_worker": 2}) == {"cpu": 2.0, "gpu": 0.0}
    assert trial_resources({"num_workers": 2, "cpus_per_worker": 1})["cpu"] == DRIVER_CPU
    assert recommended_env_vars() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
                                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                      "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}


def test_in_process_trial_reports_every_epoch_with_checkpoint(ray_local, tmp_path) -> None:
    from coatnet.search.train_loop import load_checkpoint_state

    start = time.monotonic()
    result = run_tune(tmp_path, trial_config(epochs=3))
    assert result.error is None
    assert epochs_reported(result) == [1, 2, 3]
    last = result.metrics
    for key in ("train_loss", "val_loss", "val_accuracy", "epochs_done", "images_per_s",
                "epoch_time_s", "status", "params", "macs", "node_id", "device"):
        assert key in last, key
    assert last["status"] == "running" and last["device"] == "cpu"
    assert last["macs"] == 5678 and last["params"] > 0
    assert last["val_accuracy"] > 0.4  # 4 classes: chance is 0.25
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as directory:
        state = load_checkpoint_state(directory)
    assert state["epoch"] == 3 and state["model_config"]["num_classes"] == 4
    # in-process mode: no Train worker group, no train-* run directory
    assert not list(tmp_path.rglob("train-*"))
    print(f"in-process trial: run_trial start to first step {last['startup_s']:.2f}s, "
          f"Tuner wall {time.monotonic() - start:.1f}s")


def test_infeasible_candidate_never_trains(ray_local, tmp_path) -> None:
    config = trial_config(num_workers=2, cpus=0.5, infeasible="needs 9 GB, budget is 4 GB")
    result = run_tune(tmp_path, config)
    assert result.error is None
    assert result.metrics["status"] == "infeasible"
    assert result.metrics["epochs_done"] == 0
    assert result.metrics["val_accuracy"] == 0.0
    assert result.metrics["params"] == 1234 and result.metrics["macs"] == 5678
    assert len(result.metrics_dataframe) == 1
    assert result.checkpoint is None
    assert not list(tmp_path.rglob("train-*"))  # no TorchTrainer was built


def test_nan_loss_reports_diverged(ray_local, tmp_path) -> None:
    result = run_tune(tmp_path, trial_config(epochs=4, faults={"nan_loss_at_epoch": 2}))
    assert result.error is None
    assert epochs_reported(result) == [1, 2]
    last = result.metrics
    assert last["status"] == "diverged"
    assert last["val_accuracy"] == 0.0
    assert last["val_loss"] == 1e6 and last["train_loss"] == 1e6


def test_in_process_fault_resumes_from_checkpoint(ray_local, tmp_path) -> None:
    marker = tmp_path / "fired"
    config = trial_config(epochs=3, max_failures=1,
                          faults={"raise_at_epoch": 2, "marker": str(marker)})
    result = run_tune(tmp_path, config)
    assert result.error is None
    assert marker.exists()
    frame = result.metrics_dataframe
    assert epochs_reported(result) == [1, 2, 3]
    assert frame["resumed_from_epoch"].tolist() == [0, 1, 1]


def test_worker_group_ddp_trial_reports_and_resumes(ray_local, tmp_path) -> None:
    marker = tmp_path / "fired"
    config = trial_config(epochs=3, num_workers=2, cpus=0.5, max_failures=1,
                          faults={"raise_at_epoch": 2, "marker": str(marker)})
    start = time.monotonic()
    result = run_tune(tmp_path, config)
    assert result.error is None
    assert marker.exists()
    assert epochs_reported(result) == [1, 2, 3]
    assert result.metrics_dataframe["resumed_from_epoch"].tolist() == [0, 1, 1]
    assert result.metrics["world_size"] == 2
    assert result.metrics["status"] == "running" and result.metrics["macs"] == 5678
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as directory:
        assert (Path(directory) / "checkpoint.pt").is_file()
    train_runs = [p for p in tmp_path.rglob("train-*") if p.is_dir()]
    assert train_runs, "the Train run should live under the Tune trial directory"
    import ray

    deadline = time.monotonic() + 30  # the workers' placement group is released
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "Train workers still hold CPUs after the trial"
        time.sleep(0.2)
    first = result.metrics_dataframe["startup_s"].tolist()[0]
    print(f"worker-group trial: run_trial start to first step {first:.2f}s; "
          f"Tuner wall with one restart {time.monotonic() - start:.1f}s")

