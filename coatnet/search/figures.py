"""The search's summary figures: four PNGs of its Optuna study, drawn with Matplotlib's Agg.

``write_figures`` draws the trials that are the search's own (``figure_trials``: COMPLETE and
PRUNED, feasible, not orphaned) as ``FIGURE_FILES``: parallel coordinates of the parameters
and the quality ``metric``, fANOVA parameter importances, learning curves and the optimization
history. Only ``Figure`` and ``FigureCanvasAgg`` objects are used, never pyplot, so a process's
backend and figures are left alone. A figure that cannot be drawn is skipped with a reason
(logged and returned): ``write_figures`` never raises for a bad study. The attribute names are
the searcher's (not imported: ``coatnet.search.searcher`` imports Ray; a test compares them).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers._base import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from coatnet.search.space.sampling import scratch_study

__all__ = ["FIGURE_FILES", "PlotTrial", "SearchFigures", "best_so_far", "figure_trials",
           "write_figures"]

logger = logging.getLogger(__name__)

FIGURE_FILES = {"parallel_coordinates": "parallel_coordinates.png",
                "param_importance": "param_importance.png",
                "learning_curves": "learning_curves.png",
                "optimization_history": "optimization_history.png"}
IMPORTANCE_MAX_TRIALS = 200  # the most recent completed trials fANOVA is fitted on (it is slow)
# The searcher's names (coatnet.search.searcher and space.searchspace)
ORPHANED_ATTR = "orphaned"
ORPHANS_ATTR = "orphaned_trials"
INTERMEDIATE_ATTR_PREFIX = "intermediate_"
CONSTRAINT_USER_ATTR = "constraint"

_SIZE, _DPI = (12.0, 7.0), 100  # 1200 x 700 px
_NA = -0.09  # where a trial without a (conditional) parameter crosses that parameter's axis
_MISSING = object()


@dataclass(frozen=True)
class SearchFigures:
    """What ``write_figures`` did: the PNGs written, fANOVA's evaluator, the figures skipped."""

    paths: tuple[Path, ...]
    importance_evaluator: str | None
    skipped: tuple[str, ...]  # "<figure>: <reason>"


@dataclass(frozen=True)
class PlotTrial:
    """One trial as the figures show it; ``value`` is the metric (a pruned trial's last)."""

    number: int
    pruned: bool
    value: float
    curve: tuple[tuple[int, float], ...]  # (epoch, metric) in epoch order
    params: Mapping[str, Any]
    distributions: Mapping[str, BaseDistribution]


# ---------------------------------------------------------------------------- the trials
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _infeasible(trial: FrozenTrial) -> bool:
    """Any constraint value > 0: Optuna's (old list, ``constraints:<name>``) or the space's."""
    attrs = trial.system_attrs
    values = [v for k, v in attrs.items() if k.startswith(f"{_CONSTRAINTS_KEY}:")]
    for listed in (attrs.get(_CONSTRAINTS_KEY), trial.user_attrs.get(CONSTRAINT_USER_ATTR)):
        values.extend(listed if isinstance(listed, (list, tuple)) else ())
    return any(_finite(v) and v > 0 for v in values)


def _curve(trial: FrozenTrial, metric: str) -> tuple[tuple[int, float], ...]:
    """Intermediate values; for several objectives, the ``intermediate_<metric>`` attr."""
    raw: Mapping[Any, Any] = trial.intermediate_values
    if not raw:
        attr = trial.user_attrs.get(f"{INTERMEDIATE_ATTR_PREFIX}{metric}")
        raw = attr if isinstance(attr, Mapping) else {}
    points = {int(k): float(v) for k, v in raw.items()
              if _finite(v) and (isinstance(k, int) or str(k).strip().isdigit())}
    return tuple(sorted(points.items()))


def figure_trials(study: optuna.Study, *, metric: str) -> list[PlotTrial]:
    """The trials the figures show, in number order: COMPLETE ones with a finite quality value
    (``values[0]``) and PRUNED ones with a finite last intermediate value; FAIL, RUNNING,
    WAITING, infeasible and orphaned trials (attr ``orphaned`` or listed in the study's
    ``orphaned_trials``) are left out."""
    orphans = set(study.user_attrs.get(ORPHANS_ATTR) or [])
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    chosen = []
    for trial in study.get_trials(deepcopy=False, states=states):
        if trial.number in orphans or trial.user_attrs.get(ORPHANED_ATTR) or _infeasible(trial):
            continue
        curve = _curve(trial, metric)
        pruned = trial.state == TrialState.PRUNED
        value = (curve[-1][1] if curve else None) if pruned else \
            (trial.values[0] if trial.values else None)
        if not _finite(value):
            continue
        chosen.append(PlotTrial(number=trial.number, pruned=pruned, value=float(value),
                                curve=curve, params=dict(trial.params),
                                distributions=dict(trial.distributions)))
    return sorted(chosen, key=lambda t: t.number)


def best_so_far(values: Sequence[float], *, mode: str) -> list[float]:
    """The running best of ``values`` (the highest for ``mode="max"``, the lowest for min)."""
    return list(itertools.accumulate(values, max if mode == "max" else min))


# ---------------------------------------------------------------------------- entry point
def write_figures(study: optuna.Study, directory: Path, *, metric: str, mode: str,
                  top_k: int = 5) -> SearchFigures:
    """Write the four figures of ``FIGURE_FILES`` into ``directory`` (created; files are
    replaced, and a skipped figure's older file removed). ``mode`` is the metric's ("max" or
    "min"). Raises only ``ValueError`` for a bad ``mode``, never for a bad study."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    directory, paths, skipped = Path(directory), list[Path](), list[str]()
    evaluator: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        trials: list[PlotTrial] | str = figure_trials(study, metric=metric)
    except Exception as err:  # noqa: BLE001 - figures must never stop the search
        trials = f"could not read the study: {type(err).__name__}: {err}"
        logger.warning("no figures of study %r: %s", getattr(study, "study_name", "?"), trials)
    drawers = {"parallel_coordinates": _parallel, "param_importance": _importance,
               "learning_curves": _curves, "optimization_history": _history}
    for name, draw in drawers.items():
        path = directory / FIGURE_FILES[name]
        try:
            if isinstance(trials, str):
                raise _Skip(trials)
            fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
            FigureCanvasAgg(fig)
            draw(fig, trials, metric=metric, mode=mode, top_k=top_k)
            fig.savefig(tmp := path.with_name(f".{path.name}.tmp"), format="png", dpi=_DPI)
            os.replace(tmp, path)  # never a half-written PNG
        except _Skip as why:
            reason = str(why)
            logger.info("figure %s skipped: %s", name, reason)
        except Exception as err:  # one figure must not stop the others (logged with the trace)
            reason = f"{type(err).__name__}: {err}"
            logger.warning("figure %s failed: %s", name, reason, exc_info=True)
        else:
            paths.append(path)
            if name == "param_importance":
                evaluator = optuna.importance.FanovaImportanceEvaluator.__name__
            continue
        skipped.append(f"{name}: {reason}")
        with contextlib.suppress(OSError):  # an older figure of a resumed search would mislead
            path.unlink(missing_ok=True)
    return SearchFigures(paths=tuple(paths), importance_evaluator=evaluator,
                         skipped=tuple(skipped))


class _Skip(Exception):
    """A figure that cannot be drawn from these trials; the message says why."""


def _style(n: int) -> tuple[float, float]:
    """Line alpha and width for ``n`` lines: bold for a few, faint and thin for hundreds."""
    return min(0.9, max(0.12, 4.0 / math.sqrt(max(n, 1)))), \
        min(2.0, max(0.4, 9.0 / math.sqrt(max(n, 1))))


# ---------------------------------------------------------------------------- parallel coords
@dataclass(frozen=True)
class _Axis:
    label: str
    positions: tuple[float | None, ...]  # 0..1 per trial; None: the trial lacks the param
    ticks: tuple[tuple[float, str], ...]


def _thin(ticks: Sequence[tuple[float, str]], gap: float = 0.045) -> tuple[tuple[float, str], ...]:
    """Drop tick labels closer than ``gap`` to the one below (no overlapping labels)."""
    kept: list[tuple[float, str]] = []
    for pos, label in sorted(ticks):
        if not kept or pos - kept[-1][0] >= gap:
            kept.append((pos, label))
    return tuple(kept)


def _key(value: Any) -> tuple[str, str]:
    """A hashable key that tells 1, 1.0 and True apart."""
    return type(value).__name__, repr(value)


def _union(groups: Sequence[Sequence[Any]]) -> list[Any]:
    return list({_key(v): v for group in groups for v in group}.values())


def _categorical_axis(name: str, values: Sequence[Any],
                      dists: Sequence[BaseDistribution]) -> _Axis:
    choices = _union([*(d.choices for d in dists if isinstance(d, CategoricalDistribution)),
                      [v for v in values if v is not _MISSING]])
    if all(_finite(c) for c in choices):
        choices.sort()
    last = max(len(choices) - 1, 1)
    where = {_key(c): (i / last if len(choices) > 1 else 0.5) for i, c in enumerate(choices)}
    ticks = [(where[_key(c)], str(c)[:18]) for c in choices]
    return _Axis(name, tuple(None if v is _MISSING else where[_key(v)] for v in values),
                 _thin(ticks))


def _numeric_axis(name: str, values: Sequence[Any], *, log: bool) -> _Axis:
    present = [float(v) for v in values if v is not _MISSING]
    log = log and all(v > 0 for v in present)
    fwd: Callable[[float], float] = math.log10 if log else float
    lo, hi = min(map(fwd, present)), max(map(fwd, present))
    span = hi - lo

    def norm(x: float) -> float:
        return (fwd(x) - lo) / span if span > 0 else 0.5

    real = [10 ** (lo + f * span) if log else lo + f * span for f in (0, 0.25, 0.5, 0.75, 1)]
    if all(v.is_integer() for v in present):  # a depth, a width: its values or rounded ticks
        picks = set(present) if len(set(present)) <= 8 else {float(round(v)) for v in real}
        ticks = [(norm(v), f"{v:.0f}") for v in picks]
    else:  # a constant axis gets one tick (the others are thinned away)
        ticks = [(norm(v), f"{v:.3g}") for v in real]
    label = f"{name} (log)" if log else name
    return _Axis(label, tuple(None if v is _MISSING else norm(float(v)) for v in values),
                 _thin(ticks))


def _param_axis(name: str, trials: Sequence[PlotTrial]) -> _Axis:
    values = [t.params.get(name, _MISSING) for t in trials]
    dists = [t.distributions[name] for t in trials if name in t.distributions]
    numeric = all(isinstance(d, (FloatDistribution, IntDistribution)) for d in dists) and \
        all(v is _MISSING or _finite(v) for v in values)
    if not numeric:
        return _categorical_axis(name, values, dists)
    return _numeric_axis(name, values, log=all(getattr(d, "log", False) for d in dists))


def _parallel(fig: Figure, trials: Sequence[PlotTrial], *, metric: str, mode: str,
              top_k: int) -> None:
    if not trials:
        raise _Skip("no completed or early-stopped feasible trial")
    names = sorted({name for t in trials for name in t.params})
    if not names:
        raise _Skip("the trials have no sampled parameters")
    order = sorted(trials, key=lambda t: t.value, reverse=mode == "min")  # best drawn last
    axes = [_param_axis(name, order) for name in names]
    axes.append(_numeric_axis(metric, [t.value for t in order], log=False))
    missing = any(p is None for a in axes for p in a.positions)
    values = np.array([t.value for t in order])
    cnorm = Normalize(values.min(), max(values.max(), values.min() + 1e-12))
    cmap = colormaps["viridis" if mode == "max" else "viridis_r"]
    alpha, width = _style(len(order))
    ax = fig.add_subplot()
    for pruned, style, a in ((True, (0, (4, 3)), alpha * 0.5), (False, "solid", alpha)):
        rows = [i for i, t in enumerate(order) if t.pruned == pruned]
        if rows:
            segments = [[(j, _NA if axis.positions[i] is None else axis.positions[i])
                         for j, axis in enumerate(axes)] for i in rows]
            ax.add_collection(LineCollection(segments, colors=cmap(cnorm(values[rows])),
                                             linewidths=width, linestyles=style, alpha=a))
    ax.vlines(range(len(axes)), 0.0, 1.0, colors="0.25", linewidth=1.0, zorder=3)
    size = 7 if len(axes) > 12 else 8
    for j, axis in enumerate(axes):
        ticks = axis.ticks + (((_NA, "n/a"),) if any(p is None for p in axis.positions) else ())
        for pos, label in ticks:
            ax.plot([j - 0.04, j], [pos, pos], color="0.25", linewidth=0.8, zorder=3)
            ax.text(j + 0.03, pos, label, fontsize=size, va="center", ha="left", zorder=4,
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                          "alpha": 0.75})
    ax.set_xlim(-0.2, len(axes) - 0.45)
    ax.set_ylim(_NA - 0.05 if missing else -0.04, 1.04)
    ax.set_yticks([])
    ax.set_xticks(range(len(axes)), [a.label for a in axes], rotation=35, ha="right",
                  rotation_mode="anchor", fontsize=size + 1)
    ax.spines[:].set_visible(False)
    fig.colorbar(ScalarMappable(norm=cnorm, cmap=cmap), ax=ax, label=metric, pad=0.01)
    n_pruned = sum(t.pruned for t in order)
    handles = [Line2D([], [], color="0.3", label=f"completed ({len(order) - n_pruned})"),
               Line2D([], [], color="0.3", linestyle=(0, (4, 3)), alpha=0.6,
                      label=f"early-stopped ({n_pruned}, last value)")]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2,
              frameon=False, fontsize=9)
    fig.suptitle(f"Parallel coordinates of {metric} ({mode}) over {len(names)} parameters: "
                 f"{len(order) - n_pruned} completed, {n_pruned} early-stopped trials")


# ---------------------------------------------------------------------------- importance
def _merged(dists: Sequence[BaseDistribution]) -> BaseDistribution | None:
    """One distribution holding every trial's (channels are narrowed per trial)."""
    if all(isinstance(d, CategoricalDistribution) for d in dists):
        return CategoricalDistribution(_union([d.choices for d in dists]))
    if not all(isinstance(d, (IntDistribution, FloatDistribution)) for d in dists):
        return None
    kind = IntDistribution if all(isinstance(d, IntDistribution) for d in dists) else \
        FloatDistribution
    return kind(min(d.low for d in dists), max(d.high for d in dists),  # type: ignore[union-attr]
                log=all(getattr(d, "log", False) for d in dists))


def _importance(fig: Figure, trials: Sequence[PlotTrial], *, metric: str,
                mode: str, top_k: int) -> None:
    done = [t for t in trials if not t.pruned]
    used = done[-IMPORTANCE_MAX_TRIALS:]
    if len(used) < 2:
        raise _Skip(f"fewer than 2 completed trials ({len(used)})")
    names = sorted(set.intersection(*(set(t.params) for t in used)))
    merged = {n: d for n in names
              if (d := _merged([t.distributions[n] for t in used])) is not None}
    varying = [n for n in merged if len({repr(t.params[n]) for t in used}) > 1]
    if not varying:
        raise _Skip(f"no parameter varies across the {len(used)} completed trials")
    if len({t.value for t in used}) < 2:
        raise _Skip(f"all {len(used)} completed trials have the same {metric}")
    study = scratch_study(direction="maximize" if mode == "max" else "minimize")
    study.add_trials([optuna.trial.create_trial(
        value=t.value, params={n: t.params[n] for n in merged}, distributions=merged)
        for t in used])
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                    params=list(merged))
    items = sorted(((float(v), n) for n, v in found.items()), reverse=False)
    if not items or not all(math.isfinite(v) for v, _ in items):
        raise _Skip("fANOVA gave no finite importances")
    ax = fig.add_subplot()
    ax.barh(range(len(items)), [v for v, _ in items], color="tab:blue")
    ax.set_yticks(range(len(items)), [n for _, n in items],
                  fontsize=9 if len(items) <= 25 else 7)
    for i, (v, _) in enumerate(items):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0.0, max(v for v, _ in items) * 1.15 or 1.0)
    ax.set_xlabel(f"importance for {metric} (normalised to sum 1)")
    ax.grid(axis="x", alpha=0.3)
    of = f"the {len(used)} most recent of {len(done)}" if len(used) < len(done) else len(used)
    fig.suptitle(f"Parameter importance for {metric} ({type(evaluator).__name__}, seed 0): "
                 f"{of} completed trials")
    left_out = sorted(set().union(*(t.params for t in used)) - set(merged))
    if left_out:
        shown = ", ".join(left_out[:6]) + (" ..." if len(left_out) > 6 else "")
        ax.set_title(f"left out (not in every trial, or of mixed kinds): {shown}", fontsize=9)


# ---------------------------------------------------------------------------- curves, history
def _curves(fig: Figure, trials: Sequence[PlotTrial], *, metric: str, mode: str,
            top_k: int) -> None:
    with_curve = [t for t in trials if t.curve]
    if not with_curve:
        raise _Skip(f"no trial has per-epoch values of {metric}")
    done = sorted((t for t in with_curve if not t.pruned), key=lambda t: t.value,
                  reverse=mode == "max")
    top, rest = done[:max(top_k, 0)], done[max(top_k, 0):]
    pruned = [t for t in with_curve if t.pruned]
    ax = fig.add_subplot()
    alpha, width = _style(len(rest) + len(pruned))
    handles = []
    for group, color, label in ((pruned, "0.5", "early-stopped"),
                                (rest, "tab:blue", "other completed")):
        for t in group:
            ax.plot(*zip(*t.curve), color=color, alpha=alpha * 0.6, linewidth=width * 0.6)
        if group:
            handles.append(Line2D([], [], color=color, alpha=0.6,
                                  label=f"{label} ({len(group)})"))
    for i, t in enumerate(top):
        handles += ax.plot(*zip(*t.curve), color=colormaps["tab10"](i % 10), linewidth=2.2,
                           marker="o", markersize=3, label=f"trial {t.number}: {t.value:.3g}",
                           zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.suptitle(f"Learning curves of {metric}: top {len(top)} of {len(done)} completed, "
                 f"{len(pruned)} early-stopped trials")


def _history(fig: Figure, trials: Sequence[PlotTrial], *, metric: str,
             mode: str, top_k: int) -> None:
    if not trials:
        raise _Skip("no completed or early-stopped feasible trial")
    done = [t for t in trials if not t.pruned]
    pruned = [t for t in trials if t.pruned]
    size = min(36.0, max(6.0, 600.0 / math.sqrt(len(trials)) / 3))
    ax = fig.add_subplot()
    if pruned:
        ax.scatter([t.number for t in pruned], [t.value for t in pruned], s=size,
                   facecolors="none", edgecolors="0.5", linewidths=0.8,
                   label=f"early-stopped ({len(pruned)}, last value)")
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], s=size,
                   color="tab:blue", alpha=_style(len(done))[0] ** 0.5,
                   label=f"completed ({len(done)})", zorder=3)
        best = best_so_far([t.value for t in done], mode=mode)
        last = max(t.number for t in trials)
        ax.step([t.number for t in done] + [last], best + [best[-1]], where="post",
                color="tab:red", linewidth=1.8, label=f"best so far ({mode})", zorder=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.suptitle(f"Optimization history of {metric} ({mode}): {len(done)} completed, "
                 f"{len(pruned)} early-stopped trials")
