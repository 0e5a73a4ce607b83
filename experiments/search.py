"""Search CoAtNet architectures and training hyperparameters (Ray Tune + Optuna TPE + ASHA).

    python experiments/search.py --space search_spaces/coatnet_small.yaml

Runs on this machine with an embedded local Ray and a local MLflow store (sqlite:///mlflow.db);
the same command runs on a cluster through `ray job submit` (see the README).
Exit codes: 0 done, 1 the search failed (no trial produced a result), 2 bad input (nothing was
started or created), 3 done but some MLflow data never reached the server (kept on disk;
`python experiments/sync_mlflow.py EXPERIMENT_DIR` sends it), 130 interrupted (Ctrl-C): the
state is saved and the printed command (the same --name, or --resume) continues the search.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from coatnet.search.runner import SearchInputError, SearchOptions  # noqa: E402
from coatnet.search.space import SpaceError  # noqa: E402

logger = logging.getLogger("coatnet.search")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
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
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    # test-only fault injection (coatnet.search.train_loop's `fault` hooks), as JSON
    parser.add_argument("--fault", type=json.loads, default=None, help=argparse.SUPPRESS)
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
            return 2
        target = target.resolve()
        if (name and name != target.name) or (
                storage_path and Path(storage_path).expanduser().resolve() != target.parent):
            print(f"error: --resume {args.resume} contradicts --name/--storage-path",
                  file=sys.stderr)
            return 2
        name, storage_path = target.name, str(target.parent)
    options = SearchOptions(
        space=args.space, num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent_trials, name=name,
        storage_path=storage_path, resume=bool(args.resume), seed=args.seed,
        mlflow_uri=args.mlflow_uri, experiment_name=args.experiment_name,
        data_dir=args.data_dir, smoke_test=args.smoke_test, address=args.address,
        use_gpu=args.use_gpu, extra_config={"fault": args.fault} if args.fault else {})
    from coatnet.search.runner import SearchInterrupted, run_search
    from coatnet.search.tracking import TrackingServerUnavailable

    try:
        outcome = run_search(options)
    except SpaceError as err:
        print(f"error: invalid search space:\n{err}", file=sys.stderr)
        return 2
    except (SearchInputError, TrackingServerUnavailable, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SearchInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while starting up, before the search could save anything
        print(f"\n{_INTERRUPTED} {'--name ' + name + ' ' if name else ''}--resume",
              file=sys.stderr)
        return 130

    # The search is complete and saved: a Ctrl-C from here on (printing, Ray's shutdown at exit)
    # has nothing left to stop and must not turn a finished search into a failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from coatnet.search.results import format_leaderboard

    print()
    print(format_leaderboard(outcome.rows, metric=outcome.metric))
    print()
    print("trials: " + ", ".join(f"{n} {s}" for s, n in outcome.status_counts.items() if n))
    print(f"leaderboard:      {outcome.leaderboard_csv}")
    print(f"best config:      {outcome.best_config_yaml or '(no trial produced a result)'}")
    print(f"best checkpoint:  {outcome.best_checkpoint or '-'}")
    print(f"MLflow:           {outcome.tracking_uri} (parent run {outcome.parent_run_id})")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"compare trials:   mlflow ui --backend-store-uri {outcome.tracking_uri}")
    if outcome.best_value is None:
        return 1
    if outcome.mlflow_pending:
        print(f"warning: {outcome.mlflow_pending} MLflow operation(s) did not reach "
              f"{outcome.tracking_uri}; they are kept on disk. Send them with:\n"
              f"    python experiments/sync_mlflow.py {outcome.experiment_dir}", file=sys.stderr)
        return 3
    return 0


_INTERRUPTED = ("interrupted while starting; nothing was lost. Continue with the same command "
                "plus")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C during the imports
        print(f"\n{_INTERRUPTED} --resume", file=sys.stderr)
        sys.exit(130)
