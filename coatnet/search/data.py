"""Dataset registry for search trials: one call turns the space file's ``data`` section into
``(train_ds, val_ds, DatasetInfo)``.

Why the caching: a search runs many short trials on one node, often inside reused Tune
actors. Preparing a dataset (reading, normalising, upsampling) once per process and once per
node (a file cache of the prepared tensors) keeps trial start-up in the sub-second range.
torchvision is imported lazily, only by the CIFAR and ImageFolder loaders, because importing
it costs a cold process about three seconds.

Datasets
    ``digits``      scikit-learn's ``load_digits``: a real 10-class image dataset shipped inside
                    the installed scikit-learn package (1797 grey 8x8 handwritten digits), so
                    it needs no download. Normalised and upsampled once to ``image_size``.
    ``cifar10`` / ``cifar100``  torchvision CIFAR from ``data_dir``; downloads only when
                    ``download`` is true. The validation set is a seeded ``val_fraction`` split
                    of the official training set (the test set stays untouched by the search).
    ``imagefolder`` torchvision ``ImageFolder`` at ``path``: ``path/train`` + ``path/val`` when
                    both exist, otherwise a seeded split of ``path``; resized to ``image_size``.
    ``synthetic``   seeded random images carrying a learnable per-class pattern, for tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from coatnet.search.checkpoints import atomic_write_bytes
from coatnet.search.errors import DataNotFoundError

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
CACHE_DIR_ENV = "COATNET_DATA_CACHE_DIR"
_CACHE_FORMAT = 1  # bump when the prepared-tensor layout changes

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

_memory_cache: dict[str, tuple[Dataset, Dataset, DatasetInfo]] = {}
_memory_lock = threading.Lock()


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the loop need to know about a prepared dataset."""

    num_classes: int
    image_channel: int
    image_size: int
    num_train: int
    num_val: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


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


# ---------------------------------------------------------------------------------- public API
def load_datasets(data: Mapping[str, Any], *, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Return ``(train_ds, val_ds, info)`` for the space file's ``data`` section.

    Items are ``(float image tensor (C, H, W), int64 label)``. Results are cached in-process
    (keyed by the settings and seed) so reused Tune actors and repeated trials pay once.
    """
    settings = _normalise(data)
    key = _cache_key(settings, seed)
    with _memory_lock:
        cached = _memory_cache.get(key)
    if cached is not None:
        return cached
    name = settings["dataset"]
    if name == "digits":
        result = _load_digits(settings, seed=seed, key=key)
    elif name == "synthetic":
        result = _load_synthetic(settings, seed=seed, key=key)
    elif name in ("cifar10", "cifar100"):
        result = _load_cifar(settings, seed=seed)
    else:
        result = _load_imagefolder(settings, seed=seed)
    with _memory_lock:
        _memory_cache[key] = result
    logger.info("prepared dataset %s: %s", name, result[2])
    return result


def clear_memory_cache() -> None:
    """Forget datasets held in this process (tests, or to free memory)."""
    with _memory_lock:
        _memory_cache.clear()


def cache_dir(data: Mapping[str, Any] | None = None) -> Path:
    """Node-local directory for prepared tensors: ``data.cache_dir``, $COATNET_DATA_CACHE_DIR,
    or ``<tmp>/coatnet-search-cache``."""
    explicit = (data or {}).get("cache_dir")
    root = explicit or os.environ.get(CACHE_DIR_ENV) \
        or os.path.join(tempfile.gettempdir(), "coatnet-search-cache")
    return Path(root)


# ---------------------------------------------------------------------------------- settings
_DEFAULTS: dict[str, Any] = {
    "image_size": 32, "val_fraction": 0.2, "data_dir": None, "path": None, "download": False,
    "subset": None, "num_classes": 10, "image_channel": 3, "num_samples": 512,
    "augment": False, "cache_dir": None,
}


def _normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected a mapping (the space file's data section), "
                         f"got {type(data).__name__}")
    settings = dict(_DEFAULTS)
    settings.update({k: v for k, v in data.items() if v is not None or k not in _DEFAULTS})
    name = settings.get("dataset")
    if name not in DATASETS:
        raise ValueError(f"data.dataset={name!r}: must be one of {list(DATASETS)}")
    size = settings["image_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"data.image_size={size!r}: must be one int (square images)")
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"data.image_size={size!r}: must be a positive int")
    settings["image_size"] = size
    frac = settings["val_fraction"]
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
        raise ValueError(f"data.val_fraction={frac!r}: must be a number in (0, 1)")
    subset = settings["subset"]
    if subset is not None and (not isinstance(subset, int) or isinstance(subset, bool)
                               or subset < 1):
        raise ValueError(f"data.subset={subset!r}: must be a positive int or null")
    if name == "synthetic":
        for field in ("num_classes", "image_channel", "num_samples"):
            value = settings[field]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{field}={value!r}: must be a positive int")
        if settings["num_classes"] < 2:
            raise ValueError(f"data.num_classes={settings['num_classes']!r}: must be >= 2")
    if name == "imagefolder":
        path = settings["path"]
        if not path:
            raise ValueError("data.path: required for dataset 'imagefolder' (a folder with one "
                             "sub-folder per class, or train/ and val/ folders of those)")
        if not Path(path).is_dir():
            raise ValueError(f"data.path={str(path)!r}: not a directory (dataset "
                             "'imagefolder' needs a folder of class sub-folders)")
    return settings


def _cache_key(settings: Mapping[str, Any], seed: int) -> str:
    relevant = {k: v for k, v in settings.items() if k != "cache_dir"}
    relevant["seed"] = seed
    relevant["format"] = _CACHE_FORMAT
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------- helpers
def _split_indices(n: int, *, val_fraction: float, seed: int,
                   subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/val index split; ``subset`` caps the training part only."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    num_val = max(1, int(round(n * val_fraction)))
    if num_val >= n:
        raise ValueError(f"data.val_fraction={val_fraction}: leaves no training samples "
                         f"out of {n}")
    val_idx, train_idx = order[:num_val], order[num_val:]
    if subset is not None:
        train_idx = train_idx[:subset]
    return train_idx, val_idx


def _to_uint8(images: torch.Tensor, *, lo: float, hi: float) -> torch.Tensor:
    scaled = (images - lo) / (hi - lo) * 255.0
    return scaled.round().clamp_(0, 255).to(torch.uint8)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
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


def _tensor_result(payload: Mapping[str, Any], settings: Mapping[str, Any], *,
                   hflip: bool) -> tuple[Dataset, Dataset, DatasetInfo]:
    mean, std = payload["mean"].tolist(), payload["std"].tolist()
    train = TensorImageDataset(payload["train_x"], payload["train_y"], mean=mean, std=std,
                               augment=bool(settings["augment"]), hflip=hflip)
    val = TensorImageDataset(payload["val_x"], payload["val_y"], mean=mean, std=std)
    info = DatasetInfo(num_classes=int(payload["num_classes"]),
                       image_channel=int(payload["train_x"].shape[1]),
                       image_size=int(settings["image_size"]),
                       num_train=len(train), num_val=len(val))
    return train, val, info


def _prepared(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
              settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Split, and compute per-channel mean/std on the training part (uint8 scale 0..1)."""
    train_idx, val_idx = _split_indices(len(labels), val_fraction=settings["val_fraction"],
                                        seed=seed, subset=settings["subset"])
    train_x = images[train_idx]
    as_float = train_x.float() / 255.0
    mean = as_float.mean(dim=(0, 2, 3))
    std = as_float.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return {"train_x": train_x.contiguous(), "train_y": labels[train_idx].clone(),
            "val_x": images[val_idx].contiguous(), "val_y": labels[val_idx].clone(),
            "mean": mean, "std": std, "num_classes": num_classes}


def _cached_tensors(settings: Mapping[str, Any], *, key: str, build) -> dict[str, Any]:
    path = cache_dir(settings) / f"{settings['dataset']}-{key}.pt"
    payload = _file_cache_load(path)
    if payload is None:
        payload = build()
        _file_cache_store(path, payload)
    else:
        logger.debug("dataset cache hit: %s", path)
    return payload


# ---------------------------------------------------------------------------------- loaders
def _load_digits(settings: Mapping[str, Any], *, seed: int,
                 key: str) -> tuple[Dataset, Dataset, DatasetInfo]:
    def build() -> dict[str, Any]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # 0..16
        images = _resize(images, settings["image_size"])
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        return _prepared(_to_uint8(images, lo=0.0, hi=16.0), labels, num_classes=10,
                         settings=settings, seed=seed)

    # digits are not mirror-symmetric: no horizontal flips
    return _tensor_result(_cached_tensors(settings, key=key, build=build), settings,
                          hflip=False)


def _load_synthetic(settings: Mapping[str, Any], *, seed: int,
                    key: str) -> tuple[Dataset, Dataset, DatasetInfo]:
    def build() -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        n, classes = settings["num_samples"], settings["num_classes"]
        channels, size = settings["image_channel"], settings["image_size"]
        # One smooth random pattern per class (4x4 upsampled), plus per-sample noise: a
        # small conv net separates the classes well above chance within a few epochs.
        prototypes = _resize(torch.randn(classes, channels, 4, 4, generator=gen), size)
        labels = torch.arange(n) % classes
        labels = labels[torch.randperm(n, generator=gen)]
        images = prototypes[labels] + 0.8 * torch.randn(n, channels, size, size, generator=gen)
        return _prepared(_to_uint8(images, lo=-3.0, hi=3.0), labels, num_classes=classes,
                         settings=settings, seed=seed)

    return _tensor_result(_cached_tensors(settings, key=key, build=build), settings,
                          hflip=True)


def _vision_transforms(*, size: int, native: int | None, mean: Sequence[float],
                       std: Sequence[float], augment: bool, channels: int):
    from torchvision import transforms

    steps: list[Any] = []
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    if native is None or native != size:
        steps.append(transforms.Resize((size, size), antialias=True))
    if augment:
        steps += [transforms.RandomCrop(size, padding=max(1, size // 8)),
                  transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def _load_cifar(settings: Mapping[str, Any], *, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    name = settings["dataset"]
    root = settings["data_dir"] or "./data"
    download = bool(settings["download"])
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    size = settings["image_size"]
    kwargs = dict(mean=_CIFAR_MEAN, std=_CIFAR_STD, native=32, size=size, channels=3)
    try:
        train_full = cls(root=root, train=True, download=download,
                         transform=_vision_transforms(augment=bool(settings["augment"]), **kwargs))
    except RuntimeError as exc:
        if download:
            raise
        raise DataNotFoundError(
            f"data.dataset={name!r}: no {name} data found in data_dir="
            f"{str(Path(root).resolve())!r} ({exc}). Point --data-dir (data.data_dir) at the "
            f"folder that holds {cls.base_folder}/, or set data.download: true to fetch it."
        ) from exc
    val_full = cls(root=root, train=True, download=False,
                   transform=_vision_transforms(augment=False, **kwargs))
    train_idx, val_idx = _split_indices(len(train_full), val_fraction=settings["val_fraction"],
                                        seed=seed, subset=settings["subset"])
    train, val = Subset(train_full, train_idx.tolist()), Subset(val_full, val_idx.tolist())
    info = DatasetInfo(num_classes=len(train_full.classes), image_channel=3, image_size=size,
                       num_train=len(train), num_val=len(val))
    return train, val, info


def _load_imagefolder(settings: Mapping[str, Any], *,
                      seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision import datasets

    root = Path(settings["path"])
    size = settings["image_size"]
    channels = 1 if settings["image_channel"] == 1 else 3  # image_channel: 1 = greyscale
    mean, std = (0.5,) * channels, (0.5,) * channels
    train_tf = _vision_transforms(size=size, native=None, mean=mean, std=std,
                                  augment=bool(settings["augment"]), channels=channels)
    val_tf = _vision_transforms(size=size, native=None, mean=mean, std=std, augment=False,
                                channels=channels)
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = datasets.ImageFolder(root / "train", transform=train_tf)
            val = datasets.ImageFolder(root / "val", transform=val_tf)
            if train.classes != val.classes:
                raise ValueError(f"data.path={str(root)!r}: train/ classes {train.classes} "
                                 f"differ from val/ classes {val.classes}")
            classes = train.classes
            if settings["subset"] is not None:
                gen = torch.Generator().manual_seed(seed)
                keep = torch.randperm(len(train), generator=gen)[:settings["subset"]]
                train = Subset(train, keep.tolist())
        else:
            train_full = datasets.ImageFolder(root, transform=train_tf)
            val_full = datasets.ImageFolder(root, transform=val_tf)
            classes = train_full.classes
            train_idx, val_idx = _split_indices(len(train_full),
                                                val_fraction=settings["val_fraction"],
                                                seed=seed, subset=settings["subset"])
            train = Subset(train_full, train_idx.tolist())
            val = Subset(val_full, val_idx.tolist())
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"data.path={str(root)!r}: {exc}") from exc
    info = DatasetInfo(num_classes=len(classes), image_channel=channels, image_size=size,
                       num_train=len(train), num_val=len(val))
    return train, val, info


__all__ = ["DATASETS", "DataNotFoundError", "DatasetInfo", "TensorImageDataset",
           "cache_dir", "clear_memory_cache", "load_datasets"]
