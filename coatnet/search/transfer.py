"""Resolution transfer: a trained CoAtNet at another input size, and its accuracy at several.

CoAtNet's relative-attention tables are sized for the feature maps of the training resolution.
``at_image_size`` moves a trained model to another one the way the paper fine-tunes (224 ->
384): every table bilinearly interpolated and stored for the new size with
``update_relative_bias_and_indices``, in a model whose config says the new size, so it trains,
exports and checkpoints like one built there. ``evaluate_at_sizes`` reports accuracy on the
validation and test splits and latency at each size; the fine-tune's before/after and
``experiments/evaluate.py`` both use it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from coatnet.config import MIN_IMAGE_SIDE

logger = logging.getLogger(__name__)

__all__ = ["SizeResult", "at_image_size", "evaluate_at_sizes", "format_sizes", "parse_sizes",
           "sizes_table"]


@dataclass(frozen=True)
class SizeResult:
    """One row of an evaluation at several input sizes."""

    image_size: int
    val_accuracy: float
    test_accuracy: float | None  # None: the dataset has no held-out test split
    latency_ms: float  # median per batch of ``latency_batch`` on ``device``
    latency_batch: int
    device: str
    trained_size: int  # the size the model's tables were trained for


def parse_sizes(text: str, *, flag: str = "--image-sizes") -> tuple[int, ...]:
    """``"32,48,64"`` -> (32, 48, 64); a clear ``ValueError`` naming ``flag`` otherwise."""
    try:
        sizes = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag}={text!r}: use comma-separated whole numbers of pixels, e.g. "
                         "32,48,64") from None
    if not sizes:
        raise ValueError(f"{flag}={text!r}: give at least one image size")
    small = [s for s in sizes if s < MIN_IMAGE_SIDE]
    if small:
        raise ValueError(f"{flag}={text!r}: {small[0]} px is below the smallest size a CoAtNet "
                         f"takes ({MIN_IMAGE_SIDE} px: five stride-2 stages)")
    return sizes


def at_image_size(model: Any, image_size: int) -> Any:
    """A copy of ``model`` (a ``CoAtNetWithLinearClassifier``) for ``image_size`` x
    ``image_size`` inputs: relative-bias tables interpolated and stored, config updated."""
    from coatnet import CoAtNetWithLinearClassifier

    config = model.config
    if (config.image_height, config.image_width) == (image_size, image_size):
        return copy.deepcopy(model)
    source = copy.deepcopy(model)
    source.update_relative_bias_and_indices(image_size, image_size)
    target = CoAtNetWithLinearClassifier(config.replace(image_height=image_size,
                                                        image_width=image_size))
    target.load_state_dict(source.state_dict())  # tables already at the new size
    return target.train(model.training)


def evaluate_at_sizes(model: Any, *, data: Mapping[str, Any], seed: int,
                      sizes: Sequence[int], latency_batch: int = 1,
                      batch_size: int = 256) -> list[SizeResult]:
    """Accuracy on the validation and test splits of ``data`` (resized to each size) and the
    latency of ``model`` at each of ``sizes``, on this process's CPU (or its GPU)."""
    from coatnet.search.data import load_splits
    from coatnet.search.latency import measure_latency
    from coatnet.search.train_loop import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = int(model.config.image_height)
    criterion = torch.nn.CrossEntropyLoss()
    rows = []
    for size in sizes:
        resized = at_image_size(model, int(size)).to(device).eval()
        splits = load_splits({**dict(data), "image_size": int(size)}, seed=seed)
        accuracy: dict[str, float | None] = {"val": None, "test": None}
        for name, split in (("val", splits.val), ("test", splits.test)):
            if split is None:
                continue
            loader = DataLoader(split, batch_size=batch_size, shuffle=False)
            with torch.no_grad():
                _, accuracy[name] = evaluate(resized, loader, criterion, device=device,
                                             autocast=_autocast(device), world_size=1)
        latency = measure_latency(resized, image_size=int(size),
                                  image_channel=int(model.config.image_channel), device=device,
                                  batch_size=latency_batch, threads=1, warmup=2, repeats=5)
        rows.append(SizeResult(image_size=int(size), val_accuracy=float(accuracy["val"]),
                               test_accuracy=accuracy["test"], latency_ms=latency.ms,
                               latency_batch=latency_batch, device=latency.device,
                               trained_size=trained))
        logger.info("%d px: val accuracy %.4f, test accuracy %s, %.2f ms", size,
                    accuracy["val"], "-" if accuracy["test"] is None else
                    f"{accuracy['test']:.4f}", latency.ms)
    return rows


def _autocast(device: torch.device) -> Any:
    from contextlib import nullcontext

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def sizes_table(rows: Sequence[SizeResult], **extra: Any) -> dict[str, list[Any]]:
    """The rows as columns, for ``MlflowClient.log_table`` (``extra``: constant columns)."""
    columns: dict[str, list[Any]] = {key: [] for key in asdict(rows[0])} if rows else {}
    for row in rows:
        for key, value in asdict(row).items():
            columns[key].append(value)
    for key, value in extra.items():
        columns[key] = [value] * len(rows)
    return columns


def format_sizes(rows: Sequence[SizeResult], *, title: str = "") -> str:
    """A plain-text table: one line per size."""
    lines = [title] if title else []
    lines.append(f"{'size':>5}  {'val acc':>8}  {'test acc':>8}  {'latency':>10}  device")
    for row in rows:
        test = "-" if row.test_accuracy is None else f"{row.test_accuracy:.4f}"
        mark = " (trained)" if row.image_size == row.trained_size else ""
        lines.append(f"{row.image_size:>4}px  {row.val_accuracy:>8.4f}  {test:>8}  "
                     f"{row.latency_ms:>7.2f} ms  {row.device}{mark}")
    return "\n".join(lines)
