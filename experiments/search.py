"""Search CoAtNet architectures and training hyperparameters (Ray Tune + Optuna TPE + ASHA).

    python experiments/search.py --space search_spaces/coatnet_small.yaml

Runs on this machine with an embedded local Ray and a local MLflow store (sqlite:///mlflow.db);
the same command runs on a cluster through `ray job submit` (see the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from coatnet.search.errors import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_NO_RESULT,
    EXIT_OK,
    EXIT_TRACKING_UNDELIVERED,
    SearchInterrupted,
    SpaceError,
    exit_code_for,
)
from coatnet.search.plan import SearchOptions  # noqa: E402

logger = logging.getLogger("coatnet.search")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(description=__doc__, epilog=f"exit codes:\n{codes}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, type=Path, help="search-space YAML file")
    parser.add_argument("--num-samples", type=int, help="override search.num_samples")
    parser.add_argument("--max-concurrent-trials", type=int,
                        help="override search.max_concurrent_trials")
    parser.add_argument("--name", help="experiment name; the same name again continues it")
    parser.add_argument("--storage-path", help="where experiments live (default ./ray_results)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                        help="continue --name, or the latest search of this space, or the "
                             "experiment directory DIR")
    parser.add_argument("--seed", type=int, help="override search.seed")
    parser.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, "
                                             "else sqlite:///mlflow.db)")
    parser.add_argument("--experiment-name", help="MLflow experiment name")
    parser.add_argument("--data-dir", help="dataset root for cifar10/cifar100")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a tiny run of the same space, for a quick check")
    parser.add_argument("--address", help="an existing Ray cluster (default $RAY_ADDRESS, "
                                          "else a local one)")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None)
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_false")
    parser.add_argument("--pick", metavar="RULE",
                        help="which Pareto-front member best_config.yaml is: the most "
                             "accurate one meeting RULE, e.g. 'macs<=1e6' or "
                             "'params<2e5,latency_ms<=5' (default: the most accurate)")
    parser.add_argument("--log-models", choices=("front", "best", "none"), default="front",
                        help="MLflow models logged at the end: the best trial and every "
                             "Pareto-front member (default), the best only, or none")
    parser.add_argument("--register-model", metavar="NAME",
                        help="register the best model in MLflow's Model Registry as a new "
                             "version of NAME")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's worker output here (default: <experiment>/"
                             "ray_workers.log) and MLflow's progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    name, storage_path = args.name, args.storage_path
    if isinstance(args.resume, str):  # --resume DIR: DIR is <storage path>/<name>
        target = Path(args.resume).expanduser()
        if not (target / "search_state.json").is_file():
            print(f"error: --resume {args.resume}: not a search experiment directory (no "
                  "search_state.json)", file=sys.stderr)
            return EXIT_BAD_INPUT
        target = target.resolve()
        if (name and name != target.name) or (
                storage_path and Path(storage_path).expanduser().resolve() != target.parent):
            print(f"error: --resume {args.resume} contradicts --name/--storage-path",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        name, storage_path = target.name, str(target.parent)
    options = SearchOptions(
        space=args.space, num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent_trials, name=name,
        storage_path=storage_path, resume=bool(args.resume), seed=args.seed,
        mlflow_uri=args.mlflow_uri, experiment_name=args.experiment_name,
        data_dir=args.data_dir, smoke_test=args.smoke_test, address=args.address,
        use_gpu=args.use_gpu, pick=args.pick, log_models=args.log_models,
        register_model=args.register_model, verbose=args.verbose)
    if not args.verbose:  # MLflow's progress bars and per-run links would bury the summary
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from coatnet.search.runner import run_search

    try:
        outcome = run_search(options)
    except KeyboardInterrupt:  # while starting up, before the search could save anything
        print(f"\n{_INTERRUPTED} {'--name ' + name + ' ' if name else ''}--resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        code = exit_code_for(err)
        if code is None:
            raise  # a bug, not bad input: keep the traceback
        if isinstance(err, SpaceError):
            print(f"error: invalid search space:\n{err}", file=sys.stderr)
        elif isinstance(err, SearchInterrupted):
            print(f"\n{err}", file=sys.stderr)
        else:
            print(f"error: {err}", file=sys.stderr)
        return code

    # The search is complete and saved: a Ctrl-C from here on (printing, Ray's shutdown at exit)
    # has nothing left to stop and must not turn a finished search into a failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from coatnet.search.results import format_leaderboard

    print()
    print(format_leaderboard(outcome.rows, metric=outcome.metric))
    if outcome.pareto_csv is not None:
        from coatnet.search.front import format_front

        print()
        print(format_front(outcome.front, objectives=outcome.objectives,
                           metric=outcome.metric))
        print(f"hypervolume {outcome.hypervolume:.6g}; front: {outcome.pareto_csv}"
              + (f", plot: {outcome.pareto_plot}" if outcome.pareto_plot else ""))
    print()
    print("trials: " + ", ".join(f"{n} {s}" for s, n in outcome.status_counts.items() if n))
    print(f"leaderboard:      {outcome.leaderboard_csv}")
    print(f"best config:      {outcome.best_config_yaml or '(no trial produced a result)'}")
    if outcome.best_test_accuracy is not None:
        print(f"best on test:     {outcome.best_test_accuracy:.4f} test accuracy (held-out "
              f"split no trial saw; {outcome.metric} {outcome.best_value:.4f} was selected on)")
    print(f"best checkpoint:  {outcome.best_checkpoint or '-'}")
    if outcome.best_model_uri:
        print(f"best model:       {outcome.best_model_uri}"
              + (f" (registered as {outcome.registered_model_uri})"
                 if outcome.registered_model_uri else "")
              + "; load with mlflow.pytorch.load_model")
    if outcome.figures:
        print(f"figures:          {outcome.figures[0].parent} ({len(outcome.figures)} PNGs, "
              "also under figures/ on the parent run)")
    print(f"MLflow:           {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    _print_views(outcome)
    if outcome.best_value is None:
        return EXIT_NO_RESULT
    if outcome.mlflow_pending:
        print(f"warning: {outcome.mlflow_pending} MLflow operation(s) did not reach "
              f"{outcome.tracking_uri}; they are kept on disk. Send them with:\n"
              f"    python experiments/sync_mlflow.py {outcome.experiment_dir}", file=sys.stderr)
        return EXIT_TRACKING_UNDELIVERED
    return EXIT_OK


def _print_views(outcome) -> None:
    """Where to look at the sweep: optuna-dashboard on the study, MLflow's trials view."""
    from coatnet.search.searcher import STUDY_FILE, storage_url
    from coatnet.search.tracking.views import view_url

    if (outcome.experiment_dir / STUDY_FILE).exists():
        print(f"optuna study:     optuna-dashboard {storage_url(outcome.experiment_dir)}")
    try:
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(outcome.tracking_uri).get_run(
            outcome.parent_run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - the server went away after the search: no link
        return
    if outcome.tracking_uri.startswith(("http://", "https://")):
        print(f"trials view:      {view_url(outcome.tracking_uri, experiment_id)}")
    else:
        print(f"trials view:      run `mlflow ui --backend-store-uri {outcome.tracking_uri}` "
              f"and open {view_url('http://127.0.0.1:5000', experiment_id)}")


_INTERRUPTED = ("interrupted while starting; nothing was lost. Continue with the same command "
                "plus")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C during the imports
        print(f"\n{_INTERRUPTED} --resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
