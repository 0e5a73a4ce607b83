"""Fine-tune a searched CoAtNet at another input size (the paper's 224 -> 384 protocol).

    python experiments/finetune.py --from ray_results/<search> --image-size 48 --epochs 3
    python experiments/finetune.py --from ray_results/<search> --trial 1a2b3c4d --image-size 48
    python experiments/finetune.py --from models:/coatnet-small/1 --image-size 48 --epochs 3

--from takes a search's experiment directory (default trial: the most accurate one), a trial
checkpoint directory, an MLflow model (models:/..., runs:/.../model, a model directory) or a
trial's MLflow run id. The relative-bias tables are interpolated to the new size and stored with
update_relative_bias_and_indices; the model trains with the trial's hyperparameters on the same
data resized, through the search's Ray Train loop, and lands in MLflow as a child run of the
search (tag stage=finetune) with its before/after accuracies, checkpoint and logged model.
Exit codes: 0 done, 2 bad input or MLflow unreachable (nothing trained).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from coatnet.search.errors import exit_code_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="experiment directory, checkpoint, MLflow model URI or run id")
    parser.add_argument("--trial", help="trial id within an experiment directory")
    parser.add_argument("--image-size", type=int, required=True, help="new input size (px)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the trial's)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the trial's)")
    parser.add_argument("--mlflow-uri", help="tracking URI (default: the search's)")
    parser.add_argument("--output", type=Path,
                        help="where the checkpoints go (default <experiment>/finetune/<name>)")
    parser.add_argument("--data-dir", help="dataset root, if it moved since the search")
    parser.add_argument("--from-scratch", action="store_true",
                        help="the baseline: the same architecture and settings at the new "
                             "size from random weights (MLflow tag stage=scratch)")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from coatnet.search.finetune import FinetuneOptions, describe, run_finetune

    options = FinetuneOptions(source=args.source, trial_id=args.trial,
                              image_size=args.image_size, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, mlflow_uri=args.mlflow_uri,
                              output=args.output, data_dir=args.data_dir,
                              from_scratch=args.from_scratch)
    try:
        outcome = run_finetune(options)
    except Exception as err:
        code = exit_code_for(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return code
    print()
    print(describe(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
