"""train_loop_per_worker through Ray Train's local mode (TorchTrainer, num_workers=0) outside
Tune: metrics, checkpoints, resume, divergence, fault injection and the lr schedule.
No Ray cluster is needed for these; the Tune and worker-group paths are in test_trial.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

from coatnet.search.train_loop import (
    CHECKPOINT_FILE,
    DIVERGED_LOSS,
    _lr_lambda,
    load_checkpoint_state,
    train_loop_per_worker,
)

MODEL = dict(image_height=32, image_width=32, image_channel=3, num_classes=4,
             num_blocks_in_layers=[1, 1, 1, 1, 1], num_channels_in_layers=[8, 8, 16, 16, 16],
             block_type_in_layers=["C", "C", "T", "T"], expand_scale_in_layers=2, head_dim=8)
DATA = dict(dataset="synthetic", image_size=32, num_classes=4, image_channel=3,
            num_samples=320, val_fraction=0.25)


def loop_config(tmp_path: Path, *, epochs: int = 2, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": dict(MODEL),
        "hparams": dict(lr=3e-3, weight_decay=0.01, label_smoothing=0.1, batch_size=32,
                        warmup_epochs=1),
        "data": dict(DATA),
        "trial": dict(epochs=epochs, num_workers=1, use_gpu=False, cpus_per_worker=1,
                      max_failures=0, num_data_workers=0, compile=False, keep_checkpoints=1),
        "seed": 0,
        "macs": 42,
        "runtime": {"report_to": "train", "local_checkpoint_dir": str(tmp_path / "ckpt")},
    }
    config.update(extra)
    return config


def fit_local(config: dict[str, Any]):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=0))
    return trainer.fit()


def test_loop_reports_metrics_and_checkpoint(tmp_path: Path) -> None:
    result = fit_local(loop_config(tmp_path, epochs=3))
    metrics = result.metrics
    assert metrics["epochs_done"] == 3 and isinstance(metrics["epochs_done"], int)
    assert metrics["status"] == "running"
    assert metrics["device"] == "cpu" and metrics["macs"] == 42
    assert metrics["params"] == expected_params()
    for key in ("train_loss", "val_loss", "val_accuracy", "images_per_s", "epoch_time_s"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, key
    assert metrics["val_accuracy"] > 0.4  # chance is 0.25
    assert metrics["resumed_from_epoch"] == 0
    assert (Path(result.checkpoint.path) / CHECKPOINT_FILE).is_file()
    state = load_checkpoint_state(result.checkpoint.path)
    assert state["epoch"] == 3
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "model_config"}
    # the newest two local checkpoints are kept (a damaged latest one has a predecessor)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_0002", "epoch_0003"]


def expected_params() -> int:
    from coatnet import CoAtNetConfig, CoAtNetWithLinearClassifier

    model = CoAtNetWithLinearClassifier(CoAtNetConfig.from_dict(MODEL))
    return sum(p.numel() for p in model.parameters())


def test_loop_resumes_at_next_epoch(tmp_path: Path) -> None:
    first = fit_local(loop_config(tmp_path / "a", epochs=1))
    resumed = fit_local(loop_config(
        tmp_path / "b", epochs=3,
        runtime={"report_to": "train", "resume_from": first.checkpoint.path,
                 "local_checkpoint_dir": str(tmp_path / "b" / "ckpt")}))
    assert resumed.metrics["resumed_from_epoch"] == 1
    assert resumed.metrics["epochs_done"] == 3
    assert load_checkpoint_state(resumed.checkpoint.path)["epoch"] == 3


def test_resume_from_a_newer_checkpoint_reports_the_epochs_tune_missed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's saved state names epoch 1's checkpoint, but the trial had written epoch 2's
    before the driver died: the loop resumes from epoch 2 and reports it again first."""
    import ray.train

    first = fit_local(loop_config(tmp_path / "a", epochs=2))
    reported: list[dict[str, Any]] = []
    report = ray.train.report

    def record(metrics: dict[str, Any], **kwargs: Any) -> None:
        reported.append(dict(metrics))
        report(metrics, **kwargs)

    monkeypatch.setattr(ray.train, "report", record)
    ckpt = tmp_path / "a" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0001", "epoch_0002"]
    resumed = fit_local(loop_config(
        tmp_path / "b", epochs=4,
        runtime={"report_to": "train", "resume_from": str(ckpt / "epoch_0001"),
                 "local_checkpoint_dir": str(tmp_path / "b" / "ckpt")}))
    assert [m["epochs_done"] for m in reported] == [2, 3, 4]
    assert reported[0]["val_accuracy"] == first.metrics["val_accuracy"]  # epoch 2, again
    assert resumed.metrics["resumed_from_epoch"] == 2


def test_nan_loss_ends_the_trial_as_diverged(tmp_path: Path) -> None:
    result = fit_local(loop_config(tmp_path, epochs=5, faults={"nan_loss_at_epoch": 1}))
    metrics = result.metrics
    assert metrics["status"] == "diverged"
    assert metrics["epochs_done"] == 1
    assert metrics["val_accuracy"] == 0.0
    assert metrics["val_loss"] == DIVERGED_LOSS and metrics["train_loss"] == DIVERGED_LOSS
    assert result.checkpoint is None


def test_raise_at_epoch_fires_once(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    config = loop_config(tmp_path, epochs=2, faults={"raise_at_epoch": 2, "marker": str(marker)})
    with pytest.raises(Exception, match="injected fault at epoch 2"):
        fit_local(config)
    assert marker.exists()
    assert fit_local(config).metrics["epochs_done"] == 2  # marker present: no second raise


def test_model_must_fit_the_data(tmp_path: Path) -> None:
    config = loop_config(tmp_path)
    config["model"]["num_classes"] = 7
    with pytest.raises(ValueError, match="num_classes=7 but the dataset has 4"):
        fit_local(config)


def test_warmup_cosine_schedule() -> None:
    factor = _lr_lambda(warmup_steps=4, total_steps=12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(8) == pytest.approx(0.5)
    assert factor(12) == pytest.approx(0.0, abs=1e-12)
    no_warmup = _lr_lambda(warmup_steps=0, total_steps=10)
    assert no_warmup(0) == pytest.approx(1.0)


def test_loop_module_keeps_heavy_imports_out() -> None:
    """Train workers import this module: no mlflow, and no torchvision beyond what the model
    package itself needs."""
    import subprocess

    def loaded_after(statement: str) -> str:
        code = (f"import sys; {statement}; "
                "print(sorted(m for m in ('mlflow', 'torchvision') if m in sys.modules))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.strip()

    baseline = loaded_after("import coatnet")
    loop = loaded_after("import coatnet.search.train_loop")
    assert "mlflow" not in loop
    assert loop == baseline
