"""Trial checkpoints on disk: atomic writes, corruption detection, safe loading.

Hours of training hang on these files, so a crash while writing one must never leave a torn
file under the final name (temp file, fsync, rename, fsync of the directory), a damaged latest
checkpoint must cost one epoch rather than the trial (``load_latest`` falls back to the
previous one, with a warning), and loading must never run code: ``torch.load`` always gets
``weights_only=True``, and a file whose pickle asks for anything else is refused without
falling back (that is tampering, not bad luck).

Each checkpoint directory holds ``checkpoint.pt`` and ``checkpoint.pt.sha256`` (the digest is
written after the data, so a digest that matches proves the data is complete). Checkpoints from
before the digest existed load without the check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
DIGEST_SUFFIX = ".sha256"
_EPOCH_DIR = re.compile(r"(\d+)")
EPOCH_FILE = "epoch.json"  # {"epoch": n}: what a checkpoint holds, readable without unpickling
PRUNED_MARKER = "PRUNED"  # a tombstone: a superseded checkpoint's directory without its payload


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted (an older one may still be usable)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that asks the unpickler for more than tensors and plain containers, or one
    outside the directories this trial may read: refused, never retried with another file."""


def _fsync_dir(directory: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a file system without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_state(state: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Atomically write ``state`` (and its sha256) into ``directory``; returns the file."""
    os.makedirs(directory, exist_ok=True)
    path = Path(directory) / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp", dir=directory)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_bytes(str(path) + DIGEST_SUFFIX, (digest.hexdigest() + "\n").encode())
    if isinstance(state.get("epoch"), int):  # kept when the checkpoint is pruned
        atomic_write_bytes(Path(directory) / EPOCH_FILE, json.dumps(
            {"epoch": state["epoch"]}).encode())
    return path


def checkpoint_epoch(filesystem: Any, path: str) -> int | None:
    """The epoch a checkpoint directory holds (also a pruned one), from its small sidecar
    file; None when unknown."""
    try:
        with filesystem.open_input_file(f"{path.rstrip('/')}/{EPOCH_FILE}") as fh:
            value = json.loads(fh.read().decode()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _check_digest(path: Path) -> None:
    digest_path = Path(str(path) + DIGEST_SUFFIX)
    if not digest_path.is_file():
        return  # written before digests existed (or by hand): torch.load's own checks only
    want = digest_path.read_text().strip()
    have = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            have.update(block)
    if have.hexdigest() != want:
        raise CheckpointError(f"{path}: contents do not match {digest_path.name} (truncated or "
                              "corrupted)")


def _within(path: Path, roots: Iterable[str | os.PathLike[str]]) -> bool:
    resolved = path.resolve()
    for root in roots:
        try:
            resolved.relative_to(Path(root).resolve())
            return True
        except ValueError:
            continue
    return False


def load_state(directory: str | os.PathLike[str], *,
               allowed_roots: Sequence[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Load one checkpoint directory; raises ``CheckpointError`` / ``UnsafeCheckpointError``.

    ``allowed_roots``: when given, the file must resolve to a path inside one of them (symlinks
    included), so a crafted ``resume_from`` cannot make a trial unpickle a foreign file.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if allowed_roots is not None and not _within(path, allowed_roots):
        raise UnsafeCheckpointError(
            f"{path}: outside the directories this trial may load checkpoints from "
            f"({', '.join(str(r) for r in allowed_roots)}); refused")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CHECKPOINT_FILE}")
    _check_digest(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights_only" in text or "Weights only" in text or "Unsupported global" in text:
            found = re.search(r"Unsupported global: [^\n.]*|Unsupported operand[^\n.]*", text)
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file asks the unpickler for objects other than "
                "tensors and plain containers (torch.load weights_only=True)"
                + (f": {found.group(0).strip()}" if found else "")) from None
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a trial checkpoint (no epoch/model entries)")
    return state


def _order_key(directory: Path) -> tuple[int, str]:
    numbers = _EPOCH_DIR.findall(directory.name)
    return (int(numbers[0]) if numbers else -1, directory.name)


def newest_first(directories: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint directories (``epoch_0003``, ``checkpoint_000002``...) newest first."""
    return sorted((Path(d) for d in directories), key=_order_key, reverse=True)


def load_latest(candidates: Sequence[str | os.PathLike[str]], *,
                allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
                ) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint of ``candidates`` (newest first), or None if none is.

    A damaged one is skipped with a warning; an unsafe one raises ``UnsafeCheckpointError``.
    """
    for index, directory in enumerate(candidates):
        try:
            return load_state(directory, allowed_roots=allowed_roots), Path(directory)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            rest = len(candidates) - index - 1
            logger.warning("checkpoint %s is unusable: %s; %s", directory, err,
                           "falling back to the previous one" if rest else
                           "no older checkpoint left, starting from scratch")
    return None


def is_pruned(filesystem: Any, path: str) -> bool:
    """Whether the checkpoint directory ``path`` on a pyarrow filesystem is a tombstone
    (``coatnet.search.pruning``)."""
    import pyarrow.fs

    info = filesystem.get_file_info(f"{path.rstrip('/')}/{PRUNED_MARKER}")
    return info.type != pyarrow.fs.FileType.NotFound


__all__ = ["CHECKPOINT_FILE", "EPOCH_FILE", "PRUNED_MARKER", "checkpoint_epoch", "is_pruned", "CheckpointError", "UnsafeCheckpointError", "atomic_write_bytes",
           "load_latest", "load_state", "newest_first", "save_state"]
