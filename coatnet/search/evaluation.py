"""The held-out test figure: a finished search's winners evaluated once on the test split.

Trials train on the training split and the search selects on validation, so the validation
accuracy of the winner is optimistically biased. ``held_out_accuracy`` loads the checkpoint that the
leaderboard picked for a trial (its best validation epoch), rebuilds the model from the
checkpoint's own config and measures it on the test split, which no trial ever loaded. It runs
in the driver process on its CPU (or one GPU when the driver has one), after ``fit`` returns.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from coatnet.search.data import load_splits
from coatnet.search.results import LeaderboardRow

logger = logging.getLogger(__name__)

TEST_METRIC = "test_accuracy"


def held_out_accuracy(*, checkpoint: str, data: Mapping[str, Any], seed: int,
                  batch_size: int = 256) -> float | None:
    """Accuracy on the test split of the model in ``checkpoint`` (a trial checkpoint folder,
    local or a ``scheme://`` URI); None when the dataset has no test split."""
    from coatnet.search.reporting import load_checkpoint_state
    from coatnet.search.train_loop import build_model, evaluate

    splits = load_splits(data, seed=seed)
    if splits.test is None:
        return None
    with local_checkpoint(checkpoint) as directory:
        state = load_checkpoint_state(directory)
    model = build_model(state["model_config"], splits.info)
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = DataLoader(splits.test, batch_size=batch_size, shuffle=False)
    criterion = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) \
        if device.type == "cuda" else nullcontext()
    with torch.no_grad():
        _, accuracy = evaluate(model, loader, criterion, device=device, autocast=autocast,
                               world_size=1)
    return float(accuracy)


def evaluate_rows(rows: Iterable[LeaderboardRow], *, data: Mapping[str, Any],
                  seed: int) -> dict[str, float]:
    """``{trial_id: test accuracy}`` for the given rows (those with a checkpoint); a row that
    cannot be evaluated is logged and left out, never fatal: the search is done."""
    out: dict[str, float] = {}
    for row in rows:
        if not row.checkpoint:
            continue
        try:
            value = held_out_accuracy(checkpoint=row.checkpoint, data=data, seed=seed)
        except Exception as err:  # noqa: BLE001 - a result file must still be written
            logger.warning("could not evaluate trial %s on the test split: %s: %s",
                           row.trial_id, type(err).__name__, err)
            continue
        if value is None:
            logger.info("the dataset has no test split: no held-out test accuracy")
            return {}
        out[row.trial_id] = value
        logger.info("trial %s: test accuracy %.4f on the held-out split (validation %s)",
                    row.trial_id, value, row.best_value)
    return out


@contextlib.contextmanager
def local_checkpoint(path: str) -> Iterator[Path]:
    """A checkpoint folder on this machine: the folder itself, or a temporary copy of a
    remote one (``s3://``, ``gs://``, ...)."""
    if "://" not in path:
        yield Path(path)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="coatnet-test-eval-") as tmp:
        filesystem, remote = pyarrow.fs.FileSystem.from_uri(path)
        pyarrow.fs.copy_files(remote, tmp, source_filesystem=filesystem)
        yield Path(tmp)
