"""The outcome of an accuracy-versus-cost search: its Pareto front and the files that show it.

The front is taken over the trials that ran every epoch (``completed``): an early-stopped
trial's accuracy is that of fewer epochs, and ``ParetoASHA`` only stops a trial that is
dominated at its rung. ``export_front`` writes ``pareto.csv`` (front members with every
objective, test accuracy and config path), ``pareto/<trial_id>.yaml`` (each loads with
``CoAtNetConfig.from_yaml``), ``pareto.png`` (every trial a point, early-stopped and
infeasible ones marked apart, the front a step line, the cost axis logarithmic) and returns
the hypervolume with its reference point.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coatnet.search.pareto import Objective, hypervolume, pareto_front
from coatnet.search.results import LeaderboardRow, write_best_config

logger = logging.getLogger(__name__)

__all__ = ["Condition", "FrontFiles", "PICK_METRICS", "export_front", "format_front", "front_of",
           "hypervolume_history", "objective_value", "objectives_of", "parse_pick",
           "pick_best", "reference_point"]

PICK_METRICS = ("val_accuracy", "val_loss", "train_loss", "params", "macs", "latency_ms")
_OPERATORS = ("<=", ">=", "<", ">")  # two-character ones first


def objectives_of(search: Any) -> tuple[Objective, ...]:
    """A ``search:`` section's objectives: ``search.objectives``, else its metric and mode."""
    entries = getattr(search, "objectives", None) or []
    if entries:
        return tuple(Objective(metric=e.metric, mode=e.mode) for e in entries)
    return (Objective(metric=search.metric, mode=search.mode),)


def objective_value(row: LeaderboardRow, objective: Objective, *,
                    metric: str) -> float | None:
    """The row's value of one objective: its best ``metric`` for the quality objective, the
    candidate's cost (``params``, ``macs``, ``latency_ms``) otherwise."""
    value = row.best_value if objective.metric == metric else getattr(row, objective.metric,
                                                                       None)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def front_of(rows: Sequence[LeaderboardRow], objectives: Sequence[Objective], *,
             metric: str) -> list[LeaderboardRow]:
    """The completed rows no other completed row dominates, cheapest first."""
    done = [r for r in rows if r.status == "completed"]
    points = [tuple(objective_value(r, o, metric=metric) for o in objectives) for r in done]
    front = [done[i] for i in pareto_front(points, [o.mode for o in objectives])]
    if len(objectives) > 1:
        front.sort(key=lambda r: objective_value(r, objectives[1], metric=metric) or 0.0)
    return front


def reference_point(rows: Sequence[LeaderboardRow], objectives: Sequence[Objective], *,
                    metric: str) -> tuple[float, ...]:
    """A point worse than every completed trial: 0 for accuracy, the worst value seen plus
    10 % for a minimised objective (losses, costs)."""
    reference = []
    for objective in objectives:
        values = [v for r in rows if r.status == "completed"
                  if (v := objective_value(r, objective, metric=metric)) is not None]
        if objective.mode == "max":
            reference.append(min([0.0, *values]))
        else:
            reference.append(max(values) * 1.1 if values else 1.0)
    return tuple(reference)


@dataclass(frozen=True)
class FrontFiles:
    """What ``export_front`` wrote, and the front's hypervolume at ``reference``."""

    pareto_csv: Path
    configs: tuple[Path, ...]
    plot: Path | None
    front: tuple[LeaderboardRow, ...]
    hypervolume: float
    reference: tuple[float, ...]


def export_front(rows: Sequence[LeaderboardRow], experiment_dir: Path, *,
                 objectives: Sequence[Objective], metric: str) -> FrontFiles:
    front = front_of(rows, objectives, metric=metric)
    reference = reference_point(rows, objectives, metric=metric)
    volume = hypervolume([tuple(objective_value(r, o, metric=metric) for o in objectives)
                          for r in front], [o.mode for o in objectives], reference)
    config_dir = experiment_dir / "pareto"
    configs = []
    for row in front:
        path = config_dir / f"{row.trial_id}.yaml"
        write_best_config(row, path, metric=metric)
        configs.append(path)
    pareto_csv = experiment_dir / "pareto.csv"
    fields = ["trial_id", *[o.metric if o.metric != metric else f"best_{metric}"
                            for o in objectives], "test_accuracy", "epochs_done", "config",
              "checkpoint"]
    with pareto_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for row, path in zip(front, configs):
            writer.writerow([row.trial_id,
                             *[objective_value(row, o, metric=metric) for o in objectives],
                             "" if row.test_accuracy is None else row.test_accuracy,
                             row.epochs_done, str(path), row.checkpoint or ""])
    plot = None
    if len(objectives) >= 2:
        plot = experiment_dir / "pareto.png"
        try:
            plot_front(rows, front, plot, objectives=objectives, metric=metric)
        except Exception as err:  # noqa: BLE001 - a picture must not lose the search
            logger.warning("could not draw %s: %s", plot, err)
            plot = None
    return FrontFiles(pareto_csv=pareto_csv, configs=tuple(configs), plot=plot,
                      front=tuple(front), hypervolume=volume, reference=reference)


def plot_front(rows: Sequence[LeaderboardRow], front: Sequence[LeaderboardRow], path: Path, *,
               objectives: Sequence[Objective], metric: str) -> None:
    """Quality (y) against the first cost (x, log scale): every trial, the front as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality, cost = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"completed": ("o", "tab:blue"), "early-stopped": ("x", "tab:gray"),
              "diverged": ("v", "tab:red"), "failed": ("v", "tab:red")}
    for status, (marker, colour) in styles.items():
        points = [(objective_value(r, cost, metric=metric),
                   objective_value(r, quality, metric=metric)) for r in rows
                  if r.status == status]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            ax.scatter(*zip(*points), marker=marker, color=colour, label=status, alpha=0.7)
    infeasible = [objective_value(r, cost, metric=metric) for r in rows
                  if r.status == "infeasible"]
    infeasible = [x for x in infeasible if x is not None]
    if infeasible:
        ax.scatter(infeasible, [ax.get_ylim()[0]] * len(infeasible), marker="|",
                   color="tab:orange", label="infeasible (never trained)")
    steps = [(objective_value(r, cost, metric=metric), objective_value(r, quality,
                                                                      metric=metric))
             for r in front]
    ax.set_xscale("log")
    if steps:
        xs, ys = zip(*steps)
        # the front's staircase runs on to the right edge: what every member dominates
        right = max(ax.get_xlim()[1], max(xs) * 1.05)
        ax.step([*xs, right], [*ys, ys[-1]], where="post", color="black", label="Pareto front")
        ax.scatter(xs, ys, s=120, facecolors="none", edgecolors="black", linewidths=1.2)
        ax.set_xlim(right=right)
    ax.set_xlabel(f"{cost.metric} (log scale, lower is better)")
    ax.set_ylabel(f"best {quality.metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- picking a model
@dataclass(frozen=True)
class Condition:
    """One clause of a ``--pick`` rule, e.g. ``macs<=1e6``."""

    metric: str
    op: str
    value: float

    def holds(self, row: LeaderboardRow, *, metric: str) -> bool:
        actual = row.best_value if self.metric == metric else getattr(row, self.metric, None)
        if not isinstance(actual, (int, float)) or not math.isfinite(actual):
            return False
        return {"<=": actual <= self.value, ">=": actual >= self.value,
                "<": actual < self.value, ">": actual > self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_pick(text: str | None) -> tuple[Condition, ...]:
    """``"macs<=1e6,latency_ms<5"`` -> its conditions (all must hold); ``ValueError`` naming
    the bad clause and what is allowed. The held-out ``test_accuracy`` is never a rule: no
    choice may look at the test split."""
    if text is None or not text.strip():
        return ()
    conditions = []
    for clause in (c.strip() for c in text.split(",")):
        match = re.fullmatch(r"([A-Za-z_]+)\s*(<=|>=|<|>)\s*(\S+)", clause)
        if match is None:
            raise ValueError(f"--pick: cannot read {clause!r}; write METRIC OP NUMBER, e.g. "
                             f"'macs<=1e6', with OP one of {', '.join(_OPERATORS)}, clauses "
                             f"joined by ','")
        name, op, number = match.groups()
        if name not in PICK_METRICS:
            raise ValueError(f"--pick: unknown metric {name!r} in {clause!r}; allowed: "
                             f"{', '.join(PICK_METRICS)} (test_accuracy never picks: it is "
                             f"the held-out figure)")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"--pick: {number!r} in {clause!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"--pick: {number!r} in {clause!r} is not a finite number")
        conditions.append(Condition(metric=name, op=op, value=value))
    return tuple(conditions)


def pick_best(front: Sequence[LeaderboardRow], conditions: Sequence[Condition], *,
              metric: str, mode: str) -> LeaderboardRow | None:
    """The most accurate (best ``metric``) front member meeting every condition; None when
    none does."""
    eligible = [r for r in front if r.best_value is not None
                and all(c.holds(r, metric=metric) for c in conditions)]
    if not eligible:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(eligible, key=lambda r: (sign * float(r.best_value or 0.0), r.trial_id))


def hypervolume_history(rows: Sequence[LeaderboardRow], objectives: Sequence[Objective], *,
                        metric: str, reference: Sequence[float]) -> list[tuple[int, float]]:
    """``(k, hypervolume)`` after each of the k finished trials, in the order they ended (by
    their last result's time), at one reference point: how the front grew."""
    ordered = sorted(rows, key=lambda r: (r.ended_at is None, r.ended_at or 0.0, r.trial_id))
    history, done = [], []
    modes = [o.mode for o in objectives]
    for k, row in enumerate(ordered, start=1):
        if row.status == "completed":
            done.append(tuple(objective_value(row, o, metric=metric) for o in objectives))
        front = [done[i] for i in pareto_front(done, modes)] if done else []
        history.append((k, hypervolume(front, modes, reference) if front else 0.0))
    return history


def format_front(front: Sequence[LeaderboardRow], *, objectives: Sequence[Objective],
                 metric: str) -> str:
    """The front as a table, cheapest first: every objective, test accuracy, the config."""
    names = [f"best_{o.metric}" if o.metric == metric else o.metric for o in objectives]
    header = "Pareto front: " + "  ".join(f"{n:>14}" for n in names) + \
        f"  {'test_acc':>8}  trial / config"
    lines = [header, "-" * len(header)]
    for row in front:
        cells = []
        for objective in objectives:
            value = objective_value(row, objective, metric=metric)
            cells.append(f"{'-' if value is None else f'{value:.6g}':>14}")
        test = "-" if row.test_accuracy is None else f"{row.test_accuracy:.4f}"
        lines.append(" " * len("Pareto front: ") + "  ".join(cells) +
                     f"  {test:>8}  {row.trial_id} / pareto/{row.trial_id}.yaml")
    if not front:
        lines.append("(no trial completed every epoch)")
    return "\n".join(lines)
