"""The analysis and results files of ``search_efficiency.py``: anytime curves (best validation
accuracy, or the hypervolume of the completed trials, per epoch spent), their spread over seeds,
the PNG and the markdown results (``harness.Results``).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import efficiency_probes as probes
import harness

SCRIPT = str(Path(__file__).with_name("search_efficiency.py"))
FRACTIONS = (0.25, 0.5, 1.0)
QUALITY = "val_accuracy"  # the probes record it and the test accuracy of every epoch

# ------------------------------------------------------------------------------- analysis
def anytime(rows: list[dict[str, Any]], budget: int) -> list[tuple[float, float | None]]:
    """Per epoch spent (1..budget): (best validation accuracy so far, its test accuracy)."""
    curve: list[tuple[float, float | None]] = []
    best, best_test = -1.0, None
    for row in rows:
        if row["status"] != "running" or row.get("resumed"):
            continue
        value = row["val_accuracy"]
        if isinstance(value, (int, float)) and math.isfinite(value) and value > best:
            best, best_test = float(value), row["test_accuracy"]
        curve.append((max(best, 0.0), best_test))
        if len(curve) == budget:
            break
    while curve and len(curve) < budget:  # a run that ended early keeps its best
        curve.append(curve[-1])
    return curve


def epochs_to_reach(curve: list[tuple[float, float | None]], target: float) -> int | None:
    return next((i + 1 for i, (best, _) in enumerate(curve) if best >= target - 1e-12), None)


def spread(values: Sequence[float | None], digits: int = 4) -> str:
    """``median [min, max]`` of the values present (and how many are missing)."""
    have = [v for v in values if v is not None]
    if not have:
        return "-"
    text = f"{statistics.median(have):.{digits}f} [{min(have):.{digits}f}, " \
           f"{max(have):.{digits}f}]"
    return text if len(have) == len(values) else f"{text} ({len(values) - len(have)} none)"


def completed_spread(rows: list[dict[str, Any]], epochs: int) -> float | None:
    """Best minus median final validation accuracy of the run's trials that ran all epochs."""
    finals = [r["val_accuracy"] for r in rows
              if r["status"] == "running" and r["epoch"] == epochs and not r.get("resumed")]
    return max(finals) - statistics.median(finals) if len(finals) >= 2 else None


def plot(curves: dict[str, list[list[tuple[float, float | None]]]], path: Path, *,
         budget: int, title: str, ylabel: str = "best validation accuracy so far") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # left: the whole budget; right: from 20 % of it on, where the methods part
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = np.arange(1, budget + 1)
    start = max(0, int(0.2 * budget) - 1)
    lows, highs = [], []
    for method, runs in curves.items():
        values = np.array([[best for best, _ in run] for run in runs if len(run) == budget])
        if not len(values):
            continue
        low, mid, high = np.percentile(values, [25, 50, 75], axis=0)
        for axis in (ax, zoom):
            line, = axis.plot(x, mid, label=method)
            axis.fill_between(x, low, high, alpha=0.2, color=line.get_color())
        lows.append(low[start:].min())
        highs.append(high[start:].max())
    if lows:
        pad = 0.05 * (max(highs) - min(lows) or 1.0)
        zoom.set_xlim(start + 1, budget)
        zoom.set_ylim(min(lows) - pad, max(highs) + pad)
    for axis in (ax, zoom):
        axis.set_xlabel("epochs spent")
        axis.grid(alpha=0.3)
    ax.set_ylabel(ylabel)
    zoom.set_title(f"from {start + 1} epochs on", fontsize=10)
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- accuracy vs cost
def parse_objectives(text: str) -> list[tuple[str, str]]:
    """``"val_accuracy,macs"`` -> ``[("val_accuracy", "max"), ("macs", "min")]``: the quality
    metric first, then distinct costs."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    costs = names[1:]
    if names[:1] != [QUALITY] or not costs or len(set(costs)) != len(costs) \
            or not set(costs) <= set(probes.COST_METRICS):
        raise ValueError(f"{text!r}: {QUALITY} first, then one or more distinct costs of "
                         f"{list(probes.COST_METRICS)}")
    return [(QUALITY, "max"), *((cost, "min") for cost in costs)]


def reference_point(runs: Iterable[list[dict[str, Any]]],
                    costs: Sequence[str]) -> tuple[float, ...]:
    """One reference for every method and seed: accuracy 0, each cost 1.1 x the largest value
    any recorded trial had (1.0 when none did)."""
    runs = list(runs)
    reference = [0.0]
    for cost in costs:
        values = [float(v) for rows in runs for row in rows
                  if isinstance(v := row.get(cost), (int, float)) and math.isfinite(v)]
        reference.append(1.1 * max(values) if values else 1.0)
    return tuple(reference)


def completed_points(rows: list[dict[str, Any]], budget: int, *, epochs: int,
                     costs: Sequence[str]) -> list[tuple[int, tuple[Any, ...], tuple[Any, ...]]]:
    """The trials that ran all ``epochs`` within ``budget`` epochs spent, in the order they
    completed: (epochs spent then, (best validation accuracy, *costs), (the test accuracy of
    that best epoch, *costs))."""
    best: dict[str, tuple[float, float | None]] = {}
    done = []
    spent = 0
    for row in rows:
        if row["status"] != "running" or row.get("resumed"):
            continue
        spent += 1
        if spent > budget:
            break
        trial, value = row["trial"], row["val_accuracy"]
        if isinstance(value, (int, float)) and math.isfinite(value) \
                and value > best.get(trial, (-math.inf, None))[0]:
            best[trial] = (float(value), row["test_accuracy"])
        if row["epoch"] == epochs and trial in best:
            cost = tuple(row.get(c) for c in costs)
            val, test = best[trial]
            done.append((spent, (val, *cost), (test, *cost)))
    return done


def hypervolume_anytime(rows: list[dict[str, Any]], budget: int, *, epochs: int,
                        costs: Sequence[str], reference: Sequence[float]
                        ) -> list[tuple[float, float]]:
    """Per epoch spent (1..budget): the hypervolume of the completed trials' validation points
    so far and that of their test points, each as a fraction of the box between ``reference``
    and (accuracy 1, costs 0)."""
    from coatnet.search.pareto import hypervolume, pareto_front

    modes = ["max", *["min"] * len(costs)]
    box = (1.0 - reference[0]) * math.prod(reference[1:])
    done = completed_points(rows, budget, epochs=epochs, costs=costs)
    spent = min(budget, sum(1 for r in rows if r["status"] == "running" and not r.get("resumed")))
    fronts: tuple[list[Any], list[Any]] = ([], [])
    volumes = (0.0, 0.0)
    curve: list[tuple[float, float]] = []
    k = 0
    for epoch in range(1, spent + 1):
        if k < len(done) and done[k][0] == epoch:  # at most one trial completes per epoch
            for front, point in zip(fronts, done[k][1:]):
                points = [*front, point]
                front[:] = [points[i] for i in pareto_front(points, modes)]
            volumes = tuple(hypervolume(front, modes, reference) / box  # type: ignore[assignment]
                            for front in fronts)
            k += 1
        curve.append(volumes)
    while curve and len(curve) < budget:  # a run that ended early keeps its front
        curve.append(curve[-1])
    return curve


def front_size(rows: list[dict[str, Any]], budget: int, *, epochs: int,
               costs: Sequence[str]) -> tuple[int, int]:
    """(completed trials, how many of them are on the validation front) after ``budget``."""
    from coatnet.search.pareto import pareto_front

    points = [val for _, val, _ in completed_points(rows, budget, epochs=epochs, costs=costs)]
    return len(points), len(pareto_front(points, ["max", *["min"] * len(costs)]))


def _all_runs(rows: dict[str, list[list[dict[str, Any]]]]) -> list[list[dict[str, Any]]]:
    return [run for runs in rows.values() for run in runs]


def kept_reading(out: Path) -> list[str]:
    """The hand-written ``## Reading`` section of the results file being replaced (from its
    heading to the end), so that rebuilding a report keeps it; check it against the new table."""
    if not out.exists():
        return []
    lines = out.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Reading")), None)
    return [] if start is None else ["", *lines[start:]]


def write_results(args: argparse.Namespace, *, argv: list[str] | None, started: str,
                  host: Any, methods: list[str], curves: dict[str, list[Any]],
                  rows: dict[str, list[list[dict[str, Any]]]],
                  walls: dict[str, list[float]]) -> None:
    budget = args.budget
    finals_random = [c[-1][0] for c in curves.get("random", []) if c]
    target = statistics.median(finals_random) if finals_random else None
    png = args.out.with_suffix(".png")
    results = harness.Results.listed(
        "Search efficiency: best model found per epoch of compute", script=SCRIPT,
        args=argv, date=started, machine=harness.machine(),
        items=[f"host: {host.name}, {host.cores} usable cores, Python {host.python}",
               f"space: `{harness.shown_path(args.space)}` with at most "
               f"{args.epochs} epochs per trial; budget {budget} epochs per run; "
               f"{args.seeds} seeds; {args.concurrency} trials at a time (Optuna alone: one)",
               "runs done: " + ", ".join(f"{m} {len(rows[m])}" for m in methods),
               *([args.runs_note] if getattr(args, "runs_note", None) else []),
               f"versions: {harness.versions('ray', 'optuna', 'torch')}",
               f"anytime curves: `{png.name}`"])
    results.add("Median over seeds, [min, max] across them. *Reach*: epochs until the best "
                "validation accuracy first reaches the median final best of `random` "
                + (f"({target:.4f})" if target is not None else "(no `random` run)")
                + "; *val* / *test*: the best validation accuracy so far and the held-out test "
                "accuracy of that same epoch's model.", "")
    results.table("method", "reach (epochs)",
                  *[f"val @ {int(f * 100)}%" for f in FRACTIONS],
                  *[f"test @ {int(f * 100)}%" for f in FRACTIONS], "wall s / run")
    for method in methods:
        runs = [c for c in curves[method] if c]
        reach = [epochs_to_reach(c, target) for c in runs] if target is not None else []
        at = [[c[max(0, math.ceil(f * budget) - 1)] for c in runs] for f in FRACTIONS]
        results.row(method, spread([float(r) if r is not None else None for r in reach], 0)
                    if reach else "-",
                    *[spread([p[0] for p in points]) for points in at],
                    *[spread([p[1] for p in points]) for points in at],
                    spread(walls[method], 0))
    spreads = [completed_spread(r, args.epochs) for r in rows.get("random", [])]
    if any(s is not None for s in spreads):
        results.add("", "Spread of `random`'s trials that ran all epochs (best minus median "
                    f"final validation accuracy, per seed): {spread(spreads)}")
    plot(curves, png, budget=budget, title=f"{args.space.name}: best so far, median and IQR "
         f"over {args.seeds} seeds")
    results.add(*kept_reading(args.out))
    results.write(args.out)


def write_pareto_results(args: argparse.Namespace, *, argv: list[str] | None, started: str,
                         host: Any, methods: list[str], objectives: list[tuple[str, str]],
                         rows: dict[str, list[list[dict[str, Any]]]],
                         walls: dict[str, list[float]]) -> None:
    """The multi-objective results file and its PNG, from every run recorded so far (the
    reference point too, so every method and seed share it)."""
    budget, costs = args.budget, [m for m, _ in objectives[1:]]
    reference = reference_point(_all_runs(rows), costs)
    curves = {m: [hypervolume_anytime(r, budget, epochs=args.epochs, costs=costs,
                                      reference=reference) for r in rows[m]] for m in methods}
    finals_random = [c[-1][0] for c in curves.get("random", []) if c]
    target = statistics.median(finals_random) if finals_random else None
    png = args.out.with_suffix(".png")
    box = " x ".join(f"[0, {r:.4g}]" for r in reference[1:])
    results = harness.Results.listed(
        "Search efficiency, accuracy versus cost: hypervolume per epoch of compute",
        script=SCRIPT, args=argv, date=started, machine=harness.machine(),
        items=[f"host: {host.name}, {host.cores} usable cores, Python {host.python}",
               f"space: `{harness.shown_path(args.space)}` with at most "
               f"{args.epochs} epochs per trial; budget {budget} epochs per run; "
               f"{args.seeds} seeds; {args.concurrency} trials at a time",
               "objectives: " + ", ".join(f"{m} ({mode})" for m, mode in objectives),
               "reference point: " + ", ".join(f"{m} {r:.6g}" for (m, _), r in
                                               zip(objectives, reference))
               + f" (accuracy 0; each cost 1.1 x the largest value any trained candidate had "
                 f"in this benchmark's runs so far), one for every method and seed; "
                 f"hypervolume as a fraction of the box [0, 1] x {box}",
               "runs done: " + ", ".join(f"{m} {len(rows[m])}" for m in methods),
               *([args.runs_note] if getattr(args, "runs_note", None) else []),
               f"versions: {harness.versions('ray', 'optuna', 'torch')}",
               f"hypervolume curves: `{png.name}`"])
    results.add("Median over seeds, [min, max] across them. A trial counts once it has run "
                "all its epochs, at (its best validation accuracy, its costs); *HV*: the "
                "hypervolume of those so far; *test HV*: the same with each one's test "
                "accuracy of its best-validation epoch; *reach*: epochs until the HV first "
                "reaches the median final HV of `random` "
                + (f"({target:.4f})" if target is not None else "(no `random` run)")
                + "; *completed* / *front*: trials that ran all epochs, and how many of them "
                "are on the validation front, at 100 %.", "")
    results.table("method", *[f"HV @ {int(f * 100)}%" for f in FRACTIONS], "test HV @ 100%",
                  "reach (epochs)", "completed", "front", "wall s / run")
    for method in methods:
        runs = [c for c in curves[method] if c]
        reach = [epochs_to_reach(c, target) for c in runs] if target is not None else []
        at = [[c[max(0, math.ceil(f * budget) - 1)] for c in runs] for f in FRACTIONS]
        sizes = [front_size(r, budget, epochs=args.epochs, costs=costs) for r in rows[method]
                 if r]
        results.row(method, *[spread([p[0] for p in points]) for points in at],
                    spread([p[1] for p in at[-1]]),
                    spread([float(r) if r is not None else None for r in reach], 0)
                    if reach else "-",
                    spread([float(n) for n, _ in sizes], 0),
                    spread([float(k) for _, k in sizes], 0), spread(walls[method], 0))
    ours = [c[max(0, math.ceil(0.5 * budget) - 1)][0] for c in curves.get("ours", []) if c]
    if target is not None and ours:
        met = statistics.median(ours) >= target - 1e-12
        results.add("", f"Target, `ours` at 50 % of the budget reaches `random`'s median "
                    f"hypervolume at 100 %: **{'met' if met else 'not met'}** (median "
                    f"{statistics.median(ours):.4f} against {target:.4f}).")
    plot(curves, png, budget=budget, ylabel="hypervolume so far (fraction of the box)",
         title=f"{args.space.name}, {' vs '.join(m for m, _ in objectives)}: median and "
               f"IQR over {args.seeds} seeds")
    results.add(*kept_reading(args.out))
    results.write(args.out)
