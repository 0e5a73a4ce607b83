"""Training images/s of the search's own train loop on one fixed candidate (one CPU worker).

    python benchmarks/train_loop_speed.py [--config ray_results/<search>/best_config.yaml]
        [--epochs 6] [--out benchmarks/results/train_loop_speed.md]

Runs ``train_loop_per_worker`` through Ray Train's local mode (a ``TorchTrainer`` with
``num_workers=0``, as the search runs a one-CPU trial) on the digits dataset at 32 px and
reports the ``images_per_s`` metric of every epoch, the figure each trial logs to MLflow. Run it
on two checkouts to compare them; without ``--config`` it trains the default search's best
candidate of 2026-11-27 (CCCT, depths 1-1-1-2-1, channels 32-32-48-96-128).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import harness

sys.path.insert(0, str(harness.REPO))

DEFAULT_MODEL = dict(image_height=32, image_width=32, image_channel=1, num_classes=10,
                     num_blocks_in_layers=[1, 1, 1, 2, 1],
                     block_type_in_layers=["C", "C", "C", "T"],
                     num_channels_in_layers=[32, 32, 48, 96, 128], expand_scale_in_layers=4,
                     head_dim=32, path_dropout=0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a search's best_config.yaml")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from coatnet import CoAtNetConfig
    from coatnet.search.train_loop import train_loop_per_worker

    model = (CoAtNetConfig.from_yaml(args.config) if args.config
             else CoAtNetConfig(**DEFAULT_MODEL)).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "model": model,
            "hparams": dict(lr=2e-3, weight_decay=0.05, label_smoothing=0.1,
                            batch_size=args.batch_size, warmup_epochs=1),
            "data": {"dataset": "digits", "image_size": model["image_height"],
                     "val_fraction": 0.2},
            "trial": dict(epochs=args.epochs, num_workers=1, use_gpu=False, cpus_per_worker=1,
                          max_failures=0, num_data_workers=0, compile=False, keep_checkpoints=1),
            "seed": 0,
            "runtime": {"report_to": "train"},
        }
        # Ray Train's local mode keeps no metrics history, so the reports are recorded here.
        reported: list[dict] = []
        report = ray.train.report

        def record(metrics: dict, *args: object, **kwargs: object) -> None:
            reported.append(dict(metrics))
            report(metrics, *args, **kwargs)

        ray.train.report = record
        try:
            TorchTrainer(train_loop_per_worker, train_loop_config=config,
                         scaling_config=ScalingConfig(num_workers=0),
                         run_config=RunConfig(storage_path=tmp)).fit()
        finally:
            ray.train.report = report
    epochs = [m for m in reported if m.get("epochs_done", 0) >= 1]
    rates = [float(m["images_per_s"]) for m in epochs]
    results = harness.Results.dated(
        "Train-loop speed", script=__file__,
        machine=f"{harness.machine(threads=False)}, "
                "1 CPU thread per trial (as the search runs it)")
    results.add(f"images/s per epoch: {', '.join(f'{r:.0f}' for r in rates)}  ",
                f"median after the first epoch: **{statistics.median(rates[1:] or rates):.0f} "
                f"images/s**; final val_accuracy {float(epochs[-1]['val_accuracy']):.4f}", "")
    results.write(args.out)


if __name__ == "__main__":
    main()
