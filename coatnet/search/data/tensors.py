"""Bundled datasets held as tensors: ``TensorImageDataset`` (uint8 images, normalised per
item), the node-local file cache of prepared tensors and the helpers that prepare them."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from coatnet.search.checkpoints import atomic_write_bytes
from coatnet.search.data.splits import DatasetInfo, Splits, split_indices

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "COATNET_DATA_CACHE_DIR"


class TensorImageDataset(Dataset):
    """Images kept as one uint8 tensor (N, C, H, W), normalised per item.

    uint8 storage keeps a 224-pixel digits set at ~90 MB instead of ~360 MB of floats.
    Augmentation (random shift by padding + crop, optional horizontal flip) runs per item.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean: Sequence[float],
                 std: Sequence[float], augment: bool = False, hflip: bool = False) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        channels = images.shape[1]
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(channels, 1, 1) * 255.0
        self.std = torch.tensor(list(std), dtype=torch.float32).view(channels, 1, 1) * 255.0
        self.augment = augment
        self.hflip = hflip
        self.pad = max(1, images.shape[-1] // 8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            image = self._augment(image)
        x = (image.float() - self.mean) / self.std
        return x, self.labels[index]

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        pad = self.pad
        height, width = image.shape[-2:]
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        image = padded[:, top:top + height, left:left + width]
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image


def cache_dir(data: Mapping[str, Any] | None = None) -> Path:
    """Node-local directory for prepared tensors: ``data.cache_dir``, $COATNET_DATA_CACHE_DIR,
    or ``<tmp>/coatnet-search-cache``."""
    explicit = (data or {}).get("cache_dir")
    root = explicit or os.environ.get(CACHE_DIR_ENV) \
        or os.path.join(tempfile.gettempdir(), "coatnet-search-cache")
    return Path(root)


def to_uint8(images: torch.Tensor, *, lo: float, hi: float) -> torch.Tensor:
    scaled = (images - lo) / (hi - lo) * 255.0
    return scaled.round().clamp_(0, 255).to(torch.uint8)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                           align_corners=False)


def _file_cache_load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: rebuild it rather than fail the trial
        logger.warning("ignoring unreadable dataset cache %s: %s", path, exc)
        return None


def _file_cache_store(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write so concurrent trials never see half a file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:  # a read-only or full disk only costs speed
        logger.warning("could not write dataset cache %s: %s", path, exc)


def tensor_splits(payload: Mapping[str, Any], settings: Mapping[str, Any], *,
                  hflip: bool) -> Splits:
    """The prepared tensors as datasets; only the training part is augmented."""
    mean, std = payload["mean"].tolist(), payload["std"].tolist()
    train = TensorImageDataset(payload["train_x"], payload["train_y"], mean=mean, std=std,
                               augment=bool(settings["augment"]), hflip=hflip)
    val = TensorImageDataset(payload["val_x"], payload["val_y"], mean=mean, std=std)
    test = None
    if len(payload["test_y"]):
        test = TensorImageDataset(payload["test_x"], payload["test_y"], mean=mean, std=std)
    info = DatasetInfo(num_classes=int(payload["num_classes"]),
                       image_channel=int(payload["train_x"].shape[1]),
                       image_size=int(settings["image_size"]),
                       num_train=len(train), num_val=len(val),
                       num_test=0 if test is None else len(test))
    return Splits(train=train, val=val, test=test, info=info)


def prepared(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
             settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Split three ways, and compute per-channel mean/std on the training part (0..1)."""
    train_idx, val_idx, test_idx = split_indices(
        len(labels), val_fraction=settings["val_fraction"],
        test_fraction=settings["test_fraction"], seed=seed, subset=settings["subset"])
    train_x = images[train_idx]
    as_float = train_x.float() / 255.0
    mean = as_float.mean(dim=(0, 2, 3))
    std = as_float.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return {"train_x": train_x.contiguous(), "train_y": labels[train_idx].clone(),
            "val_x": images[val_idx].contiguous(), "val_y": labels[val_idx].clone(),
            "test_x": images[test_idx].contiguous(), "test_y": labels[test_idx].clone(),
            "mean": mean, "std": std, "num_classes": num_classes}


def cached_tensors(settings: Mapping[str, Any], *, key: str,
                   build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The prepared tensors from the node-local file cache, built (and stored) on a miss."""
    path = cache_dir(settings) / f"{settings['dataset']}-{key}.pt"
    payload = _file_cache_load(path)
    if payload is None:
        payload = build()
        _file_cache_store(path, payload)
    else:
        logger.debug("dataset cache hit: %s", path)
    return payload
