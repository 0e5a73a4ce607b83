"""Datasets read with torchvision: CIFAR-10/100 from ``data_dir`` (the official test set is the
test split; validation is a seeded part of the official training set) and ``ImageFolder`` trees
(``train/`` + ``val/`` [+ ``test/``] folders, or one folder split three ways). torchvision is
imported here only: importing it costs a cold process about three seconds."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from coatnet.search.data.splits import DatasetInfo, Splits, split_indices
from coatnet.search.errors import DataNotFoundError

logger = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def vision_transforms(*, size: int, native: int | None, mean: Sequence[float],
                      std: Sequence[float], augment: bool, channels: int) -> Any:
    """Resize (unless native), optional crop + flip augmentation, to a normalised tensor."""
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


def load_cifar(settings: Mapping[str, Any], *, seed: int) -> Splits:
    name = settings["dataset"]
    root = settings["data_dir"] or "./data"
    download = bool(settings["download"])
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    size = settings["image_size"]
    kwargs = dict(mean=CIFAR_MEAN, std=CIFAR_STD, native=32, size=size, channels=3)
    try:
        train_full = cls(root=root, train=True, download=download,
                         transform=vision_transforms(augment=bool(settings["augment"]), **kwargs))
    except RuntimeError as exc:
        if download:
            raise
        raise DataNotFoundError(
            f"data.dataset={name!r}: no {name} data found in data_dir="
            f"{str(Path(root).resolve())!r} ({exc}). Point --data-dir (data.data_dir) at the "
            f"folder that holds {cls.base_folder}/, or set data.download: true to fetch it."
        ) from exc
    plain = vision_transforms(augment=False, **kwargs)
    val_full = cls(root=root, train=True, download=False, transform=plain)
    test = cls(root=root, train=False, download=False, transform=plain)
    # the official test set is the held-out split: test_fraction does not apply
    train_idx, val_idx, _ = split_indices(len(train_full), val_fraction=settings["val_fraction"],
                                          test_fraction=0.0, seed=seed,
                                          subset=settings["subset"])
    train, val = Subset(train_full, train_idx.tolist()), Subset(val_full, val_idx.tolist())
    info = DatasetInfo(num_classes=len(train_full.classes), image_channel=3, image_size=size,
                       num_train=len(train), num_val=len(val), num_test=len(test))
    return Splits(train=train, val=val, test=test, info=info)


def load_imagefolder(settings: Mapping[str, Any], *, seed: int) -> Splits:
    from torchvision import datasets

    root = Path(settings["path"])
    size = settings["image_size"]
    channels = 1 if settings["image_channel"] == 1 else 3  # image_channel: 1 = greyscale
    mean, std = (0.5,) * channels, (0.5,) * channels
    train_tf = vision_transforms(size=size, native=None, mean=mean, std=std,
                                 augment=bool(settings["augment"]), channels=channels)
    plain = vision_transforms(size=size, native=None, mean=mean, std=std, augment=False,
                              channels=channels)
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = datasets.ImageFolder(root / "train", transform=train_tf)
            val = datasets.ImageFolder(root / "val", transform=plain)
            test = datasets.ImageFolder(root / "test", transform=plain) \
                if (root / "test").is_dir() else None
            for part, folder in ((val, "val"), (test, "test")):
                if part is not None and part.classes != train.classes:
                    raise ValueError(f"data.path={str(root)!r}: train/ classes {train.classes} "
                                     f"differ from {folder}/ classes {part.classes}")
            if test is None:
                logger.warning("data.path=%s has train/ and val/ but no test/ folder: the "
                               "search reports no held-out test accuracy", root)
            classes = train.classes
            if settings["subset"] is not None:
                gen = torch.Generator().manual_seed(seed)
                keep = torch.randperm(len(train), generator=gen)[:settings["subset"]]
                train = Subset(train, keep.tolist())
        else:
            train_full = datasets.ImageFolder(root, transform=train_tf)
            plain_full = datasets.ImageFolder(root, transform=plain)
            classes = train_full.classes
            train_idx, val_idx, test_idx = split_indices(
                len(train_full), val_fraction=settings["val_fraction"],
                test_fraction=settings["test_fraction"], seed=seed, subset=settings["subset"])
            train = Subset(train_full, train_idx.tolist())
            val = Subset(plain_full, val_idx.tolist())
            test = Subset(plain_full, test_idx.tolist()) if len(test_idx) else None
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"data.path={str(root)!r}: {exc}") from exc
    info = DatasetInfo(num_classes=len(classes), image_channel=channels, image_size=size,
                       num_train=len(train), num_val=len(val),
                       num_test=0 if test is None else len(test))
    return Splits(train=train, val=val, test=test, info=info)
