"""Send a search's MLflow data that never reached the tracking server.

    python experiments/sync_mlflow.py ray_results/<name> [--mlflow-uri URI]

A search keeps every MLflow operation in a journal (``mlflow_runs.json.pending.json``) until
the server has it; when the server was down at the end, experiments/search.py exits 3 and this
command delivers the rest (per-epoch metrics, run statuses, the parent run's summary). Safe to
run more than once: steps already in MLflow are skipped. Do not run it while that search runs.
Exit codes: 0 everything delivered, 2 not an experiment directory, 3 data still undelivered.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

logger = logging.getLogger("coatnet.search")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", type=Path, help="ray_results/<name> of the search")
    parser.add_argument("--mlflow-uri", help="tracking URI (default: the one the search used)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to keep retrying an unreachable server (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not (args.experiment_dir / "search_state.json").is_file():
        print(f"error: {args.experiment_dir}: not a search experiment directory (no "
              "search_state.json)", file=sys.stderr)
        return 2
    from coatnet.search.tracking import sync_experiment

    left = sync_experiment(args.experiment_dir, tracking_uri=args.mlflow_uri,
                           timeout_s=args.timeout)
    if left:
        print(f"error: {left} MLflow operation(s) still undelivered; is the server up? Run "
              "this command again later", file=sys.stderr)
        return 3
    logger.info("every MLflow operation of %s was delivered", args.experiment_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
