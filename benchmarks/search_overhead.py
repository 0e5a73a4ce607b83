"""What the search system costs on top of training: the same fixed candidates, two ways.

    python benchmarks/search_overhead.py [--candidates 6] [--epochs 3]
        [--out benchmarks/results/search_overhead.md]

(a) **search system**: ``coatnet.search.runner.run_search`` (embedded Ray, Tune + OptunaSearch
    + ASHA, in-process ``TorchTrainer`` trials in reused actors, MLflow in a temp sqlite store),
    with the fixed candidates enqueued into Optuna (``StudySearch(enqueue=...)``),
    ``max_concurrent_trials: 1`` and ``asha.grace_period = epochs`` (nothing is stopped early).
(b) **plain loop**: ``optuna.create_study`` + ``study.optimize`` in this process, the same
    candidates enqueued, each objective calling the same ``train_loop_per_worker`` with a
    stand-in reporter (CPU, no resume, per-epoch checkpoint saved to a temp dir and removed).
(c) **worker group**: ``run_search`` again with ``num_workers: 2`` (a real Train worker group on
    CPU, DDP), to time a multi-worker trial's start.

How the times are taken (*start -> first step*, *dead time*, the timers put into the trials):
``search_probes.py``.

Ray is started with the runner's own ``_init_ray`` (the same call ``run_search`` makes), timed
on its own, so the ratio is given with and without Ray's start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import search_probes as probes
import search_workload as workload

REPO = harness.REPO
sys.path.insert(0, str(REPO))

# driver-side phases of (a) and (c): MLflow calls and Tuner.fit
PHASES = harness.PhaseTimer()


# ------------------------------------------------------------------------------- (b)
def run_plain(space_path: Path, points: list[dict[str, Any]], sink: Path) -> dict[str, Any]:
    import optuna

    import coatnet.search.train_loop as tl
    from coatnet.search.contracts import REPORT_TO_TUNE, LoopRuntime
    from coatnet.search.reporting import checkpoint_directory
    from coatnet.search.runner import SearchOptions, plan_search
    from coatnet.search.trial import build_loop_config

    plan = plan_search(SearchOptions(space=space_path))
    space, settings = plan.space, plan.space.search

    class PlainReporter(harness.in_process_reporter()):  # type: ignore[misc]
        last: dict[str, Any] = {}

        def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
                   epoch: int) -> None:
            PlainReporter.last = metrics
            if state is not None:  # a plain script would checkpoint each epoch too
                with checkpoint_directory(None, epoch, state):
                    pass

    original = tl.make_reporter  # the loop's reporter factory: a plain script reports nowhere
    tl.make_reporter = lambda runtime: probes.TimedReporter(PlainReporter(), runtime, str(sink))

    def objective(trial: Any) -> float:
        candidate = space.define_by_run(trial, set_constraints=True)["candidate"]
        loop = build_loop_config({"candidate": candidate, "data": plan.data,
                                  "trial": plan.trial, "seed": settings.seed})
        runtime = LoopRuntime(report_to=REPORT_TO_TUNE, started_at=time.time())  # patched above
        tl.train_loop_per_worker(dataclasses.replace(loop, runtime=runtime).to_dict())
        return float(PlainReporter.last["val_accuracy"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    try:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=settings.seed, n_startup_trials=settings.n_startup_trials))
        for point in points:
            study.enqueue_trial(point)
        study.optimize(objective, n_trials=len(points))
    finally:
        tl.make_reporter = original
    t1 = time.time()
    reports, _ = probes.read_sink(sink)
    trials = probes.trials_from_reports(reports)
    got = [t.params for t in study.trials]
    return {**probes.summarize_trials(trials, t0=t0, t1=t1), "same_params": got == points}


# ------------------------------------------------------------------------------- (a), (c)
def run_system(space_path: Path, *, name: str, storage: Path, mlflow_uri: str,
               sink: Path) -> dict[str, Any]:
    import ray.tune

    from coatnet.search import tracking
    from coatnet.search.runner import SearchOptions, run_search

    # the runner calls the package's names; finish_search_run calls those of tracking.runs
    for attr in ("start_parent_run", "finish_parent_run", "close_orphaned_runs"):
        for owner in (tracking, tracking.runs):
            PHASES.wrap(owner, attr, f"MLflow {attr}")
    PHASES.wrap(ray.tune.Tuner, "fit", "Tuner.fit")
    PHASES.clear()
    t0 = time.time()
    from coatnet.search import trial

    trial.run_trial = probes.timed_run_trial_for(str(sink))  # run_search imports it at call time
    outcome = run_search(SearchOptions(space=space_path, name=name,
                                       storage_path=str(storage), mlflow_uri=mlflow_uri))
    t1 = time.time()
    reports, calls = probes.read_sink(sink)
    trials = probes.trials_from_reports(reports)
    summary = probes.summarize_trials(trials, t0=t0, t1=t1) if trials else {"wall_s": t1 - t0}
    summary["status_counts"] = outcome.status_counts
    summary["phases"] = dict(PHASES.totals)
    summary["to_loop_s"] = probes.loop_entries(calls)
    enters = sorted(row["t_enter"] for row in calls if "t_enter" in row)
    summary["call_to_first_trial_s"] = enters[0] - t0 if enters else None
    summary["results"] = probes.tune_results(outcome.experiment_dir)
    return summary


# ------------------------------------------------------------------------------- report
def write_markdown(out: Path, *, args_list: list[str] | None, started: str,
                   host: harness.Host, versions: str, load_end: tuple[float, float, float],
                   args: argparse.Namespace, ray_init_s: float, a: dict[str, Any],
                   b: dict[str, Any], c: dict[str, Any] | None) -> str:
    fmt, row = harness.fmt, harness.row
    results = harness.Results.listed(
        "Search overhead: the search system vs a plain Optuna loop", script=__file__,
        args=args_list, date=started,
        machine=f"{host.name}, {host.cores} cores ({host.cpu}), load average at start "
                f"{harness.loadavg(host.loadavg)} (1/5/15 min), at end "
                f"{harness.loadavg(load_end)}; Python {host.python}, {versions}",
        items=[f"workload: {args.candidates} fixed candidates (seeded random draws from "
               f"`coatnet_small.yaml`'s model/train space), {args.dataset} at "
               f"{args.image_size} px, {args.epochs} epochs each, 1 CPU worker per trial, one "
               "trial at a time, no early stopping (ASHA grace period = epochs); one run, not "
               "a median of runs"])

    def both(key: str) -> tuple[str, str]:
        return fmt(a[key]), fmt(b[key])

    def median_max(key: str) -> tuple[str, str]:
        return tuple(f"{fmt(x[f'{key}_median_s'])} ({fmt(x[f'{key}_max_s'])})"
                     for x in (a, b))  # type: ignore[return-value]

    results.table("figure", "(a) search system", "(b) plain Optuna loop", "target")
    results.add(
        row("wall time, search call", *both("wall_s"), ""),
        row("Ray start (runner `_init_ray`, before (a))", fmt(ray_init_s), "-", ""),
        row("**ratio (a)/(b)**, without Ray start", f"**{a['wall_s'] / b['wall_s']:.2f}**",
            1, "<= 1.2"),
        row("ratio (a)/(b), with Ray start", f"{(a['wall_s'] + ray_init_s) / b['wall_s']:.2f}",
            1, ""),
        row("start -> first step, median (max)", *median_max("startup"), "<= 1 s"),
        row("dead time between trials, median (max)", *median_max("dead"), ""),
        row("training (first step -> last report), sum", *both("busy_s"), ""),
        row("of which the loop's own `epoch_time_s` (train + validate), sum",
            *both("epoch_time_sum_s"), ""),
        row("of which time inside `report` for epochs 1..E-1 (checkpoint save, hand-over; in "
            "(a) Tune's round trip), sum", *both("report_block_sum_s"), ""),
        row("call -> first trial's first step", *both("before_first_step_s"), ""),
        row("dead time between trials, sum", *both("dead_sum_s"), ""),
        row("last report -> call returns", *both("after_last_report_s"), ""),
        row("trials timed / statuses", f"{a['trials']} / {a.get('status_counts')}",
            b["trials"], ""),
        row("ran exactly the enqueued candidates", a.get("same_params"), b["same_params"], ""),
        "")
    ph = a.get("phases", {})
    mlflow_s = sum(v for k, v in ph.items() if k.startswith("MLflow"))
    fit_s = ph.get("Tuner.fit")
    to_loop = harness.summarize(a.get("to_loop_s") or [])
    med_to_loop = to_loop.median if to_loop else None
    results.add("Where (a)'s extra time goes (same run):", "")
    results.table("part of (a)", "time")
    results.add(
        row("Ray start (`_init_ray`, not in the search call)", fmt(ray_init_s)),
        row("search call -> first trial function entry (plan, MLflow parent run, Tuner set-up, "
            "trial actor start + imports)", fmt(a.get("call_to_first_trial_s"))),
        row("of which MLflow `start_parent_run`", fmt(ph.get("MLflow start_parent_run"))),
        row("trial function entry -> loop entry (TorchTrainer local mode), median",
            fmt(med_to_loop, digits=3)),
        row("loop entry -> first step (data from cache, model, optimizer, first batch), median",
            fmt(None if med_to_loop is None or a["startup_median_s"] is None
                else a["startup_median_s"] - med_to_loop, digits=3)),
        row("`Tuner.fit` total", fmt(fit_s)),
        row("MLflow parent run start + finish + orphan check", fmt(mlflow_s)),
        row("rest of the call outside `Tuner.fit` and MLflow (plan, leaderboard, best config)",
            fmt(None if fit_s is None else a["wall_s"] - fit_s - mlflow_s)),
        "")
    if c is not None:
        wg_startups = [rows[0].get("startup_s") for rows in c["results"]]
        results.add(f"(c) worker-group trials: `num_workers: 2`, `cpus_per_worker: "
                    f"{args.wg_cpus_per_worker}` (DDP on CPU), {args.wg_trials} trial(s) of "
                    f"{args.wg_epochs} epoch(s), same Ray instance:", "")
        results.table("figure", "(c) worker group", "target")
        results.add(
            row("start -> first step (rank 0), per trial",
                ", ".join(fmt(s) for s in wg_startups), "<= 12 s"),
            row("of which trial function entry -> first worker's loop entry (Train controller, "
                "placement group, worker processes + imports, process group)",
                ", ".join(fmt(s) for s in c.get("to_loop_s") or []), ""),
            row("search call wall time", fmt(c["wall_s"]), ""),
            row("statuses", c.get("status_counts"), ""),
            "")
    results.add(
        "How measured: *start -> first step* is the loop's own `startup_s` metric (from "
        "`run_trial`'s entry, `runtime.started_at`, to the first training batch in hand; in (b) "
        "from right after the objective sampled its candidate). *Dead time* runs from the "
        "moment the last epoch's report is handed to the reporter (training and validation "
        "done) to the next trial's first step: final checkpoint save, report, trial teardown, "
        "searcher, next trial's set-up, first batch. Both come from a timer that wraps the "
        "loop's reporter (in (a) installed inside each trial actor by a wrapper around "
        "`run_trial`); (c) reads `startup_s` from Tune's `result.json`. Ratios are of wall "
        "times of the search call, measured in the same process one after the other ((b) "
        "first). The machine's cores are shared, so single runs are noisy; see the load "
        "average.",
        "")
    return results.write(out)


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate draws")
    parser.add_argument("--wg-trials", type=int, default=1,
                        help="worker-group trials in (c); 0 skips (c)")
    parser.add_argument("--wg-epochs", type=int, default=1)
    parser.add_argument("--wg-cpus-per-worker", type=float, default=0.5,
                        help="2 workers x this + the trial's 0.01 CPU must fit the cores")
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / "search_overhead.md")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)
    started = harness.now()
    host = harness.host()

    import ray
    import ray.cloudpickle

    # The probes run inside trial actors and Train workers: ship them by value, as functions
    # of this __main__ script would be, so those processes need not import search_probes.
    ray.cloudpickle.register_pickle_by_value(probes)
    versions = harness.versions("ray", "optuna", "torch")

    from coatnet.search import runner
    from coatnet.search.data import clear_memory_cache, load_datasets
    from coatnet.search.space import load_space

    tmp = Path(tempfile.mkdtemp(prefix="coatnet-overhead-"))
    try:
        cache = str(tmp / "data-cache")
        space_a = workload.write_space(tmp / "overhead.yaml", workload.space_doc(
            dataset=args.dataset, image_size=args.image_size, epochs=args.epochs,
            num_samples=args.candidates, cache_dir=cache))
        space = load_space(space_a)
        points = workload.fixed_candidates(space, args.candidates, args.seed)
        # the node's file cache is warm for both paths; each process fills its memory cache
        load_datasets(space.data.model_dump(), seed=space.search.seed)
        clear_memory_cache()

        print(f"(b) plain Optuna loop: {len(points)} candidates x {args.epochs} epochs",
              flush=True)
        b = run_plain(space_a, points, tmp / "sink_b.jsonl")
        print(json.dumps(b, indent=1), flush=True)

        workload.enqueue_points(points)
        t = time.time()
        runner._init_ray(None)
        ray_init_s = time.time() - t
        mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        print(f"(a) search system (Ray started in {ray_init_s:.2f} s)", flush=True)
        a = run_system(space_a, name="overhead-a", storage=tmp / "ray_results",
                       mlflow_uri=mlflow_uri, sink=tmp / "sink_a.jsonl")
        a_params = workload.trial_params(a["results"])
        # Tune's trial ids are not in start order: compare as multisets
        a["same_params"] = workload.multiset(a_params) == workload.multiset(points)
        print(json.dumps({k: v for k, v in a.items() if k != "results"},
                         indent=1), flush=True)
        if not a["same_params"]:
            print("WARNING: (a) trials did not run the enqueued candidates:\n"
                  f"ran {a_params}\nenqueued {points}", flush=True)

        c = None
        if args.wg_trials > 0:
            space_c = workload.write_space(tmp / "overhead_wg.yaml", workload.space_doc(
                dataset=args.dataset, image_size=args.image_size, epochs=args.wg_epochs,
                num_samples=args.wg_trials, cache_dir=cache, num_workers=2,
                cpus_per_worker=args.wg_cpus_per_worker))
            workload.enqueue_points(points[:args.wg_trials])
            print("(c) worker-group trials", flush=True)
            c = run_system(space_c, name="overhead-c", storage=tmp / "ray_results",
                           mlflow_uri=mlflow_uri, sink=tmp / "sink_c.jsonl")
            print(json.dumps({"wall_s": c["wall_s"], "status_counts": c["status_counts"],
                              "startup_s": [r[0].get("startup_s") for r in c["results"]]},
                             indent=1), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    write_markdown(args.out, args_list=argv, started=started, host=host, versions=versions,
                   load_end=os.getloadavg(), args=args, ray_init_s=ray_init_s, a=a, b=b, c=c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
