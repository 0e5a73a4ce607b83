"""What a finished search leaves behind: the leaderboard, the best config, the best checkpoint."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coatnet.search.checkpoints import is_pruned
from coatnet.search.contracts import Candidate

STATUSES = ("completed", "early-stopped", "diverged", "failed", "infeasible")


def trial_status(last_result: Mapping[str, Any] | None, *, max_epochs: int,
                 errored: bool = False) -> str:
    """The final status of one trial, from its last reported result."""
    if errored:
        return "failed"
    last = last_result or {}
    reported = last.get("status")
    if reported in ("infeasible", "diverged"):
        return str(reported)
    if int(last.get("epochs_done") or 0) < max_epochs:
        return "early-stopped"
    return "completed"


@dataclass(frozen=True)
class LeaderboardRow:
    trial_id: str
    status: str
    best_value: float | None
    epochs_done: int
    params: int | None
    macs: int | None
    candidate: Candidate | None  # None only for a trial Tune never gave a config
    checkpoint: str | None
    error: str | None = None
    test_accuracy: float | None = None  # held-out test split; only the winners are evaluated
    latency_ms: float | None = None  # measured once per candidate, on latency_device
    latency_device: str | None = None
    ended_at: float | None = None  # Tune's timestamp of the trial's last result
    on_front: bool = False  # on the accuracy-versus-cost Pareto front (coatnet.search.front)

    @property
    def model(self) -> Mapping[str, Any]:
        """The candidate's ``CoAtNetConfig`` dict ({} when infeasible)."""
        return (self.candidate.model if self.candidate else None) or {}

    def as_csv_row(self, metric: str) -> dict[str, Any]:
        model = self.model
        hparams = self.candidate.hparams.to_dict() if self.candidate else {}
        return {
            "trial_id": self.trial_id, "status": self.status, f"best_{metric}": self.best_value,
            "test_accuracy": self.test_accuracy,
            "epochs_done": self.epochs_done, "params": self.params, "macs": self.macs,
            "latency_ms": self.latency_ms, "latency_device": self.latency_device or "",
            "on_front": self.on_front,
            "layout": "".join(model.get("block_type_in_layers") or []),
            "depths": _join(model.get("num_blocks_in_layers")),
            "channels": _join(model.get("num_channels_in_layers")),
            "expand_scale": _join(model.get("expand_scale_in_layers")),
            "head_dim": model.get("head_dim"),
            **{k: hparams.get(k) for k in ("lr", "weight_decay", "label_smoothing",
                                           "batch_size", "warmup_epochs")},
            **{k: model.get(k) for k in ("ff_dropout", "attention_dropout", "path_dropout")},
            "infeasible_reason": (self.candidate and self.candidate.infeasible_reason) or "",
            "checkpoint": self.checkpoint or "", "error": self.error or "",
        }


def _join(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return "" if value is None else str(value)


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _best_of(values: list[float], mode: str) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def leaderboard(result_grid: Any, *, metric: str, mode: str,
                max_epochs: int) -> list[LeaderboardRow]:
    """One row per trial, best first; trials without a usable value last."""
    rows = []
    for result in result_grid:
        last = dict(result.metrics or {})
        trial_id = last.get("trial_id") or Path(result.path).name
        history = []
        if result.metrics_dataframe is not None and metric in result.metrics_dataframe:
            frame = result.metrics_dataframe
            if "status" in frame:
                frame = frame[frame["status"] == "running"]
            history = [float(v) for v in frame[metric].tolist()]
        status = trial_status(last, max_epochs=max_epochs, errored=result.error is not None)
        best_checkpoint = None
        if result.best_checkpoints:
            scored = [(c, m.get(metric)) for c, m in result.best_checkpoints
                      if isinstance(m.get(metric), (int, float))
                      and not is_pruned(c.filesystem, c.path)]
            if scored:
                pick = max if mode == "max" else min
                best_checkpoint = pick(scored, key=lambda item: item[1])[0].path
        if best_checkpoint is None and result.checkpoint is not None:
            best_checkpoint = result.checkpoint.path
        raw = (result.config or {}).get("candidate")
        candidate = Candidate.from_dict(raw) if raw else None
        rows.append(LeaderboardRow(
            trial_id=str(trial_id), status=status,
            best_value=None if status in ("infeasible", "diverged") else _best_of(history, mode),
            epochs_done=int(last.get("epochs_done") or 0),
            params=candidate.params if candidate else None,
            macs=candidate.macs if candidate else None, candidate=candidate,
            checkpoint=best_checkpoint,
            error=None if result.error is None else str(result.error).splitlines()[0][:300],
            latency_ms=_finite_or_none(last.get("latency_ms")),
            latency_device=last.get("latency_device"),
            ended_at=_finite_or_none(last.get("timestamp"))))
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.best_value is None,
                                       sign * (r.best_value or 0.0), r.trial_id))


def write_leaderboard(rows: list[LeaderboardRow], path: Path, *, metric: str) -> None:
    records = [row.as_csv_row(metric) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(records[0]) if records else ["trial_id", "status", f"best_{metric}"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def write_best_config(row: LeaderboardRow, path: Path, *, metric: str) -> None:
    """``CoAtNetConfig.from_yaml(path)`` turns this file back into the model."""
    document = {
        "model": dict(row.model) or None,
        "hparams": row.candidate.hparams.to_dict() if row.candidate else None,
        "result": {"trial_id": row.trial_id, metric: row.best_value,
                   "test_accuracy": row.test_accuracy,
                   "epochs_done": row.epochs_done, "params": row.params, "macs": row.macs,
                   "latency_ms": row.latency_ms, "latency_device": row.latency_device,
                   "on_front": row.on_front, "checkpoint": row.checkpoint},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def format_leaderboard(rows: list[LeaderboardRow], *, metric: str, limit: int = 10) -> str:
    """The top ``limit`` rows as a table; ``*`` marks the rows on the Pareto front."""
    header = f"{'rank':>4}  {'trial':<14} {'status':<14} {metric:>12} {'epochs':>6} " \
             f"{'params':>9} {'MMACs':>8} {'ms':>7}  layout depths / channels"
    lines = [header, "-" * len(header)]
    for rank, row in enumerate(rows[:limit], start=1):
        model = row.model
        value = "-" if row.best_value is None else f"{row.best_value:.4f}"
        params = "-" if row.params is None else f"{row.params / 1e6:.2f}M"
        macs = "-" if row.macs is None else f"{row.macs / 1e6:.1f}"
        latency = "-" if row.latency_ms is None else f"{row.latency_ms:.2f}"
        arch = (f"{''.join(model.get('block_type_in_layers') or []) or '-'} "
                f"{_join(model.get('num_blocks_in_layers'))} / "
                f"{_join(model.get('num_channels_in_layers'))}")
        mark = "*" if row.on_front else " "
        lines.append(f"{rank:>4}{mark} {row.trial_id:<14} {row.status:<14} {value:>12} "
                     f"{row.epochs_done:>6} {params:>9} {macs:>8} {latency:>7}  {arch}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in leaderboard.csv")
    if any(r.on_front for r in rows):
        lines.append("* on the Pareto front (pareto.csv); ms: inference latency per batch")
    return "\n".join(lines)


@dataclass(frozen=True)
class ResultFiles:
    """Where ``export`` wrote the outcome, and the best row (None when no trial has a value)."""

    leaderboard_csv: Path
    best_config_yaml: Path | None
    best: LeaderboardRow | None


def export(rows: list[LeaderboardRow], experiment_dir: Path, *, metric: str,
           best: LeaderboardRow | None = None) -> ResultFiles:
    """``leaderboard.csv`` and (when a trial has a value) ``best_config.yaml`` of ``best``
    (default: the first row with a value, the most accurate)."""
    leaderboard_csv = experiment_dir / "leaderboard.csv"
    write_leaderboard(rows, leaderboard_csv, metric=metric)
    if best is None:
        best = next((r for r in rows if r.best_value is not None), None)
    best_config_yaml = None
    if best is not None:
        best_config_yaml = experiment_dir / "best_config.yaml"
        write_best_config(best, best_config_yaml, metric=metric)
    return ResultFiles(leaderboard_csv=leaderboard_csv, best_config_yaml=best_config_yaml,
                       best=best)


def status_counts(rows: list[LeaderboardRow]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts
