"""Search efficiency: what each method finds per epoch of compute, over seeds, in one run.

    python benchmarks/search_efficiency.py [--seeds 5] [--budget 40] [--epochs N]
        [--space search_spaces/coatnet_small.yaml] [--methods random,random_asha,optuna,ours,
        ours_complete] [--out benchmarks/results/search_efficiency.md]

Every method searches the same space (the shipped default unless ``--space``; the benchmark
sets its epochs per trial, ``--epochs``) with the same budget in epochs per run (``--budget``),
once per seed:

- ``random``: random search, no early stopping (Tune FIFO), ``budget / epochs`` trials.
- ``random_asha``: random search + ASHA (Ray Tune's usual pairing).
- ``optuna``: Optuna alone, in this process: TPE + ``HyperbandPruner``, each objective running
  the same train loop (the peer a user would pick instead of this tool).
- ``ours``: this project as shipped: ``run_search`` with TPE + ASHA and the truthful searcher
  (``StudySearch``: intermediate values, PRUNED for ASHA's cuts).
- ``ours_complete``: the same, with the searcher patched to report as Ray's ``OptunaSearch``
  does (an early-stopped trial told COMPLETE with its last, early value).

The ASHA and Optuna methods get more trials than they can finish and are stopped once the
budget is spent (a Tune ``Stopper``; ``study.stop``). Every epoch of every trial is recorded in
the training process (``efficiency_probes.py``): its validation accuracy (what the search sees)
and the test-split accuracy of that epoch's model (what no trial sees). The anytime curve of a
run: epochs in the order they were reported, best validation accuracy so far, and the test
accuracy of that best epoch. Reported, median over seeds with the min-max spread: epochs until
a run first reaches the median final best of ``random``; best validation and its test accuracy
at 25 %, 50 % and 100 % of the budget. The curves (median, inter-quartile band) go to a PNG
next to the results file.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import efficiency_probes as probes
import harness

REPO = harness.REPO
sys.path.insert(0, str(REPO))

METHODS = ("random", "random_asha", "optuna", "ours", "ours_complete")
FRACTIONS = (0.25, 0.5, 1.0)


# ------------------------------------------------------------------------------- the space
def space_doc(base: dict[str, Any], *, method: str, seed: int, epochs: int, budget: int,
              concurrency: int) -> dict[str, Any]:
    """The base space with the method's searcher, early stopping, seed and trial count."""
    doc = json.loads(json.dumps(base))
    doc.pop("description", None)
    doc["trial"] = {**doc["trial"], "epochs": epochs, "max_failures": 0}
    search = doc["search"]
    search.update(seed=seed, max_concurrent_trials=concurrency)
    search["searcher"] = "random" if method.startswith("random") else "tpe"
    search.pop("enqueue", None)
    asha = dict(search.get("asha") or {})
    asha["grace_period"] = min(int(asha.get("grace_period", 1)), epochs)
    if method == "random":
        search["asha"] = None
        search["num_samples"] = max(1, budget // epochs)
    else:
        search["asha"] = asha
        search["num_samples"] = budget  # more than the budget lets finish: the stopper ends it
    search["n_startup_trials"] = min(int(search.get("n_startup_trials", 5)),
                                     search["num_samples"])
    return doc


def write_space(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------------- Ray methods
class _Budget:
    """A Tune stopper that ends the whole run once ``budget`` epochs were reported."""

    def __init__(self, budget: int) -> None:
        from ray import tune

        class Stopper(tune.Stopper):
            def __init__(self) -> None:
                self.epochs = 0

            def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
                if result.get("status") == "running":
                    self.epochs += 1
                return False

            def stop_all(self) -> bool:
                return self.epochs >= budget

        self.stopper = Stopper()


def _patch_run_config(stopper: Any) -> Any:
    """Make the runner's ``tune.RunConfig`` carry ``stopper``; returns the undo."""
    from ray import tune

    original = tune.RunConfig

    class RunConfig(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stop", stopper)
            super().__init__(*args, **kwargs)

    tune.RunConfig = RunConfig
    return lambda: setattr(tune, "RunConfig", original)


def _patch_complete_reporting() -> Any:
    """Make the runner's searcher tell Optuna what Ray's OptunaSearch tells it: COMPLETE with
    the last value for a trial ASHA cut; returns the undo."""
    import optuna

    import coatnet.search.searcher as searcher_mod

    original = searcher_mod.StudySearch

    class CompleteReporting(original):  # type: ignore[misc, valid-type]
        def _outcome(self, result: Any, *, error: bool) -> Any:
            state, value = super()._outcome(result, error=error)
            if state == optuna.trial.TrialState.PRUNED:
                return optuna.trial.TrialState.COMPLETE, float(result[self.metric])
            return state, value

    searcher_mod.StudySearch = CompleteReporting
    return lambda: setattr(searcher_mod, "StudySearch", original)


def run_ray_method(method: str, space: Path, *, tmp: Path, sink: Path, budget: int) -> None:
    from coatnet.search import trial
    from coatnet.search.errors import SearchInterrupted
    from coatnet.search.runner import SearchOptions, run_search

    # random runs exactly budget / epochs trials; the others are ended by the budget stopper
    undo = [] if method == "random" else [_patch_run_config(_Budget(budget).stopper)]
    if method == "ours_complete":
        undo.append(_patch_complete_reporting())
    original_run_trial = trial.run_trial
    trial.run_trial = probes.recording_run_trial_for(sink=str(sink), method=method)
    try:
        run_search(SearchOptions(space=space, name=space.stem, storage_path=str(tmp / "runs"),
                                 # one store for every run: a new SQLite store costs seconds
                                 mlflow_uri=f"sqlite:///{tmp.parent / 'mlflow.db'}"))
    except SearchInterrupted:
        pass  # the budget stopper ended trials still running: what they reported is recorded
    finally:
        trial.run_trial = original_run_trial
        for step in undo:
            step()


# ------------------------------------------------------------------------------- Optuna alone
def run_optuna(space_path: Path, *, sink: Path, budget: int) -> None:
    """TPE + HyperbandPruner in this process, each objective the same train loop."""
    import dataclasses

    import optuna

    import coatnet.search.train_loop as tl
    from coatnet.search.contracts import REPORT_TO_TUNE, LoopRuntime
    from coatnet.search.plan import SearchOptions, plan_search
    from coatnet.search.trial import build_loop_config

    plan = plan_search(SearchOptions(space=space_path))
    space, settings = plan.space, plan.space.search
    spent = {"epochs": 0}

    class PrunableReporter(harness.in_process_reporter()):  # type: ignore[misc]
        """Reports each epoch to the Optuna trial; raises TrialPruned when Hyperband says so
        or the budget is spent."""

        def __init__(self, trial: optuna.Trial) -> None:
            self.trial = trial
            self.last: dict[str, Any] = {}

        def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
                   epoch: int) -> None:
            self.last = metrics
            if metrics.get("status") != "running":
                return
            spent["epochs"] += 1
            value = metrics.get(settings.metric)
            if isinstance(value, float) and math.isfinite(value):
                self.trial.report(value, epoch)
            if spent["epochs"] >= budget or self.trial.should_prune():
                raise optuna.TrialPruned()

    def objective(trial: optuna.Trial) -> float:
        candidate = space.define_by_run(trial, set_constraints=True)["candidate"]
        if candidate["infeasible_reason"]:
            return 0.0
        loop = build_loop_config({"candidate": candidate, "data": plan.data,
                                  "trial": plan.trial, "seed": settings.seed})
        reporter = PrunableReporter(trial)
        probes.install(sink=str(sink), method="optuna", trial=str(trial.number),
                       data=dict(plan.data), seed=settings.seed,
                       inner_factory=lambda runtime: reporter)
        runtime = LoopRuntime(report_to=REPORT_TO_TUNE, started_at=time.time())
        tl.train_loop_per_worker(dataclasses.replace(loop, runtime=runtime).to_dict())
        value = reporter.last.get(settings.metric)
        if reporter.last.get("status") == "diverged" or not isinstance(value, float) \
                or not math.isfinite(value):
            raise optuna.TrialPruned()  # diverged: no usable value
        return value

    def stop_at_budget(study: optuna.Study, _trial: Any) -> None:
        if spent["epochs"] >= budget:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    original = tl.make_reporter
    try:
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=settings.seed,
                                               n_startup_trials=settings.n_startup_trials),
            pruner=optuna.pruners.HyperbandPruner(min_resource=1,
                                                  max_resource=plan.trial.epochs,
                                                  reduction_factor=2))
        study.optimize(objective, n_trials=budget, callbacks=[stop_at_budget])
    finally:
        tl.make_reporter = getattr(tl.make_reporter, "_original", original)


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
         budget: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(1, budget + 1)
    for method, runs in curves.items():
        values = np.array([[best for best, _ in run] for run in runs if len(run) == budget])
        if not len(values):
            continue
        low, mid, high = np.percentile(values, [25, 50, 75], axis=0)
        ax.plot(x, mid, label=method)
        ax.fill_between(x, low, high, alpha=0.2)
    ax.set_xlabel("epochs spent")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", type=Path,
                        default=REPO / "search_spaces" / "coatnet_small.yaml")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=40, help="epochs per run")
    parser.add_argument("--epochs", type=int, default=None,
                        help="most epochs per trial (default: the space's trial.epochs)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / "search_efficiency.md")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    started, host = harness.now(), harness.host()

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(probes)  # the recorder runs in trial actors
    from coatnet.search import runner

    base = yaml.safe_load(args.space.read_text())
    if args.epochs is None:
        args.epochs = int(base["trial"]["epochs"])
    if args.budget < args.epochs:
        parser.error("--budget must be at least --epochs")
    tmp = Path(tempfile.mkdtemp(prefix="coatnet-efficiency-"))
    rows: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
    walls: dict[str, list[float]] = {m: [] for m in methods}
    try:
        runner._init_ray(None)
        for seed in range(args.seeds):
            for method in harness.rotated(methods, seed):
                run_dir = tmp / f"{method}-{seed}"
                run_dir.mkdir()
                space = write_space(run_dir / f"{method}-{seed}.yaml", space_doc(
                    base, method=method, seed=seed, epochs=args.epochs, budget=args.budget,
                    concurrency=args.concurrency))
                sink = run_dir / "sink.jsonl"
                t0 = time.time()
                if method == "optuna":
                    run_optuna(space, sink=sink, budget=args.budget)
                else:
                    run_ray_method(method, space, tmp=run_dir, sink=sink, budget=args.budget)
                walls[method].append(time.time() - t0)
                rows[method].append(probes.read(str(sink)))
                curve = anytime(rows[method][-1], args.budget)
                print(f"seed {seed} {method}: best val {curve[-1][0] if curve else None} "
                      f"after {args.budget} epochs, {walls[method][-1]:.0f} s", flush=True)
                # what is done so far is on disk: an interrupted benchmark keeps it
                write_results(args, argv=argv, started=started, host=host, methods=methods,
                              curves={m: [anytime(r, args.budget) for r in rows[m]]
                                      for m in methods}, rows=rows, walls=walls)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    curves = {m: [anytime(r, args.budget) for r in rows[m]] for m in methods}
    write_results(args, argv=argv, started=started, host=host, methods=methods,
                  curves=curves, rows=rows, walls=walls)
    return 0


def write_results(args: argparse.Namespace, *, argv: list[str] | None, started: str,
                  host: Any, methods: list[str], curves: dict[str, list[Any]],
                  rows: dict[str, list[list[dict[str, Any]]]],
                  walls: dict[str, list[float]]) -> None:
    budget = args.budget
    finals_random = [c[-1][0] for c in curves.get("random", []) if c]
    target = statistics.median(finals_random) if finals_random else None
    png = args.out.with_suffix(".png")
    results = harness.Results.listed(
        "Search efficiency: best model found per epoch of compute", script=__file__,
        args=argv, date=started, machine=harness.machine(),
        items=[f"host: {host.name}, {host.cores} usable cores, Python {host.python}",
               f"space: `{Path(args.space).resolve().relative_to(REPO)}` with at most "
               f"{args.epochs} epochs per trial; budget {budget} epochs per run; "
               f"{args.seeds} seeds; {args.concurrency} trials at a time (Optuna alone: one)",
               "runs done: " + ", ".join(f"{m} {len(rows[m])}" for m in methods),
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
    results.write(args.out)


if __name__ == "__main__":
    sys.exit(main())
