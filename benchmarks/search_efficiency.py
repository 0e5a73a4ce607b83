"""Search efficiency: what each method finds per epoch of compute, over seeds, in one run.

    python benchmarks/search_efficiency.py [--seeds 5] [--budget 40] [--epochs N]
        [--space search_spaces/coatnet_small.yaml] [--methods random,random_asha,optuna,ours,
        ours_complete] [--objectives val_accuracy,macs] [--out benchmarks/results/FILE.md]
        [--runs FILE.runs.jsonl.gz]

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

Accuracy versus cost, ``--objectives val_accuracy,macs`` (the quality metric first, maximised,
then one or more of ``params``, ``macs``, ``latency_ms``, minimised); the space gets them as
``search.objectives``, the methods default to ``random,nsga2,ours`` and the results go to
``benchmarks/results/search_efficiency_pareto.md`` (+ ``.png``):

- ``random`` / ``random_asha``: as above, with the objectives (ASHA: the runner's Pareto-aware
  ``ParetoASHA``).
- ``nsga2``: Optuna's NSGA-II (``searcher: nsga2``), no early stopping, ``budget / epochs``
  trials.
- ``ours``: TPE, its startup trials spread over the cost (``search.start: cost_spread``, the
  shipped default), + the runner's ``ParetoASHA``, ended by the budget stopper.

A trial's point is its best validation accuracy over its epochs and its costs; it counts once
it has run every epoch (as ``coatnet.search.front.front_of``: early-stopped trials are never on
the front). The anytime curve of a run: epochs in report order, the hypervolume of the points
completed so far, against one reference point for every method and seed (accuracy 0, each cost
1.1 x the largest value any trained candidate of the benchmark had), shown as a fraction of the
box between the reference and (accuracy 1, cost 0); the test hypervolume takes each completed
trial's test accuracy of its best-validation epoch instead. Reported, median over seeds with
the min-max spread: hypervolume at 25 %, 50 % and 100 % of the budget, test hypervolume at
100 %, epochs until a run first reaches the median final hypervolume of ``random``, and whether
``ours`` at 50 % reaches it (the issue's target).

Every finished run goes at once into the runs file next to the results (``X.runs.jsonl.gz``,
``efficiency_runs.py``); a later call with the same space file, budget, epochs, concurrency and
objectives reuses the runs in it and runs only the missing (method, seed) pairs, so a long
benchmark can be done over several sittings, or its report rebuilt without training. Delete the
file to measure everything anew.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import efficiency_probes as probes
import harness
from efficiency_runs import RunKey, RunsFile, runs_path
from efficiency_report import (anytime, hypervolume_anytime, parse_objectives,
                               reference_point, write_pareto_results, write_results, _all_runs)

REPO = harness.REPO
sys.path.insert(0, str(REPO))

METHODS = ("random", "random_asha", "optuna", "ours", "ours_complete")
PARETO_METHODS = ("random", "random_asha", "nsga2", "ours")  # with --objectives
PARETO_DEFAULT = ("random", "nsga2", "ours")
NO_EARLY_STOPPING = ("random", "nsga2")  # budget / epochs trials, each run to the end


# ------------------------------------------------------------------------------- the space
def space_doc(base: dict[str, Any], *, method: str, seed: int, epochs: int, budget: int,
              concurrency: int, objectives: Sequence[tuple[str, str]] = ()
              ) -> dict[str, Any]:
    """The base space with the method's searcher, early stopping, seed and trial count, and
    ``search.objectives`` from ``objectives`` (``(metric, mode)`` pairs; none: the base's
    first objective alone, so single-objective runs stay single-objective)."""
    doc = json.loads(json.dumps(base))
    doc.pop("description", None)
    doc["trial"] = {**doc["trial"], "epochs": epochs, "max_failures": 0}
    search = doc["search"]
    search.update(seed=seed, max_concurrent_trials=concurrency)
    search["searcher"] = ("random" if method.startswith("random")
                          else "nsga2" if method == "nsga2" else "tpe")
    if objectives:
        search["objectives"] = [{"metric": m, "mode": mode} for m, mode in objectives]
        search["metric"], search["mode"] = objectives[0]
    elif search.get("objectives"):  # single-objective: the base space's quality metric alone
        first = search.pop("objectives")[0]
        search["metric"], search["mode"] = first["metric"], first["mode"]
    search.pop("enqueue", None)
    asha = dict(search.get("asha") or {})
    asha["grace_period"] = min(int(asha.get("grace_period", 1)), epochs)
    if method in NO_EARLY_STOPPING:
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

    # random and nsga2 run exactly budget / epochs trials; the others are ended by the budget
    # stopper
    stopper = None if method in NO_EARLY_STOPPING else _Budget(budget).stopper
    undo = [] if stopper is None else [_patch_run_config(stopper)]
    if method == "ours_complete":
        undo.append(_patch_complete_reporting())
    original_run_trial = trial.run_trial
    trial.run_trial = probes.recording_run_trial_for(sink=str(sink), method=method)
    try:
        run_search(SearchOptions(space=space, name=space.stem, storage_path=str(tmp / "runs"),
                                 # one store for every run: a new SQLite store costs seconds
                                 mlflow_uri=f"sqlite:///{tmp.parent / 'mlflow.db'}"))
    except SearchInterrupted:
        if stopper is None or stopper.epochs < budget:  # Ctrl-C: this run is not finished
            raise KeyboardInterrupt from None
        # else the budget stopper ended trials still running: what they reported is recorded
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
    parser.add_argument("--objectives", default=None,
                        help="accuracy versus cost, e.g. val_accuracy,macs (default: "
                             "val_accuracy alone)")
    parser.add_argument("--methods", default=None,
                        help=f"default: {','.join(METHODS)}; with --objectives "
                             f"{','.join(PARETO_DEFAULT)} (of {','.join(PARETO_METHODS)})")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/search_efficiency.md, with "
                             "--objectives search_efficiency_pareto.md")
    parser.add_argument("--runs", type=Path, default=None,
                        help="every finished run, reused by a later call with the same "
                             "settings (default: next to --out, X.runs.jsonl.gz; delete it "
                             "to measure anew)")
    args = parser.parse_args(argv)
    objectives: list[tuple[str, str]] = []
    if args.objectives is not None:
        try:
            objectives = parse_objectives(args.objectives)
        except ValueError as err:
            parser.error(f"--objectives: {err}")
    allowed = PARETO_METHODS if objectives else METHODS
    methods = [m for m in (args.methods or ",".join(PARETO_DEFAULT if objectives else METHODS))
               .split(",") if m]
    unknown = sorted(set(methods) - set(allowed))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(allowed)}")
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / (
            "search_efficiency_pareto.md" if objectives else "search_efficiency.md")
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
    runs = RunsFile(args.runs or runs_path(args.out), key=RunKey.of(
        space=args.space, budget=args.budget, epochs=args.epochs,
        concurrency=args.concurrency, objectives=objectives))
    done = runs.done()
    args.runs_note = (f"runs file: `{runs.path.name}` (every run's per-epoch rows; "
                      f"{len(done)} of them reused from an earlier call)")
    if done:
        print(f"reusing {len(done)} finished run(s) from {runs.path} (delete it to measure "
              "them anew)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="coatnet-efficiency-"))
    rows: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
    walls: dict[str, list[float]] = {m: [] for m in methods}

    def write() -> None:
        if objectives:
            write_pareto_results(args, argv=argv, started=started, host=host, methods=methods,
                                 objectives=objectives, rows=rows, walls=walls)
        else:
            write_results(args, argv=argv, started=started, host=host, methods=methods,
                          curves={m: [anytime(r, args.budget) for r in rows[m]]
                                  for m in methods}, rows=rows, walls=walls)

    try:
        for seed in range(args.seeds):
            for method in harness.rotated(methods, seed):
                if (method, seed) in done:
                    rows[method].append(done[method, seed][0])
                    walls[method].append(done[method, seed][1])
                    continue
                if not ray.is_initialized():
                    runner._init_ray(None)
                run_dir = tmp / f"{method}-{seed}"
                run_dir.mkdir()
                space = write_space(run_dir / f"{method}-{seed}.yaml", space_doc(
                    base, method=method, seed=seed, epochs=args.epochs, budget=args.budget,
                    concurrency=args.concurrency, objectives=objectives))
                sink = run_dir / "sink.jsonl"
                t0 = time.time()
                if method == "optuna":
                    run_optuna(space, sink=sink, budget=args.budget)
                else:
                    run_ray_method(method, space, tmp=run_dir, sink=sink, budget=args.budget)
                walls[method].append(time.time() - t0)
                rows[method].append(probes.read(str(sink)))
                runs.append(method=method, seed=seed, rows=rows[method][-1],
                            wall_s=walls[method][-1])
                if objectives:
                    costs = [m for m, _ in objectives[1:]]
                    volumes = hypervolume_anytime(
                        rows[method][-1], args.budget, epochs=args.epochs, costs=costs,
                        reference=reference_point(_all_runs(rows), costs))
                    found = f"hypervolume {volumes[-1][0] if volumes else None}"
                else:
                    curve = anytime(rows[method][-1], args.budget)
                    found = f"best val {curve[-1][0] if curve else None}"
                print(f"seed {seed} {method}: {found} after {args.budget} epochs, "
                      f"{walls[method][-1]:.0f} s", flush=True)
                write()  # what is done so far is on disk: an interrupted benchmark keeps it
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
