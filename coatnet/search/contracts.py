"""The typed contracts that cross the Ray boundary, as frozen dataclasses.

Data flows one way through them:

    space sampling ──Candidate──► Tune trial config ──► run_trial ──LoopConfig──► train loop
                                                                                    │
    tracking, progress, results ◄──────────── EpochReport (as Tune's metrics dict) ─┘

Ray and Optuna only carry plain dicts (Tune's ``param_space`` and trial config, Train's
``train_loop_config``, ``ray.tune.report``), so each type converts with ``to_dict`` /
``from_dict`` exactly there and nowhere else; a misspelt key then fails at the boundary, on the
driver, with the key named, instead of deep inside a worker. This module imports nothing of the
project and no Ray, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")

REPORT_TO_TUNE = "tune"  # in-process trial: the loop reports straight to Tune
REPORT_TO_TRAIN = "train"  # a Ray Train worker (group): the loop reports to Train


def _from_mapping(cls: type[_T], data: Mapping[str, Any], *, what: str) -> _T:
    """``cls(**data)``, refusing keys ``cls`` does not have (named, with the allowed ones)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(sorted(names))}")
    return cls(**data)


@dataclass(frozen=True)
class Hyperparameters:
    """The training hyperparameters of one candidate (the space's ``train:`` section)."""

    lr: float
    weight_decay: float
    label_smoothing: float
    batch_size: int
    warmup_epochs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hyperparameters:
        return _from_mapping(cls, data, what="hparams")


@dataclass(frozen=True)
class Candidate:
    """One sampled point of the space: the model, its hyperparameters and its static cost.

    ``model`` is ``CoAtNetConfig.to_dict()`` (None when the sample breaks a CoAtNet rule);
    a set ``infeasible_reason`` means the candidate never trains.
    """

    model: Mapping[str, Any] | None
    hparams: Hyperparameters
    params: int | None = None
    macs: int | None = None
    infeasible_reason: str | None = None

    @property
    def feasible(self) -> bool:
        return not self.infeasible_reason

    def to_dict(self) -> dict[str, Any]:
        return {"model": None if self.model is None else dict(self.model),
                "hparams": self.hparams.to_dict(), "params": self.params, "macs": self.macs,
                "infeasible_reason": self.infeasible_reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        fields = dict(data)
        fields["hparams"] = Hyperparameters.from_dict(fields.get("hparams") or {})
        return _from_mapping(cls, fields, what="candidate")


@dataclass(frozen=True)
class TrialSettings:
    """How one trial runs: epochs, Ray Train workers and resources, retries, checkpoints.

    The defaults are those of a trial config that leaves a key out; a space file's ``trial:``
    section (``coatnet.search.space.schema.TrialSection``) always sets every key.
    """

    epochs: int = 1
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    num_data_workers: int = 0
    compile: bool = False
    keep_checkpoints: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrialSettings:
        """Missing or ``None`` values take the defaults."""
        return _from_mapping(cls, {k: v for k, v in (data or {}).items() if v is not None},
                             what="trial")


@dataclass(frozen=True)
class LoopRuntime:
    """What ``run_trial`` tells the loop about where it runs (not part of the search space)."""

    report_to: str = REPORT_TO_TRAIN  # REPORT_TO_TUNE or REPORT_TO_TRAIN
    resume_from: str | None = None  # a checkpoint dir, or a dir of epoch_* checkpoints
    local_checkpoint_dir: str | None = None  # keep the latest checkpoints here too
    started_at: float | None = None  # time.time() when the trial started (startup_s)
    # a checkpoint dir whose model weights (only) start the run: a fine-tune at a new size
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.report_to not in (REPORT_TO_TUNE, REPORT_TO_TRAIN):
            raise ValueError(f"runtime.report_to={self.report_to!r}: must be "
                             f"{REPORT_TO_TRAIN!r} or {REPORT_TO_TUNE!r}")


@dataclass(frozen=True)
class LoopConfig:
    """The per-worker loop config (``TorchTrainer(train_loop_config=loop.to_dict())``).

    ``data`` is the validated ``data:`` section as a dict (``coatnet.search.data`` reads it);
    ``macs`` is merged into every report; ``faults`` is the test-only fault plan
    (``coatnet.search.faults``), None outside the test suite; ``latency`` is the space's
    ``search.latency`` (batch_size, threads, warmup, repeats): the loop measures
    ``latency_ms`` once, before the first epoch, and merges it into every report.
    """

    model: Mapping[str, Any]
    hparams: Hyperparameters
    data: Mapping[str, Any]
    trial: TrialSettings = field(default_factory=TrialSettings)
    seed: int = 0
    macs: int | None = None
    faults: Mapping[str, Any] | None = None
    runtime: LoopRuntime = field(default_factory=LoopRuntime)
    latency: Mapping[str, Any] | None = None  # search.latency; None: latency not measured

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "hparams": self.hparams.to_dict(),
                "data": dict(self.data), "trial": self.trial.to_dict(), "seed": self.seed,
                "macs": self.macs, "faults": None if self.faults is None else dict(self.faults),
                "runtime": dataclasses.asdict(self.runtime),
                "latency": None if self.latency is None else dict(self.latency)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopConfig:
        fields = dict(data)
        fields["hparams"] = Hyperparameters.from_dict(fields.get("hparams") or {})
        fields["trial"] = TrialSettings.from_dict(fields.get("trial"))
        fields["runtime"] = _from_mapping(LoopRuntime, fields.get("runtime") or {},
                                          what="runtime")
        return _from_mapping(cls, fields, what="loop config")


STATUS_RUNNING = "running"
STATUS_DIVERGED = "diverged"
STATUS_INFEASIBLE = "infeasible"


@dataclass(frozen=True)
class EpochReport:
    """What every trial reports to Tune: every epoch, and once for an infeasible candidate.

    ``epochs_done`` is ASHA's time attribute. A diverged trial reports ``val_accuracy = 0.0``
    and finite stand-ins (``1e6``) for the losses; an infeasible one ``epochs_done = 0``.
    """

    train_loss: float
    val_loss: float
    val_accuracy: float
    epochs_done: int
    images_per_s: float
    epoch_time_s: float
    status: str  # STATUS_RUNNING | STATUS_DIVERGED | STATUS_INFEASIBLE
    params: int | None
    macs: int | None
    node_id: str
    device: str
    lr: float | None = None
    world_size: int = 1
    resumed_from_epoch: int = 0
    startup_s: float | None = None
    infeasible_reason: str | None = None
    latency_ms: float | None = None  # inference latency, measured once before training
    latency_device: str | None = None  # where latency_ms was measured

    def to_metrics(self) -> dict[str, Any]:
        """The dict for ``ray.tune.report`` / ``ray.train.report`` (unset optionals left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> EpochReport:
        """From a Tune result (Tune's own keys such as ``trial_id`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in metrics.items() if k in names})
