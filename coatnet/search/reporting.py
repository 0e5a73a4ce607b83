"""Where a training loop's reports and checkpoints go, and where a resumed one starts from.

Two reporters, one interface (``Reporter``), picked by ``LoopRuntime.report_to``:

* ``TrainReporter`` (``report_to == "train"``): inside a Ray Train worker (a worker group, DDP
  when several workers), or a ``TorchTrainer(ScalingConfig(num_workers=0))`` outside Tune.
  Uses ``ray.train.get_context`` / ``prepare_model`` / ``prepare_data_loader`` / ``report`` /
  ``get_checkpoint``; ``run_trial`` forwards rank-0 reports to Tune from the controller.
* ``TuneReporter`` (``report_to == "tune"``): the in-process mode, ``TorchTrainer`` with
  ``num_workers=0`` inside a Tune function trainable. In Ray 2.60 every ``ray.train.*`` session
  API (report, get_context, get_checkpoint, and ``prepare_model`` which calls get_context)
  raises a DeprecationWarning inside a Tune session, and Train calls no callbacks in local
  mode, so the loop reports straight to Tune (``ray.tune.report`` with the checkpoint) and
  resumes from ``runtime.resume_from`` or ``ray.tune.get_checkpoint()``.

Resuming tries the newest checkpoint and then its older siblings (a damaged one is skipped),
reading only inside the directories this trial may read. Ray is imported lazily.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from coatnet.search.checkpoints import (CHECKPOINT_FILE, PRUNED_MARKER, checkpoint_epoch,
                                        is_pruned, load_latest, newest_first, save_state)
from coatnet.search.contracts import REPORT_TO_TUNE, LoopRuntime

logger = logging.getLogger(__name__)

_KEEP_LOCAL = 2  # local epoch_* checkpoints kept, so a damaged latest one has a predecessor


# ---------------------------------------------------------------------------------- reporting
class Reporter:
    """Where metrics and checkpoints go, and where a resume checkpoint comes from."""

    world_size: int = 1
    world_rank: int = 0
    local_rank: int = 0
    # set by resume_state: the epoch of the checkpoint Tune named, when known. After a driver
    # was killed, the loop may resume from a newer one; the epochs in between were never
    # reported to Tune, and the loop reports them again from the checkpoint's history.
    named_epoch: int | None = None

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


class TrainReporter(Reporter):
    """Ray Train session (worker group, or Train's local mode outside Tune)."""

    def __init__(self, runtime: LoopRuntime) -> None:
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
            self.named_epoch = checkpoint_epoch(checkpoint.filesystem, checkpoint.path)
            return _load_checkpoint_with_fallback(checkpoint)
        if self._runtime.resume_from:  # a worker group's start from Tune's checkpoint
            self.named_epoch = checkpoint_epoch(pyarrow.fs.LocalFileSystem(),
                                                self._runtime.resume_from)
        return _load_resume_from(self._runtime.resume_from, roots=None)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        import ray.train

        if state is None or self.world_rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with checkpoint_directory(self._runtime.local_checkpoint_dir, epoch,
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


class TuneReporter(Reporter):
    """In-process mode inside a Tune trial: report to Tune directly.

    Keeps the latest checkpoint also in ``runtime.local_checkpoint_dir`` (when given) so that
    ``run_trial`` can restart a failed attempt from it in the same process.
    """

    def __init__(self, runtime: LoopRuntime) -> None:
        self._runtime = runtime
        self._local_dir = runtime.local_checkpoint_dir

    def device(self, *, use_gpu: bool) -> torch.device:
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("trial.use_gpu is true but this process sees no CUDA device")
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def resume_state(self) -> dict[str, Any] | None:
        if self._runtime.resume_from:
            # run_trial's own retry: only its private local checkpoint dir may be read
            roots = [self._local_dir] if self._local_dir else None
            return _load_resume_from(self._runtime.resume_from, roots=roots)
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            checkpoint = unsaved_trial_checkpoint()
            if checkpoint is None:
                return None
            self.named_epoch = 0  # Tune knew of no epoch: every one is reported again
        else:
            self.named_epoch = checkpoint_epoch(checkpoint.filesystem, checkpoint.path)
        return _load_checkpoint_with_fallback(checkpoint)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        import ray.tune

        if state is None:
            ray.tune.report(metrics)
            return
        with checkpoint_directory(self._local_dir, epoch, state) as directory:
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory))


def make_reporter(runtime: LoopRuntime) -> Reporter:
    """The reporter for ``runtime.report_to`` (validated by ``LoopRuntime``)."""
    return TuneReporter(runtime) if runtime.report_to == REPORT_TO_TUNE else TrainReporter(runtime)


@contextmanager
def checkpoint_directory(local_dir: str | None, epoch: int,
                          state: dict[str, Any]) -> Iterator[str]:
    """A directory holding ``state`` for one report.

    With ``local_dir`` the checkpoint stays there (``epoch_NNNN``, older ones pruned after the
    report) so the caller can restart from it in this process; otherwise a temp directory that
    is removed once the report has copied it to storage.
    """
    if not local_dir:
        with tempfile.TemporaryDirectory(prefix="coatnet-ckpt-") as directory:
            save_state(state, directory)  # temp file, fsync, rename, sha256
            yield directory
        return
    directory = os.path.join(local_dir, f"epoch_{epoch:04d}")
    save_state(state, directory)  # temp file, fsync, rename, sha256
    yield directory
    for old in newest_first(Path(local_dir).glob("epoch_*"))[_KEEP_LOCAL:]:
        shutil.rmtree(old, ignore_errors=True)


def _stamp() -> str:
    return f"{time.time_ns():x}"


# ---------------------------------------------------------------------------------- resuming
_CHECKPOINT_DIR = re.compile(r"^(epoch|checkpoint)_\d")


def _siblings(directory: Path) -> list[Path]:
    """The intact checkpoints next to ``directory`` (same trial), newest first, newer ones
    included: after a driver was killed, Tune's saved state can name an older checkpoint than
    the newest one the trial wrote, or a pruned one (``coatnet.search.pruning``)."""
    parent = directory.parent
    if not parent.is_dir():
        return [directory]
    found = newest_first(p for p in parent.iterdir()
                         if p.is_dir() and _CHECKPOINT_DIR.match(p.name)
                         and not (p / PRUNED_MARKER).exists())
    return found or [directory]


def _load_resume_from(resume_from: str | None, *,
                      roots: list[str] | None) -> dict[str, Any] | None:
    """``runtime.resume_from``: a checkpoint dir (its siblings are the alternatives, newest
    first) or a dir of ``epoch_*`` checkpoints."""
    if not resume_from:
        return None
    base = Path(resume_from)
    if (base / CHECKPOINT_FILE).exists() or _CHECKPOINT_DIR.match(base.name):
        candidates = _siblings(base)
    else:
        candidates = newest_first(base.glob("epoch_*"))
    loaded = load_latest(candidates, allowed_roots=roots)
    if loaded is None:
        return None
    state, used = loaded
    logger.info("resuming from checkpoint %s (epoch %s)", used, state.get("epoch"))
    return state


def _load_checkpoint_with_fallback(checkpoint: Any) -> dict[str, Any] | None:
    """A Ray checkpoint: the trial's newest intact checkpoint next to it (only inside the Tune
    experiment directory on a local file system), falling back to older ones."""
    filesystem = getattr(checkpoint, "filesystem", None)
    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        path = Path(checkpoint.path)
        roots = _experiment_roots() or [str(path.parent.parent)]
        loaded = load_latest(_siblings(path), allowed_roots=roots)
        if loaded is not None and loaded[1] != path:
            logger.warning("resumed from checkpoint %s instead of %s, the one Tune named",
                           loaded[1], path)
        return None if loaded is None else loaded[0]
    import ray.tune

    for remote in _remote_siblings(filesystem, checkpoint.path):
        with ray.tune.Checkpoint(path=remote, filesystem=filesystem).as_directory() as local:
            loaded = load_latest([Path(local)])
        if loaded is not None:
            if remote != checkpoint.path:
                logger.warning("resumed from checkpoint %s instead of %s, the one Tune named",
                               remote, checkpoint.path)
            return loaded[0]
    return None


def _remote_siblings(filesystem: Any, path: str) -> list[str]:
    """``_siblings`` on a bucket: intact checkpoint directories next to ``path``."""
    parent = path.rstrip("/").rsplit("/", 1)[0]
    try:
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent, recursive=False))
    except OSError:
        return [path]
    dirs = [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
            and _CHECKPOINT_DIR.match(i.base_name) and not is_pruned(filesystem, i.path)]
    ordered = [str(p) for p in newest_first(dirs)]
    return ordered or [path]


def unsaved_trial_checkpoint() -> Any | None:
    """The newest intact checkpoint in this Tune trial's own directory, when Tune names none.

    A driver killed before Tune saved any checkpoint of a running (or just finished) trial
    leaves Tune a state in which the trial has none, while the trial's directory holds the
    checkpoints it wrote; without this the resumed trial would train again from scratch.
    """
    try:
        import ray.tune
        from ray.train._internal.session import get_session

        storage = get_session().storage
        filesystem, trial_dir = storage.storage_filesystem, storage.trial_fs_path
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(trial_dir, recursive=False,
                                                                 allow_not_found=True))
    except Exception:  # no Tune session (unit tests) or an unreadable directory: scratch
        return None
    found = [str(p) for p in newest_first(
        i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
        and _CHECKPOINT_DIR.match(i.base_name) and not is_pruned(filesystem, i.path))]
    if not found:
        return None
    logger.warning("Tune's saved state names no checkpoint for this trial, but its directory "
                   "holds %d (a driver was killed before Tune saved them): resuming from %s",
                   len(found), found[0])
    return ray.tune.Checkpoint(path=found[0], filesystem=filesystem)


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

