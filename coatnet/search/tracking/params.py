"""What MLflow is given: params (flattened, truncated, never a secret), finite numbers, times.

MLflow params are flat strings of bounded length, and its metrics must be finite numbers; these
helpers turn the search's nested settings and candidates into exactly that. Nothing here talks
to a server.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

__all__ = ["MAX_PARAM_VAL_LENGTH", "SAMPLED_PREFIXES", "candidate_params", "chunks",
           "finite_number", "flatten_params", "now_ms", "sampled_params"]

SAMPLED_PREFIXES = ("model.", "train.")  # the space's sampled keys, flat in a Tune config

_SECRET_MARKERS = ("token", "password", "secret")


def _is_secret(key: str) -> bool:
    low = key.lower()
    return any(marker in low for marker in _SECRET_MARKERS)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    return text[:MAX_PARAM_VAL_LENGTH]


def flatten_params(data: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """Flatten a nested dict into MLflow params (dotted keys, truncated values, no secrets)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if _is_secret(full):
            continue
        if isinstance(value, Mapping):
            out.update(flatten_params(value, full))
        else:
            out[full] = _param_value(value)
    return out


def candidate_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The flattened candidate.model.* and candidate.hparams.* of a Tune trial config.

    This flattens the candidate's dict form (``Candidate.to_dict()``, as the trial config holds
    it) key by key, so every key there becomes a param; an infeasible candidate (``model`` is
    None) logs ``candidate.model = "None"``.
    """
    candidate = config.get("candidate") or {}
    params: dict[str, str] = {}
    for section in ("model", "hparams"):
        value = candidate.get(section)
        if isinstance(value, Mapping):
            params.update(flatten_params(value, f"candidate.{section}"))
        elif value is None and section == "model":
            params["candidate.model"] = "None"
    return params


def sampled_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The values the searcher sampled (``model.layout``, ``train.lr``, ...) as MLflow params:
    the trial config's flat space keys, which the saved view's columns and parallel
    coordinates read."""
    return {key: _param_value(value) for key, value in sorted(config.items())
            if isinstance(key, str) and key.startswith(SAMPLED_PREFIXES)}


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    """``items`` in consecutive slices of at most ``size`` (MLflow caps a batch's length)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's timestamp unit."""
    return int(time.time() * 1000)
