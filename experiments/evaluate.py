"""Evaluate a trained CoAtNet at several input sizes, its relative biases interpolated.

    python experiments/evaluate.py --model models:/coatnet-small/1 --image-sizes 32,48,64
    python experiments/evaluate.py --model ray_results/<search> --image-sizes 32,48,64

--model takes the same sources as finetune.py --from (an MLflow model URI, a trial's run id, a
search's experiment directory with --trial, a checkpoint). Prints validation and test accuracy
and latency per size, and logs the table to the model's MLflow run (evaluation/image_sizes.json,
MLflow's table format; repeated evaluations append rows). Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from coatnet.search.errors import SearchInputError, exit_code_for  # noqa: E402

TABLE_FILE = "evaluation/image_sizes.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="SOURCE",
                        help="MLflow model URI, run id, experiment directory or checkpoint")
    parser.add_argument("--trial", help="trial id within an experiment directory")
    parser.add_argument("--image-sizes", default="32,48,64",
                        help="comma-separated input sizes in px (default 32,48,64)")
    parser.add_argument("--latency-batch", type=int, default=1,
                        help="batch size of the latency measurement (default 1)")
    parser.add_argument("--mlflow-uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, "
                                             "else the search's, else sqlite:///mlflow.db)")
    parser.add_argument("--data-dir", help="dataset root, if it moved since the search")
    parser.add_argument("--no-log", action="store_true", help="do not log the table to MLflow")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        rows, run_id, uri = evaluate(args)
    except Exception as err:
        code = exit_code_for(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return code
    from coatnet.search.transfer import format_sizes

    print()
    print(format_sizes(rows, title=f"{args.model}:"))
    if run_id:
        print(f"\nlogged to run {run_id} at {uri} as {TABLE_FILE}")
    return 0


def evaluate(args: argparse.Namespace):
    """``(rows, run id the table went to or None, tracking URI)``."""
    from pathlib import Path as _Path

    from coatnet.search.sources import resolve_trial
    from coatnet.search.tracking import resolve_tracking_uri
    from coatnet.search.transfer import evaluate_at_sizes, parse_sizes, sizes_table

    try:
        sizes = parse_sizes(args.image_sizes)
    except ValueError as err:
        raise SearchInputError(str(err)) from None
    if args.latency_batch < 1:
        raise SearchInputError(f"--latency-batch={args.latency_batch}: must be positive")
    uri = args.mlflow_uri or resolve_tracking_uri(None)
    source = resolve_trial(args.model, trial_id=args.trial, tracking_uri=uri)
    uri = args.mlflow_uri or source.tracking_uri or uri
    data = dict(source.trial["data"])
    if args.data_dir:
        data["data_dir"] = str(_Path(args.data_dir).expanduser().resolve())
    rows = evaluate_at_sizes(source.model(), data=data, seed=int(source.trial.get("seed") or 0),
                             sizes=sizes, latency_batch=args.latency_batch)
    run_id = None if args.no_log else source.run_id or _trial_run(source, uri)
    if run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).log_table(run_id, data=sizes_table(
            rows, source=args.model, evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S")),
            artifact_file=TABLE_FILE)
    return rows, run_id, uri


def _trial_run(source, uri: str) -> str | None:
    """The trial's child run of its search, when the source came from an experiment dir."""
    if not source.parent_run_id:
        return None
    from coatnet.search.tracking import search_trial_ids

    runs = search_trial_ids(tracking_uri=uri, parent_run_id=source.parent_run_id)
    return (runs.get(source.trial_id) or [None])[0]


if __name__ == "__main__":
    sys.exit(main())
