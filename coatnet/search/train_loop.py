"""The per-worker training loop of one search trial: ``train_loop_per_worker``.

It takes a ``LoopConfig`` (as Train's ``train_loop_config`` dict), builds the data, the model
and the optimiser, trains ``trial.epochs`` epochs and reports an ``EpochReport`` with a
checkpoint after each one, through the reporter that ``runtime.report_to`` picks
(``coatnet.search.reporting``: a Ray Train worker, or straight to Tune in-process). A resumed
trial continues from its checkpoint; one whose checkpoint is already the last epoch re-reports
its final result instead of retraining. A non-finite loss ends the trial as ``diverged``.

MLflow and torchvision stay out of this module: it is imported by every Train worker.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import random
import socket
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from coatnet.cpu_memory import keep_freed_memory
from coatnet.search.checkpoints import CHECKPOINT_FILE, CheckpointError, load_state
from coatnet.search.contracts import (STATUS_DIVERGED, STATUS_RUNNING, EpochReport,
                                      LoopConfig)
from coatnet.search.data import DatasetInfo, load_datasets
from coatnet.search.faults import FaultPlan
from coatnet.search.latency import measure_latency
from coatnet.search.reporting import Reporter, load_checkpoint_state, make_reporter

logger = logging.getLogger(__name__)

DIVERGED_LOSS = 1e6
_NAN_CHECK_EVERY = 16  # steps between (synchronising) non-finite loss checks


# ---------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def node_id() -> str:
    """The Ray node id of this process (host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - reporting must never fail on this
        pass
    return socket.gethostname() or platform.node()


def build_model(model_config: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
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


# ---------------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """What one worker trains with (built once by ``_setup``)."""

    model: nn.Module  # what the steps call (DDP-wrapped and/or compiled)
    raw_model: nn.Module  # what the checkpoint stores
    device: torch.device
    train_loader: DataLoader
    val_loader: DataLoader
    loader_gen: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    autocast: Any
    params: int
    info: DatasetInfo


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one candidate for ``trial.epochs`` epochs, reporting and checkpointing each epoch.

    ``config`` is ``LoopConfig.to_dict()`` (docs/design.md); ``run_trial`` builds it.
    """
    loop = LoopConfig.from_dict(config)
    faults = FaultPlan.from_dict(loop.faults)
    reporter = make_reporter(loop.runtime)
    rank, world_size = reporter.world_rank, reporter.world_size
    run = _setup(loop, reporter)

    start_epoch = 0
    history: list[dict[str, Any]] = []  # every epoch's metrics, kept in each checkpoint
    state = reporter.resume_state()
    if state is not None:
        run.raw_model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        history = list(state.get("history") or [])
        logger.info("resumed from the checkpoint of epoch %d", start_epoch)
        finished = start_epoch >= loop.trial.epochs
        _report_unseen(reporter, history, start_epoch=start_epoch, keep_last=finished)
        if finished:
            # The trial had finished, but the driver died before Tune saved that: report the
            # final result again (no training), so Tune, ASHA and Optuna see how it ended.
            final = dict(state.get("metrics") or {})
            final.update(resumed_from_epoch=start_epoch, epochs_done=start_epoch)
            logger.info("checkpoint of epoch %d is the last one: re-reporting, not retraining",
                        start_epoch)
            reporter.report(final, state=None, epoch=start_epoch)
            return

    elif loop.runtime.init_from:  # a fine-tune: the weights only, a fresh optimizer
        run.raw_model.load_state_dict(load_state(loop.runtime.init_from)["model"])
        logger.info("started from the weights in %s", loop.runtime.init_from)

    static = {"params": run.params, "macs": loop.macs, "node_id": node_id(),
              "device": str(run.device), "world_size": world_size,
              "resumed_from_epoch": start_epoch,
              **_latency(loop, run, rank=rank, measured=(state or {}).get("metrics"))}
    for epoch in range(start_epoch + 1, loop.trial.epochs + 1):
        if faults is not None:  # test-only (coatnet.search.faults)
            faults.before_epoch(epoch=epoch, rank=rank, lr=loop.hparams.lr,
                                local_checkpoint_dir=loop.runtime.local_checkpoint_dir)
        epoch_start = time.perf_counter()
        train_loss, images_per_s = _train_epoch(
            run, epoch=epoch, seed=loop.seed, rank=rank, world_size=world_size,
            poison=faults is not None and faults.poisons(epoch), static=static,
            started_at=loop.runtime.started_at)
        lr = float(run.scheduler.get_last_lr()[0])
        if train_loss is None:
            logger.warning("non-finite training loss in epoch %d: trial diverged", epoch)
            reporter.report(_diverged(static, epoch=epoch, lr=lr, epoch_start=epoch_start),
                            state=None, epoch=epoch)
            return
        val_loss, val_accuracy = evaluate(run.model, run.val_loader, run.criterion,
                                           device=run.device, autocast=run.autocast,
                                           world_size=world_size)
        report = EpochReport(**static, train_loss=train_loss, val_loss=val_loss,
                             val_accuracy=val_accuracy, epochs_done=epoch,
                             images_per_s=images_per_s,
                             epoch_time_s=time.perf_counter() - epoch_start,
                             status=STATUS_RUNNING, lr=lr)
        if not math.isfinite(val_loss):
            diverged = dataclasses.replace(report, val_loss=DIVERGED_LOSS,
                                           train_loss=DIVERGED_LOSS, val_accuracy=0.0,
                                           status=STATUS_DIVERGED)
            reporter.report(diverged.to_metrics(), state=None, epoch=epoch)
            return
        metrics = report.to_metrics()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        history.append(scalars)
        state = None
        if rank == 0:
            state = {"model": run.raw_model.state_dict(),
                     "optimizer": run.optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "epoch": epoch,
                     "model_config": dict(loop.model), "metrics": scalars,
                     "history": list(history)}
        reporter.report(metrics, state=state, epoch=epoch)


def _latency(loop: LoopConfig, run: _Run, *, rank: int,
             measured: Mapping[str, Any] | None) -> dict[str, Any]:
    """``latency_ms`` / ``latency_device`` of the candidate: from the checkpoint a trial resumed
    from (measured once per candidate), else measured now, before any training, by rank 0
    (whose reports are the trial's)."""
    if loop.latency is None or rank != 0:
        return {}
    if measured and measured.get("latency_ms") is not None:
        return {"latency_ms": measured["latency_ms"],
                "latency_device": measured.get("latency_device")}
    settings = dict(loop.latency)
    latency = measure_latency(run.raw_model, image_size=run.info.image_size,
                              image_channel=run.info.image_channel, device=run.device,
                              batch_size=int(settings.get("batch_size", 1)),
                              threads=int(settings.get("threads", 1)),
                              warmup=int(settings.get("warmup", 3)),
                              repeats=int(settings.get("repeats", 10)))
    logger.info("latency %.3f ms per batch of %d on %s (%d thread(s), median of %d)",
                latency.ms, latency.batch_size, latency.device, latency.threads,
                latency.repeats)
    return {"latency_ms": latency.ms, "latency_device": latency.device}


def _report_unseen(reporter: Reporter, history: list[dict[str, Any]], *, start_epoch: int,
                   keep_last: bool) -> None:
    """Report again the epochs Tune never saw: those after the checkpoint Tune named, up to
    the newer one the loop resumed from (a driver killed before Tune processed them).
    ``keep_last``: leave the last one out (the caller re-reports it as the final result)."""
    named = reporter.named_epoch
    if named is None or named >= start_epoch:
        return
    unseen = [m for m in history if named < int(m.get("epochs_done", 0)) <= start_epoch]
    if keep_last:
        unseen = unseen[:-1]
    if unseen:
        logger.info("reporting epochs %s again: Tune's saved state ends at epoch %d",
                    [m["epochs_done"] for m in unseen], named)
    for metrics in unseen:  # marked as replayed: resumed_from_epoch >= epochs_done
        reporter.report({**metrics, "resumed_from_epoch": start_epoch}, state=None,
                        epoch=int(metrics["epochs_done"]))


def _setup(loop: LoopConfig, reporter: Reporter) -> _Run:
    """Device, threads, seed, data loaders, model, fused AdamW, warm-up + cosine schedule."""
    trial, hp = loop.trial, loop.hparams
    device = reporter.device(use_gpu=trial.use_gpu)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, int(trial.cpus_per_worker or 1)))
        keep_freed_memory()
    _seed_everything(loop.seed + reporter.world_rank)

    train_ds, val_ds, info = load_datasets(loop.data, seed=loop.seed)
    model = build_model(loop.model, info)
    params = sum(p.numel() for p in model.parameters())
    # No memory-format conversion here: the model runs channels-last on every device.
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = reporter.prepare_model(model, device)
    raw_model = model.module if isinstance(model, DistributedDataParallel) else model
    if on_gpu and trial.compile:
        model = torch.compile(model)

    batch_size = int(hp.batch_size)
    num_data_workers = int(trial.num_data_workers or 0)
    loader_gen = torch.Generator()
    loader_kwargs: dict[str, Any] = dict(num_workers=num_data_workers, pin_memory=on_gpu,
                                         persistent_workers=num_data_workers > 0)
    train_loader = reporter.prepare_loader(DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size,
        generator=loader_gen, **loader_kwargs))
    val_loader = reporter.prepare_loader(DataLoader(
        val_ds, batch_size=max(batch_size, 256), shuffle=False, **loader_kwargs))

    steps_per_epoch = max(1, len(train_loader))
    total_steps = trial.epochs * steps_per_epoch
    warmup_steps = min(int(hp.warmup_epochs) * steps_per_epoch, total_steps - 1)
    # The fused kernel updates every tensor in one call instead of a Python loop per tensor.
    optimizer = torch.optim.AdamW(_param_groups(raw_model, float(hp.weight_decay)),
                                  lr=float(hp.lr), fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup_steps=max(0, warmup_steps), total_steps=total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=float(hp.label_smoothing))
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_gpu
                else nullcontext())
    return _Run(model=model, raw_model=raw_model, device=device, train_loader=train_loader,
                val_loader=val_loader, loader_gen=loader_gen, optimizer=optimizer,
                scheduler=scheduler, criterion=criterion, autocast=autocast, params=params,
                info=info)


def _train_epoch(run: _Run, *, epoch: int, seed: int, rank: int, world_size: int,
                 poison: bool, static: dict[str, Any],
                 started_at: float | None) -> tuple[float | None, float]:
    """One pass over the training data: ``(mean loss, images/s)``, or ``(None, 0.0)`` when a
    loss turned non-finite (checked every few steps, so the check rarely synchronises)."""
    torch.manual_seed(seed * 1009 + epoch * 31 + rank)  # resume-stable randomness
    run.loader_gen.manual_seed(seed * 1009 + epoch)
    sampler = getattr(run.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    steps_per_epoch = max(1, len(run.train_loader))
    device = run.device
    epoch_start = time.perf_counter()
    run.model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    bad = torch.zeros((), device=device)
    seen = 0
    for step, (images, labels) in enumerate(run.train_loader, start=1):
        if "startup_s" not in static and started_at:
            static["startup_s"] = time.time() - float(started_at)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with run.autocast:
            loss = run.criterion(run.model(images), labels)
        if poison:
            loss = loss * float("nan")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        detached = loss.detach()
        bad += (~torch.isfinite(detached)).float()
        loss_sum += detached.double() * len(labels)
        seen += len(labels)
        if step % _NAN_CHECK_EVERY == 0 or step == steps_per_epoch:
            if _all_reduce_(bad.clone(), world_size).item() > 0:
                return None, 0.0
    train_time = time.perf_counter() - epoch_start
    totals = torch.tensor([loss_sum.item(), float(seen)], device=device, dtype=torch.float64)
    _all_reduce_(totals, world_size)
    return totals[0].item() / max(1.0, totals[1].item()), totals[1].item() / max(train_time,
                                                                                 1e-9)


def _diverged(static: Mapping[str, Any], *, epoch: int, lr: float,
              epoch_start: float) -> dict[str, Any]:
    return EpochReport(**static, train_loss=DIVERGED_LOSS, val_loss=DIVERGED_LOSS,
                       val_accuracy=0.0, epochs_done=epoch, images_per_s=0.0,
                       epoch_time_s=time.perf_counter() - epoch_start, status=STATUS_DIVERGED,
                       lr=lr).to_metrics()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, *,
             device: torch.device, autocast: Any, world_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over ``loader``, summed across the worker group."""
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
