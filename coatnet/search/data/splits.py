"""What a prepared dataset is: its three splits, what the model needs to know about it, and the
seeded index split that keeps the held-out test part out of every trial's reach."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the loop need to know about a prepared dataset."""

    num_classes: int
    image_channel: int
    image_size: int
    num_train: int
    num_val: int
    num_test: int = 0  # 0: this dataset has no held-out test split

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Splits:
    """Train (what a trial fits), validation (what the search selects on) and test (seen only
    by the final evaluation of the winners; None when the dataset has none)."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    info: DatasetInfo


def split_indices(n: int, *, val_fraction: float, test_fraction: float, seed: int,
                  subset: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded, disjoint ``(train, val, test)`` index split of ``range(n)``.

    The test part is carved first, so it does not move when ``val_fraction`` or ``subset``
    change; ``subset`` caps the training part only; ``test_fraction=0`` gives an empty test
    part.
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    num_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    num_val = max(1, int(round(n * val_fraction)))
    if num_test + num_val >= n:
        raise ValueError(f"data.val_fraction={val_fraction} with data.test_fraction="
                         f"{test_fraction}: leaves no training samples out of {n}")
    test_idx = order[:num_test]
    val_idx = order[num_test:num_test + num_val]
    train_idx = order[num_test + num_val:]
    if subset is not None:
        train_idx = train_idx[:subset]
    return train_idx, val_idx, test_idx
