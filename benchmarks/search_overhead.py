"""What the search system costs on top of training: the same fixed candidates, two ways.

    python benchmarks/search_overhead.py [--candidates 6] [--epochs 3]
        [--out benchmarks/results/search_overhead.md]

(a) **search system**: ``coatnet.search.runner.run_search`` (embedded Ray, Tune + OptunaSearch
    + ASHA, in-process ``TorchTrainer`` trials in reused actors, MLflow in a temp sqlite store),
    with the fixed candidates enqueued into Optuna (``OptunaSearch(points_to_evaluate=...)``),
    ``max_concurrent_trials: 1`` and ``asha.grace_period = epochs`` (nothing is stopped early).
(b) **plain loop**: ``optuna.create_study`` + ``study.optimize`` in this process, the same
    candidates enqueued, each objective calling the same ``train_loop_per_worker`` with a
    stand-in reporter (CPU, no resume, per-epoch checkpoint saved to a temp dir and removed).
(c) **worker group**: ``run_search`` again with ``num_workers: 2`` (a real Train worker group on
    CPU, DDP), to time a multi-worker trial's start.

How the times are taken (all ``time.time()`` on this one machine):

* *start -> first step*: the loop's own ``startup_s`` metric, i.e. from ``run_trial``'s entry
  (``runtime.started_at``; in (b) the objective sets it right after sampling the candidate) to
  the first training batch in hand, before its forward pass.
* *dead time*: from the moment the last epoch's report is handed to the reporter (training
  and validation of the last epoch done) to the next trial's first step. It holds the final
  checkpoint save, the report, trial teardown, the searcher, the next trial's set-up and the
  first batch.
* In (a) the benchmark wraps ``run_trial`` (in the driver, before ``run_search`` imports it) so
  that inside each trial actor it wraps ``train_loop._make_reporter``'s reporter with a timer
  that appends one JSON line per report to a file; (b) uses the same timer. Nothing in the
  repository is edited; the patches live only in this benchmark's processes.

Ray is started with the runner's own ``_init_ray`` (the same call ``run_search`` makes), timed
on its own, so the ratio is given with and without Ray's start.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ------------------------------------------------------------------------------- timing sink

class _TimedReporter:
    """Wraps a train_loop reporter; appends one JSON line per report (before reporting, since
    Tune may end the trial inside the last report)."""

    def __init__(self, inner: Any, runtime: dict[str, Any], sink: str) -> None:
        self._inner = inner
        self._runtime = runtime
        self._sink = sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        line = {"t_report": time.time(), "epoch": epoch, "pid": os.getpid(),
                "started_at": self._runtime.get("started_at"),
                "startup_s": metrics.get("startup_s"),
                "epoch_time_s": metrics.get("epoch_time_s"),
                "val_accuracy": metrics.get("val_accuracy"), "status": metrics.get("status")}
        try:
            self._inner.report(metrics, state=state, epoch=epoch)
            line["returned"] = True
        finally:  # Tune may end the trial inside the last report (it raises there)
            line["t_done"] = time.time()
            with open(self._sink, "a") as fh:
                fh.write(json.dumps(line) + "\n")


def _install_timer(sink: str) -> None:
    """Wrap coatnet.search.train_loop._make_reporter in *this* process (idempotent)."""
    import coatnet.search.train_loop as tl

    if getattr(tl._make_reporter, "_overhead_timer", False):
        return
    original = tl._make_reporter

    def make(runtime: dict[str, Any]) -> Any:
        return _TimedReporter(original(runtime), runtime, sink)

    make._overhead_timer = True  # type: ignore[attr-defined]
    tl._make_reporter = make


def _timed_loop_factory(sink: str) -> Any:
    """A train_loop_per_worker that notes when the loop is entered (in the worker), installs
    the report timer there, then runs the real loop."""
    def train_loop_per_worker(config: dict[str, Any]) -> None:
        import coatnet.search.train_loop as tl

        t_loop = time.time()
        _install_timer(sink)
        with open(sink, "a") as fh:
            fh.write(json.dumps({"t_loop_enter": t_loop, "pid": os.getpid(),
                                 "started_at": (config.get("runtime") or {}).get("started_at")})
                     + "\n")
        tl.train_loop_per_worker(config)

    return train_loop_per_worker


def _timed_run_trial(config: dict[str, Any]) -> None:
    """Stand-in for coatnet.search.trial.run_trial: installs the timers in the trial actor
    (and, through the loop function, in Train workers), then calls the real one."""
    import coatnet.search.trial as trial_mod
    from coatnet.search.trial import run_trial as real  # the unpatched one in a trial actor

    sink = config["_overhead_sink"]
    _install_timer(sink)
    if not getattr(trial_mod.train_loop_per_worker, "_overhead_timer", False):
        loop = _timed_loop_factory(sink)
        loop._overhead_timer = True  # type: ignore[attr-defined]
        trial_mod.train_loop_per_worker = loop
    t_enter = time.time()
    try:
        real({k: v for k, v in config.items() if k != "_overhead_sink"})
    finally:
        with open(sink, "a") as fh:
            fh.write(json.dumps({"t_enter": t_enter, "t_exit": time.time(),
                                 "pid": os.getpid()}) + "\n")


_timed_run_trial.__name__ = "run_trial"
_timed_run_trial.__qualname__ = "run_trial"


def _read_sink(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    reports, calls = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "t_report" in row:
                reports.append(row)
            elif "t_enter" in row:
                calls.append(row)
            else:
                calls.append(row)  # t_loop_enter rows
    return reports, calls


_PHASES: dict[str, float] = {}


def _time_phase(owner: Any, attr: str, label: str) -> None:
    """Wrap owner.attr (a driver-side function or method) to add its duration to _PHASES."""
    original = getattr(owner, attr)
    if getattr(original, "_overhead_phase", False):
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            _PHASES[label] = _PHASES.get(label, 0.0) + time.time() - t

    timed._overhead_phase = True  # type: ignore[attr-defined]
    setattr(owner, attr, timed)


def _trials_from_reports(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group report lines per trial attempt (keyed by started_at), ordered by first step."""
    by_start: dict[float, list[dict[str, Any]]] = {}
    for row in reports:
        by_start.setdefault(row["started_at"], []).append(row)
    trials = []
    for started_at, rows in by_start.items():
        rows.sort(key=lambda r: r["t_report"])
        startup = next((r["startup_s"] for r in rows if r["startup_s"] is not None), None)
        trials.append({"epoch_time_s": sum(r["epoch_time_s"] or 0.0 for r in rows),
                       "report_s": sum(r["t_done"] - r["t_report"] for r in rows[:-1]),
                       "started_at": started_at, "startup_s": startup,
                       "first_step": started_at + startup if startup is not None else None,
                       "last_report": rows[-1]["t_report"], "epochs": len(rows),
                       "val_accuracy": rows[-1]["val_accuracy"], "status": rows[-1]["status"]})
    trials.sort(key=lambda t: t["started_at"])
    return trials


def _summary(trials: list[dict[str, Any]], *, t0: float, t1: float) -> dict[str, Any]:
    startups = [t["startup_s"] for t in trials if t["startup_s"] is not None]
    gaps = [b["first_step"] - a["last_report"] for a, b in zip(trials, trials[1:])]
    busy = sum(t["last_report"] - t["first_step"] for t in trials)
    return {
        "wall_s": t1 - t0, "trials": len(trials),
        "startup_median_s": statistics.median(startups) if startups else None,
        "startup_max_s": max(startups) if startups else None,
        "dead_median_s": statistics.median(gaps) if gaps else None,
        "dead_max_s": max(gaps) if gaps else None,
        "dead_sum_s": sum(gaps),
        "busy_s": busy,
        "epoch_time_sum_s": sum(t["epoch_time_s"] for t in trials),
        "report_block_sum_s": sum(t["report_s"] for t in trials),
        "before_first_step_s": trials[0]["first_step"] - t0 if trials else None,
        "after_last_report_s": t1 - trials[-1]["last_report"] if trials else None,
        "val_accuracy": [t["val_accuracy"] for t in trials],
    }


# ------------------------------------------------------------------------------- set-up
def _space_doc(*, dataset: str, image_size: int, epochs: int, num_samples: int,
               cache_dir: str, num_workers: int = 1, cpus_per_worker: float = 1.0) -> dict:
    """coatnet_small.yaml's model/train space, with trial/search settings for the benchmark."""
    base = yaml.safe_load((REPO / "search_spaces" / "coatnet_small.yaml").read_text())
    base.pop("description", None)
    data = {"dataset": dataset, "image_size": image_size, "val_fraction": 0.2,
            "augment": False, "cache_dir": cache_dir}
    if dataset == "synthetic":
        data.update(num_samples=1024, num_classes=10, image_channel=1)
    base["data"] = data
    base["trial"] = {"epochs": epochs, "num_workers": num_workers, "use_gpu": False,
                     "cpus_per_worker": cpus_per_worker, "max_failures": 0,
                     "num_data_workers": 0, "compile": False, "keep_checkpoints": 2}
    base["search"] = {"metric": "val_accuracy", "mode": "max", "num_samples": num_samples,
                      "max_concurrent_trials": 1, "seed": 0, "searcher": "tpe",
                      "n_startup_trials": num_samples,
                      "asha": {"grace_period": epochs, "reduction_factor": 2, "brackets": 1}}
    return base


def _write_space(path: Path, doc: dict) -> Path:
    # strict_yaml reads 1e-3 as a number; yaml.safe_dump writes floats in a form it accepts.
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _fixed_candidates(space: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """n feasible flat-param dicts drawn from the space by a seeded random sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points: list[dict[str, Any]] = []
    for _ in range(50 * n):
        trial = study.ask()
        candidate = space.define_by_run(trial)["candidate"]
        study.tell(trial, 0.0)
        if candidate["infeasible_reason"] is None:
            points.append(dict(trial.params))
            if len(points) == n:
                return points
    raise RuntimeError(f"found only {len(points)} feasible candidates")


def _patch_searcher(points: list[dict[str, Any]]) -> None:
    """Make the runner's OptunaSearch enqueue the fixed points (driver process only)."""
    import ray.tune.search.optuna as optuna_pkg

    base = optuna_pkg.OptunaSearch
    if getattr(base, "_overhead_points", None) is not None:
        base = base.__mro__[1]

    class FixedPointsOptunaSearch(base):  # type: ignore[misc, valid-type]
        _overhead_points = points

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["points_to_evaluate"] = [dict(p) for p in points]
            super().__init__(*args, **kwargs)

    optuna_pkg.OptunaSearch = FixedPointsOptunaSearch


# ------------------------------------------------------------------------------- (b)
def run_plain(space_path: Path, points: list[dict[str, Any]], sink: Path) -> dict[str, Any]:
    import optuna

    import coatnet.search.train_loop as tl
    from coatnet.search.runner import SearchOptions, plan_search
    from coatnet.search.trial import build_loop_config

    plan = plan_search(SearchOptions(space=space_path))
    space, settings = plan.space, plan.space.search

    class PlainReporter(tl._Reporter):
        last: dict[str, Any] = {}

        def device(self, *, use_gpu: bool) -> Any:
            import torch

            return torch.device("cpu")

        def resume_state(self) -> None:
            return None

        def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
                   epoch: int) -> None:
            PlainReporter.last = metrics
            if state is not None:  # a plain script would checkpoint each epoch too
                with tl._checkpoint_directory(None, epoch, state):
                    pass

    original = tl._make_reporter
    tl._make_reporter = lambda runtime: _TimedReporter(PlainReporter(), runtime, str(sink))

    def objective(trial: Any) -> float:
        candidate = space.define_by_run(trial, set_constraints=True)["candidate"]
        loop = build_loop_config({"candidate": candidate, "data": plan.data,
                                  "trial": plan.trial, "seed": settings.seed})
        loop["runtime"] = {"report_to": "plain", "started_at": time.time()}
        tl.train_loop_per_worker(loop)
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
        tl._make_reporter = original
    t1 = time.time()
    reports, _ = _read_sink(sink)
    trials = _trials_from_reports(reports)
    got = [t.params for t in study.trials]
    return {**_summary(trials, t0=t0, t1=t1), "same_params": got == points}


# ------------------------------------------------------------------------------- (a), (c)
def run_system(space_path: Path, *, name: str, storage: Path, mlflow_uri: str,
               sink: Path) -> dict[str, Any]:
    import ray.tune

    from coatnet.search import tracking
    from coatnet.search.runner import SearchOptions, run_search

    for attr in ("start_parent_run", "finish_parent_run", "close_orphaned_runs"):
        _time_phase(tracking, attr, f"MLflow {attr}")
    _time_phase(ray.tune.Tuner, "fit", "Tuner.fit")
    _PHASES.clear()
    t0 = time.time()
    outcome = run_search(SearchOptions(space=space_path, name=name,
                                       storage_path=str(storage), mlflow_uri=mlflow_uri,
                                       extra_config={"_overhead_sink": str(sink)}))
    t1 = time.time()
    reports, calls = _read_sink(sink)
    trials = _trials_from_reports(reports)
    summary = _summary(trials, t0=t0, t1=t1) if trials else {"wall_s": t1 - t0}
    summary["status_counts"] = outcome.status_counts
    summary["phases"] = dict(_PHASES)
    loop_enter: dict[float, float] = {}
    for row in calls:
        if "t_loop_enter" in row:
            key = row["started_at"]
            loop_enter[key] = min(loop_enter.get(key, row["t_loop_enter"]), row["t_loop_enter"])
    summary["to_loop_s"] = [loop_enter[k] - k for k in sorted(loop_enter)]
    enters = sorted(row["t_enter"] for row in calls if "t_enter" in row)
    summary["call_to_first_trial_s"] = enters[0] - t0 if enters else None
    summary["results"] = _tune_results(outcome.experiment_dir)
    return summary


def _tune_results(experiment_dir: Path) -> list[list[dict[str, Any]]]:
    """Every trial's reported results (Tune's result.json lines), ordered by trial start."""
    out = []
    for path in experiment_dir.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out.append(rows)
    out.sort(key=lambda rows: str(rows[0].get("trial_id", "")))
    return out


def _multiset(points: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in points)


def _trial_params(results: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in rows[0]["config"].items()
             if k.startswith(("model.", "train."))} for rows in results]


# ------------------------------------------------------------------------------- report
def _fmt(value: float | None, unit: str = " s", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import optuna
    import ray
    import torch

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": cores, "loadavg": os.getloadavg(), "python": platform.python_version(),
            "versions": f"ray {ray.__version__}, optuna {optuna.__version__}, "
                        f"torch {torch.__version__}"}


def write_markdown(out: Path, *, command: str, started: str, machine: dict[str, Any],
                   load_end: tuple[float, float, float], args: argparse.Namespace,
                   ray_init_s: float, a: dict[str, Any], b: dict[str, Any],
                   c: dict[str, Any] | None) -> str:
    ratio_search = a["wall_s"] / b["wall_s"]
    ratio_total = (a["wall_s"] + ray_init_s) / b["wall_s"]
    la = machine["loadavg"]
    lines = [
        "# Search overhead: the search system vs a plain Optuna loop",
        "",
        f"- command: `{command}`",
        f"- date: {started}",
        f"- machine: {machine['host']}, {machine['cores']} cores ({machine['cpu']}), "
        f"load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min), "
        f"at end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}; "
        f"Python {machine['python']}, {machine['versions']}",
        f"- workload: {args.candidates} fixed candidates (seeded random draws from "
        f"`coatnet_small.yaml`'s model/train space), {args.dataset} at {args.image_size} px, "
        f"{args.epochs} epochs each, 1 CPU worker per trial, one trial at a time, no early "
        "stopping (ASHA grace period = epochs); one run, not a median of runs",
        "",
        "| figure | (a) search system | (b) plain Optuna loop | target |",
        "|---|---|---|---|",
        f"| wall time, search call | {_fmt(a['wall_s'])} | {_fmt(b['wall_s'])} | |",
        f"| Ray start (runner `_init_ray`, before (a)) | {_fmt(ray_init_s)} | - | |",
        f"| **ratio (a)/(b)**, without Ray start | **{ratio_search:.2f}** | 1 | <= 1.2 |",
        f"| ratio (a)/(b), with Ray start | {ratio_total:.2f} | 1 | |",
        f"| start -> first step, median (max) | {_fmt(a['startup_median_s'])} "
        f"({_fmt(a['startup_max_s'])}) | {_fmt(b['startup_median_s'])} "
        f"({_fmt(b['startup_max_s'])}) | <= 1 s |",
        f"| dead time between trials, median (max) | {_fmt(a['dead_median_s'])} "
        f"({_fmt(a['dead_max_s'])}) | {_fmt(b['dead_median_s'])} "
        f"({_fmt(b['dead_max_s'])}) | |",
        f"| training (first step -> last report), sum | {_fmt(a['busy_s'])} | "
        f"{_fmt(b['busy_s'])} | |",
        f"| of which the loop's own `epoch_time_s` (train + validate), sum | "
        f"{_fmt(a['epoch_time_sum_s'])} | {_fmt(b['epoch_time_sum_s'])} | |",
        f"| of which time inside `report` for epochs 1..E-1 (checkpoint save, hand-over; "
        f"in (a) Tune's round trip), sum | {_fmt(a['report_block_sum_s'])} | "
        f"{_fmt(b['report_block_sum_s'])} | |",
        f"| call -> first trial's first step | {_fmt(a['before_first_step_s'])} | "
        f"{_fmt(b['before_first_step_s'])} | |",
        f"| dead time between trials, sum | {_fmt(a['dead_sum_s'])} | "
        f"{_fmt(b['dead_sum_s'])} | |",
        f"| last report -> call returns | {_fmt(a['after_last_report_s'])} | "
        f"{_fmt(b['after_last_report_s'])} | |",
        f"| trials timed / statuses | {a['trials']} / {a.get('status_counts')} | "
        f"{b['trials']} | |",
        f"| ran exactly the enqueued candidates | {a.get('same_params')} | {b['same_params']} | |",
        "",
    ]
    ph = a.get("phases", {})
    mlflow_s = sum(v for k, v in ph.items() if k.startswith("MLflow"))
    fit_s = ph.get("Tuner.fit")
    to_loop = a.get("to_loop_s") or []
    med_to_loop = statistics.median(to_loop) if to_loop else None
    lines += [
        "Where (a)'s extra time goes (same run):",
        "",
        "| part of (a) | time |",
        "|---|---|",
        f"| Ray start (`_init_ray`, not in the search call) | {_fmt(ray_init_s)} |",
        f"| search call -> first trial function entry (plan, MLflow parent run, Tuner set-up, "
        f"trial actor start + imports) | {_fmt(a.get('call_to_first_trial_s'))} |",
        f"| of which MLflow `start_parent_run` | "
        f"{_fmt(ph.get('MLflow start_parent_run'))} |",
        f"| trial function entry -> loop entry (TorchTrainer local mode), median | "
        f"{_fmt(med_to_loop, digits=3)} |",
        f"| loop entry -> first step (data from cache, model, optimizer, first batch), median | "
        f"{_fmt(None if med_to_loop is None or a['startup_median_s'] is None else a['startup_median_s'] - med_to_loop, digits=3)} |",
        f"| `Tuner.fit` total | {_fmt(fit_s)} |",
        f"| MLflow parent run start + finish + orphan check | {_fmt(mlflow_s)} |",
        f"| rest of the call outside `Tuner.fit` and MLflow (plan, leaderboard, best config) | "
        f"{_fmt(None if fit_s is None else a['wall_s'] - fit_s - mlflow_s)} |",
        "",
    ]
    if c is not None:
        wg_startups = [rows[0].get("startup_s") for rows in c["results"]]
        wg_to_loop = c.get("to_loop_s") or []
        lines += [
            f"(c) worker-group trials: `num_workers: 2`, `cpus_per_worker: "
            f"{args.wg_cpus_per_worker}` (DDP on CPU), {args.wg_trials} trial(s) of "
            f"{args.wg_epochs} epoch(s), same Ray instance:",
            "",
            "| figure | (c) worker group | target |",
            "|---|---|---|",
            f"| start -> first step (rank 0), per trial | "
            f"{', '.join(_fmt(s) for s in wg_startups)} | <= 12 s |",
            f"| of which trial function entry -> first worker's loop entry (Train controller, placement "
            f"group, worker processes + imports, process group) | "
            f"{', '.join(_fmt(s) for s in wg_to_loop)} | |",
            f"| search call wall time | {_fmt(c['wall_s'])} | |",
            f"| statuses | {c.get('status_counts')} | |",
            "",
        ]
    lines += [
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
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


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
    command = "python benchmarks/search_overhead.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = _machine()

    import ray

    from coatnet.search import runner, trial
    from coatnet.search.data import clear_memory_cache, load_datasets
    from coatnet.search.space import load_space

    tmp = Path(tempfile.mkdtemp(prefix="coatnet-overhead-"))
    try:
        cache = str(tmp / "data-cache")
        space_a = _write_space(tmp / "overhead.yaml", _space_doc(
            dataset=args.dataset, image_size=args.image_size, epochs=args.epochs,
            num_samples=args.candidates, cache_dir=cache))
        space = load_space(space_a)
        points = _fixed_candidates(space, args.candidates, args.seed)
        # the node's file cache is warm for both paths; each process fills its memory cache
        load_datasets(space.data.model_dump(), seed=space.search.seed)
        clear_memory_cache()

        print(f"(b) plain Optuna loop: {len(points)} candidates x {args.epochs} epochs",
              flush=True)
        b = run_plain(space_a, points, tmp / "sink_b.jsonl")
        print(json.dumps(b, indent=1), flush=True)

        _patch_searcher(points)
        trial.run_trial = _timed_run_trial  # run_search imports it at call time
        t = time.time()
        runner._init_ray(None)
        ray_init_s = time.time() - t
        mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        print(f"(a) search system (Ray started in {ray_init_s:.2f} s)", flush=True)
        a = run_system(space_a, name="overhead-a", storage=tmp / "ray_results",
                       mlflow_uri=mlflow_uri, sink=tmp / "sink_a.jsonl")
        a_params = _trial_params(a["results"])
        # Tune's trial ids are not in start order: compare as multisets
        a["same_params"] = _multiset(a_params) == _multiset(points)
        print(json.dumps({k: v for k, v in a.items() if k != "results"},
                         indent=1), flush=True)
        if not a["same_params"]:
            print("WARNING: (a) trials did not run the enqueued candidates:\n"
                  f"ran {a_params}\nenqueued {points}", flush=True)

        c = None
        if args.wg_trials > 0:
            space_c = _write_space(tmp / "overhead_wg.yaml", _space_doc(
                dataset=args.dataset, image_size=args.image_size, epochs=args.wg_epochs,
                num_samples=args.wg_trials, cache_dir=cache, num_workers=2,
                cpus_per_worker=args.wg_cpus_per_worker))
            _patch_searcher(points[:args.wg_trials])
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

    text = write_markdown(args.out, command=command, started=started, machine=machine,
                          load_end=os.getloadavg(), args=args, ray_init_s=ray_init_s,
                          a=a, b=b, c=c)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
