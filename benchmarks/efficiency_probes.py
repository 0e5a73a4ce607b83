"""What ``search_efficiency.py`` records inside every trial: one JSON line per reported epoch.

The recorder wraps the train loop's reporter (``coatnet.search.train_loop.make_reporter``) in
the process that trains (a Tune trial actor, or the benchmark's own process for plain Optuna).
For each epoch it writes the time, the trial, the epoch, the validation accuracy the search
sees, the candidate's costs as the report carries them (``params``, ``macs``, ``latency_ms``
when measured: the multi-objective mode's cost axes) and the accuracy on the held-out test
split of that epoch's model (evaluated here, for the benchmark only: no trial and no searcher
ever sees it). Lines are written before the report goes on, since Tune may end the trial
inside its last report.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

COST_METRICS = ("params", "macs", "latency_ms")  # coatnet.search.space.schema.COST_METRICS


class RecordingReporter:
    """A train-loop reporter that first appends one line per epoch to ``sink``."""

    def __init__(self, inner: Any, *, sink: str, method: str, trial: str,
                 data: dict[str, Any], seed: int) -> None:
        self._inner, self._sink, self._method, self._trial = inner, sink, method, trial
        self._data, self._seed = data, seed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def report(self, metrics: dict[str, Any], *, state: dict[str, Any] | None,
               epoch: int) -> None:
        line = {"t": time.time(), "method": self._method, "trial": self._trial,
                "epoch": int(epoch), "pid": os.getpid(), "status": metrics.get("status"),
                "val_accuracy": metrics.get("val_accuracy"),
                **{cost: metrics.get(cost) for cost in COST_METRICS},
                "resumed": int(metrics.get("resumed_from_epoch") or 0) >= int(epoch),
                "test_accuracy": _test_accuracy(state, self._data, self._seed)}
        with open(self._sink, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        self._inner.report(metrics, state=state, epoch=epoch)


def _test_accuracy(state: dict[str, Any] | None, data: dict[str, Any],
                   seed: int) -> float | None:
    if state is None or "model" not in state:
        return None
    import torch
    from torch.utils.data import DataLoader

    from coatnet.search.data import load_splits
    from coatnet.search.train_loop import build_model, evaluate

    splits = load_splits(data, seed=seed)
    if splits.test is None:
        return None
    model = build_model(state["model_config"], splits.info)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        _, accuracy = evaluate(model, DataLoader(splits.test, batch_size=500),
                               torch.nn.CrossEntropyLoss(), device=torch.device("cpu"),
                               autocast=torch.autocast("cpu", enabled=False), world_size=1)
    return float(accuracy)


def install(*, sink: str, method: str, trial: str, data: dict[str, Any], seed: int,
            inner_factory: Any = None) -> None:
    """Make the loop's reporter factory record into ``sink`` (in this process)."""
    import coatnet.search.train_loop as tl

    original = getattr(tl.make_reporter, "_original", tl.make_reporter)
    factory = inner_factory or original

    def make(runtime: Any) -> Any:
        return RecordingReporter(factory(runtime), sink=sink, method=method, trial=trial,
                                 data=data, seed=seed)

    make._original = original  # type: ignore[attr-defined]
    tl.make_reporter = make


def recording_run_trial_for(*, sink: str, method: str) -> Any:
    """A stand-in for ``coatnet.search.trial.run_trial`` that records, then runs the real one
    (the sink path travels inside the function, pickled by value)."""

    def run_trial(config: dict[str, Any]) -> None:
        import ray.tune

        from coatnet.search.trial import run_trial as real

        context = ray.tune.get_context()
        install(sink=sink, method=method, trial=str(context.get_trial_id()),
                data=dict(config["data"]), seed=int(config.get("seed", 0)))
        real(config)

    return run_trial


def read(sink: str) -> list[dict[str, Any]]:
    """The sink's lines, in time order."""
    if not os.path.exists(sink):
        return []
    with open(sink) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return sorted(rows, key=lambda row: row["t"])
