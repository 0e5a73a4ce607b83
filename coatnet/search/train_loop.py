"""The per-worker training loop of one search trial.

It runs in two settings and reports the same metrics (docs/design.md) in both:

* ``runtime.report_to == "train"``: inside a Ray Train worker (a worker group, DDP when several
  workers), or a ``TorchTrainer(ScalingConfig(num_workers=0))`` outside Tune. Uses
  ``ray.train.get_context`` / ``prepare_model`` / ``prepare_data_loader`` / ``report`` /
  ``get_checkpoint``; ``run_trial`` forwards rank-0 reports to Tune from the controller.
* ``runtime.report_to == "tune"``: the in-process mode, ``TorchTrainer`` with
  ``num_workers=0`` inside a Tune function trainable. In Ray 2.60 every ``ray.train.*`` session
  API (report, get_context, get_checkpoint, and ``prepare_model`` which calls get_context)
  raises a DeprecationWarning inside a Tune session, and Train calls no callbacks in local
  mode, so the loop reports straight to Tune (``ray.tune.report`` with the checkpoint) and
  resumes from ``runtime.resume_from`` or ``ray.tune.get_checkpoint()``.

MLflow and torchvision stay out of this module: it is imported by every Train worker.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from coatnet.cpu_memory import keep_freed_memory
from coatnet.search.checkpoints import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_latest,
    newest_first,
    save_state,
)
from coatnet.search.data import DatasetInfo, load_datasets

logger = logging.getLogger(__name__)

_KEEP_LOCAL = 2  # local epoch_* checkpoints kept, so a damaged latest one has a predecessor
DIVERGED_LOSS = 1e6
_NAN_CHECK_EVERY = 16  # steps between (synchronising) non-finite loss checks


# ---------------------------------------------------------------------------------- reporting
class _Reporter:
    """Where metrics and checkpoints go, and where a resume checkpoint comes from."""

    world_size: int = 1
    world_rank: int = 0
    local_rank: int = 0

    def device(self, *, use_gpu: bool) -> torch.device:
        raise NotImplementedError

    def resume_state(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model.to(device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader


class _TrainReporter(_Reporter):
    """Ray Train session (worker group, or Train's local mode outside Tune)."""

    def __init__(self, runtime: Mapping[str, Any]) -> None:
        import ray.train

        self._runtime = runtime
        ctx = ray.train.get_context()
        self.world_size = ctx.get_world_size()
        self.world_rank = ctx.get_world_rank()
        self.local_rank = ctx.get_local_rank()

    def device(self, *, use_gpu: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def resume_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return _load_checkpoint_with_fallback(checkpoint)
        return _load_resume_from(self._runtime.get("resume_from"), roots=None)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        import ray.train

        if state is None or self.world_rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with _checkpoint_directory(self._runtime.get("local_checkpoint_dir"), epoch,
                                   state) as directory:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}_{_stamp()}")

    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        import ray.train.torch

        # move_to_device=False: the loop moves batches itself (non_blocking) and
        # keeps the DistributedSampler reachable for set_epoch.
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)


class _TuneReporter(_Reporter):
    """In-process mode inside a Tune trial: report to Tune directly.

    Keeps the latest checkpoint also in ``runtime.local_checkpoint_dir`` (when given) so that
    ``run_trial`` can restart a failed attempt from it in the same process.
    """

    def __init__(self, runtime: Mapping[str, Any]) -> None:
        self._runtime = runtime
        self._local_dir = runtime.get("local_checkpoint_dir")

    def device(self, *, use_gpu: bool) -> torch.device:
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("trial.use_gpu is true but this process sees no CUDA device")
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def resume_state(self) -> dict[str, Any] | None:
        if self._runtime.get("resume_from"):
            # run_trial's own retry: only its private local checkpoint dir may be read
            roots = [self._local_dir] if self._local_dir else None
            return _load_resume_from(self._runtime["resume_from"], roots=roots)
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        return _load_checkpoint_with_fallback(checkpoint)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        import ray.tune

        if state is None:
            ray.tune.report(metrics)
            return
        with _checkpoint_directory(self._local_dir, epoch, state) as directory:
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))


def _make_reporter(runtime: Mapping[str, Any]) -> _Reporter:
    mode = runtime.get("report_to", "train")
    if mode == "tune":
        return _TuneReporter(runtime)
    if mode == "train":
        return _TrainReporter(runtime)
    raise ValueError(f"runtime.report_to={mode!r}: must be 'train' or 'tune'")


@contextmanager
def _checkpoint_directory(local_dir: str | None, epoch: int,
                          state: dict[str, Any]) -> Iterator[str]:
    """A directory holding ``state`` for one report.

    With ``local_dir`` the checkpoint stays there (``epoch_NNNN``, older ones pruned after the
    report) so the caller can restart from it in this process; otherwise a temp directory that
    is removed once the report has copied it to storage.
    """
    if not local_dir:
        with tempfile.TemporaryDirectory(prefix="coatnet-ckpt-") as directory:
            _save_state(state, directory)
            yield directory
        return
    directory = os.path.join(local_dir, f"epoch_{epoch:04d}")
    _save_state(state, directory)
    yield directory
    for old in newest_first(Path(local_dir).glob("epoch_*"))[_KEEP_LOCAL:]:
        shutil.rmtree(old, ignore_errors=True)


def _stamp() -> str:
    return f"{time.time_ns():x}"


# ---------------------------------------------------------------------------------- checkpoints
def _save_state(state: dict[str, Any], directory: str | os.PathLike[str]) -> None:
    save_state(state, directory)  # temp file, fsync, rename, then the sha256


def _load_state(directory: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """One checkpoint directory, or None (with a warning) when it is missing or damaged."""
    if not directory:
        return None
    loaded = load_latest([Path(directory)])
    return None if loaded is None else loaded[0]


def _older_siblings(directory: Path) -> list[Path]:
    """``directory`` then the older checkpoints next to it (same trial), newest first."""
    parent = directory.parent
    if not parent.is_dir():
        return [directory]
    pattern = re.compile(r"^(epoch|checkpoint)_\d")
    ordered = newest_first(p for p in parent.iterdir()
                           if p.is_dir() and pattern.match(p.name))
    if directory not in ordered:
        return [directory]
    return ordered[ordered.index(directory):]


def _load_resume_from(resume_from: str | None, *,
                      roots: list[str] | None) -> dict[str, Any] | None:
    """``runtime.resume_from``: a checkpoint dir (older siblings are the fallbacks) or a dir of
    ``epoch_*`` checkpoints."""
    if not resume_from:
        return None
    base = Path(resume_from)
    if (base / CHECKPOINT_FILE).exists() or re.match(r"^(epoch|checkpoint)_\d", base.name):
        candidates = _older_siblings(base)
    else:
        candidates = newest_first(base.glob("epoch_*"))
    loaded = load_latest(candidates, allowed_roots=roots)
    if loaded is None:
        return None
    state, used = loaded
    logger.info("resuming from checkpoint %s (epoch %s)", used, state.get("epoch"))
    return state


def _load_checkpoint_with_fallback(checkpoint: Any) -> dict[str, Any] | None:
    """A Ray checkpoint: on a local file system try it and then its older siblings (only
    inside the Tune experiment directory); elsewhere download the latest one only."""
    import pyarrow.fs

    filesystem = getattr(checkpoint, "filesystem", None)
    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        path = Path(checkpoint.path)
        roots = _experiment_roots() or [str(path.parent.parent)]
        loaded = load_latest(_older_siblings(path), allowed_roots=roots)
        if loaded is None:
            return None
        if loaded[1] != path:
            logger.warning("resumed from the older checkpoint %s instead of %s", loaded[1],
                           path)
        return loaded[0]
    with checkpoint.as_directory() as directory:
        loaded = load_latest([Path(directory)])
    return None if loaded is None else loaded[0]


def _experiment_roots() -> list[str]:
    """The Tune/Train experiment directory of this session (local storage), if known."""
    try:
        from ray.train._internal.session import get_session

        return [get_session().storage.experiment_fs_path]
    except Exception:  # no session (unit tests) or an API change: skip the containment check
        return []


def load_checkpoint_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a trial checkpoint (model/optimizer/scheduler state, epoch, model_config).

    Raises ``FileNotFoundError`` when there is none, ``CheckpointError`` when it is damaged and
    ``UnsafeCheckpointError`` when its pickle asks for more than tensors (never unpickled).
    """
    from coatnet.search.checkpoints import load_state

    if not (Path(directory) / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CHECKPOINT_FILE}")
    return load_state(directory)


# ---------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - reporting must never fail on this
        pass
    return socket.gethostname() or platform.node()


def _build_model(model_config: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
    from coatnet import CoAtNetConfig, CoAtNetWithLinearClassifier

    cfg = CoAtNetConfig.from_dict(model_config)
    mismatches = [
        f"{field}={have} but the dataset has {want}"
        for field, have, want in (
            ("image_height", cfg.image_height, info.image_size),
            ("image_width", cfg.image_width, info.image_size),
            ("image_channel", cfg.image_channel, info.image_channel),
            ("num_classes", cfg.num_classes, info.num_classes),
        ) if have != want
    ]
    if mismatches:
        raise ValueError("model config does not fit the data: " + "; ".join(mismatches))
    return CoAtNetWithLinearClassifier(cfg)


def _lr_lambda(*, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base lr, then cosine decay to zero, per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm scales (1-d parameters), as is usual for AdamW."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _all_reduce_(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def _maybe_inject_raise(fault: Mapping[str, Any], *, epoch: int, rank: int,
                        local_dir: str | None = None) -> None:
    """Test-only: raise once at ``raise_at_epoch``; the marker file records that it fired."""
    at = fault.get("raise_at_epoch")
    if at is None or epoch != int(at) or rank != 0:
        return
    marker = fault.get("marker")
    if not marker:
        raise ValueError("fault.raise_at_epoch needs fault.marker (a file path)")
    if os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"fired at epoch {epoch}\n")
    if fault.get("truncate_latest_checkpoint") and local_dir:
        newest = newest_first(Path(local_dir).glob("epoch_*"))
        if newest:  # a torn write: the latest checkpoint loses its second half
            path = newest[0] / CHECKPOINT_FILE
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    raise RuntimeError(f"injected fault at epoch {epoch}")


def _maybe_inject_kill(fault: Mapping[str, Any], *, epoch: int, rank: int) -> None:
    """Test-only: SIGKILL this process once at ``kill_at_epoch`` (an OOM kill, a lost worker);
    ``kill_marker`` records that it fired."""
    at = fault.get("kill_at_epoch")
    if at is None or epoch != int(at) or rank != 0:
        return
    marker = fault.get("kill_marker")
    if not marker:
        raise ValueError("fault.kill_at_epoch needs fault.kill_marker (a file path)")
    try:  # O_EXCL: of several trials reaching the epoch at once, exactly one dies
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"killed pid {os.getpid()} at epoch {epoch}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one candidate for ``trial.epochs`` epochs, reporting and checkpointing each epoch.

    ``config``: model (CoAtNetConfig dict), hparams, data, trial, seed, optional fault,
    report_extra (merged into every report, e.g. macs), runtime (report_to, resume_from,
    local_checkpoint_dir; set by ``run_trial``).
    """
    hp = config["hparams"]
    trial = config.get("trial", {})
    runtime = config.get("runtime", {}) or {}
    fault = config.get("fault") or {}
    seed = int(config.get("seed", 0))
    epochs = int(trial.get("epochs", 1))
    reporter = _make_reporter(runtime)
    rank, world_size = reporter.world_rank, reporter.world_size

    use_gpu = bool(trial.get("use_gpu", False))
    device = reporter.device(use_gpu=use_gpu)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, int(trial.get("cpus_per_worker", 1) or 1)))
        keep_freed_memory()
    _seed_everything(seed + rank)

    train_ds, val_ds, info = load_datasets(config["data"], seed=seed)
    model = _build_model(config["model"], info)
    params = sum(p.numel() for p in model.parameters())
    # No memory-format conversion here: the model runs channels-last on every device.
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = reporter.prepare_model(model, device)
    raw_model = model.module if isinstance(model, DistributedDataParallel) else model
    if on_gpu and trial.get("compile", False):
        model = torch.compile(model)

    batch_size = int(hp["batch_size"])
    num_data_workers = int(trial.get("num_data_workers", 0) or 0)
    loader_gen = torch.Generator()
    loader_kwargs: dict[str, Any] = dict(num_workers=num_data_workers, pin_memory=on_gpu,
                                         persistent_workers=num_data_workers > 0)
    train_loader = reporter.prepare_loader(DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size,
        generator=loader_gen, **loader_kwargs))
    val_loader = reporter.prepare_loader(DataLoader(
        val_ds, batch_size=max(batch_size, 256), shuffle=False, **loader_kwargs))

    steps_per_epoch = max(1, len(train_loader))
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(int(hp.get("warmup_epochs", 0)) * steps_per_epoch, total_steps - 1)
    # The fused kernel updates every tensor in one call instead of a Python loop per tensor.
    optimizer = torch.optim.AdamW(_param_groups(raw_model, float(hp["weight_decay"])),
                                  lr=float(hp["lr"]), fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup_steps=max(0, warmup_steps), total_steps=total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=float(hp.get("label_smoothing", 0.0)))

    start_epoch = 0
    state = reporter.resume_state()
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        logger.info("resumed from the checkpoint of epoch %d", start_epoch)
    resumed_from = start_epoch
    if state is not None and start_epoch >= epochs:
        # The trial had finished, but the driver died before Tune saved that: report the final
        # result again (no training), so Tune, ASHA and Optuna see how it ended.
        final = dict(state.get("metrics") or {})
        final.update(resumed_from_epoch=resumed_from, epochs_done=start_epoch)
        logger.info("checkpoint of epoch %d is the last one: re-reporting, not retraining",
                    start_epoch)
        reporter.report(final, state=None, epoch=start_epoch)
        return

    static = {"params": params, "node_id": _node_id(), "device": str(device),
              "world_size": world_size, "resumed_from_epoch": resumed_from,
              **dict(config.get("report_extra") or {})}
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_gpu
                else nullcontext())
    nan_from = fault.get("nan_loss_at_epoch")

    for epoch in range(start_epoch + 1, epochs + 1):
        _maybe_inject_raise(fault, epoch=epoch, rank=rank,
                            local_dir=runtime.get("local_checkpoint_dir"))
        _maybe_inject_kill(fault, epoch=epoch, rank=rank)
        always = fault.get("raise_always_if_lr")  # test-only: a trial that fails for good
        if always is not None and float(hp["lr"]) == float(always):
            raise RuntimeError(f"injected permanent fault (lr={hp['lr']}) at epoch {epoch}")
        if fault.get("sleep_per_epoch_s"):  # test-only: widen the window for interrupts
            time.sleep(float(fault["sleep_per_epoch_s"]))
        torch.manual_seed(seed * 1009 + epoch * 31 + rank)  # resume-stable randomness
        loader_gen.manual_seed(seed * 1009 + epoch)
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        poison = nan_from is not None and epoch >= int(nan_from)

        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        bad = torch.zeros((), device=device)
        seen = 0
        diverged = False
        for step, (images, labels) in enumerate(train_loader, start=1):
            if "startup_s" not in static and runtime.get("started_at"):
                static["startup_s"] = time.time() - float(runtime["started_at"])
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast:
                loss = criterion(model(images), labels)
            if poison:
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            detached = loss.detach()
            bad += (~torch.isfinite(detached)).float()
            loss_sum += detached.double() * len(labels)
            seen += len(labels)
            if step % _NAN_CHECK_EVERY == 0 or step == steps_per_epoch:
                if _all_reduce_(bad.clone(), world_size).item() > 0:
                    diverged = True
                    break
        train_time = time.perf_counter() - epoch_start

        if diverged:
            logger.warning("non-finite training loss in epoch %d: trial diverged", epoch)
            reporter.report({
                **static, "train_loss": DIVERGED_LOSS, "val_loss": DIVERGED_LOSS,
                "val_accuracy": 0.0, "epochs_done": epoch, "images_per_s": 0.0,
                "epoch_time_s": time.perf_counter() - epoch_start, "status": "diverged",
                "lr": float(scheduler.get_last_lr()[0]),
            }, state=None, epoch=epoch)
            return

        totals = torch.tensor([loss_sum.item(), float(seen)], device=device,
                              dtype=torch.float64)
        _all_reduce_(totals, world_size)
        train_loss = totals[0].item() / max(1.0, totals[1].item())
        images_per_s = totals[1].item() / max(train_time, 1e-9)

        val_loss, val_accuracy = _evaluate(model, val_loader, criterion, device=device,
                                           autocast=autocast, world_size=world_size)
        metrics = {
            **static, "train_loss": train_loss, "val_loss": val_loss,
            "val_accuracy": val_accuracy, "epochs_done": epoch, "images_per_s": images_per_s,
            "epoch_time_s": time.perf_counter() - epoch_start, "status": "running",
            "lr": float(scheduler.get_last_lr()[0]),
        }
        if not math.isfinite(val_loss):
            metrics.update(val_loss=DIVERGED_LOSS, train_loss=DIVERGED_LOSS, val_accuracy=0.0,
                           status="diverged")
            reporter.report(metrics, state=None, epoch=epoch)
            return
        state = None
        if rank == 0:
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch,
                     "model_config": dict(config["model"]),
                     "metrics": {k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float, str))}}
        reporter.report(metrics, state=state, epoch=epoch)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, *,
              device: torch.device, autocast: Any, world_size: int) -> tuple[float, float]:
    model.eval()
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        loss = criterion(logits.float(), labels)
        totals[0] += loss.double() * len(labels)
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
    _all_reduce_(totals, world_size)
    count = max(1.0, totals[2].item())
    return totals[0].item() / count, totals[1].item() / count


__all__ = ["CHECKPOINT_FILE", "DIVERGED_LOSS", "CheckpointError", "load_checkpoint_state",
           "train_loop_per_worker"]
