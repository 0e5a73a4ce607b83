"""The schema of a space file: the pydantic section models and the rules of each entry.

The fixed settings are ``data``, ``trial``, ``search`` and ``constraints`` (``*Section``
models); what is searched is ``model`` and ``train`` (:class:`ModelSpace`,
:class:`TrainSpace`), each entry a fixed value or a distribution (:class:`FloatDist`,
:class:`IntDist`, :class:`CategoricalDist`). ``_Spec`` says what one such entry accepts, and
``_values`` / ``_smallest`` / ``_show_entry`` read an entry. Every model is strict, frozen and
forbids unknown keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ALLOWED_LAYOUTS",
    "STAGES",
    "COST_METRICS",
    "QUALITY_METRICS",
    "AshaSection",
    "CategoricalDist",
    "ConstraintSection",
    "DataSection",
    "Dist",
    "FloatDist",
    "IntDist",
    "LatencySection",
    "ModelSpace",
    "ObjectiveEntry",
    "SearchSection",
    "StageEntries",
    "TrainSpace",
    "TrialSection",
]

ALLOWED_LAYOUTS = ("CCCC", "CCCT", "CCTT", "CTTT", "TTTT")
STAGES = ("s0", "s1", "s2", "s3", "s4")


# ---------------------------------------------------------------------------- sections
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataSection(_Strict):
    """Which data a trial trains on (``data:``)."""

    dataset: Literal["digits", "mnist5k", "cifar10", "cifar100", "imagefolder", "synthetic"]
    image_size: int = Field(ge=32)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # held out from every trial
    data_dir: str | None = None
    cache_dir: str | None = None
    path: str | None = None
    download: bool = False
    subset: int | None = Field(None, ge=1)
    num_classes: int | None = Field(None, ge=2)
    image_channel: int | None = Field(None, ge=1)
    num_samples: int | None = Field(None, ge=1)
    augment: bool = False


class TrialSection(_Strict):
    """How one trial runs (``trial:``): epochs, Ray Train workers and resources, checkpoints."""

    epochs: int = Field(ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(1, ge=0)
    num_data_workers: int = Field(0, ge=0)
    compile: bool = False
    keep_checkpoints: int = Field(2, ge=1)


class AshaSection(_Strict):
    """ASHA early stopping (``search.asha:``); ``epochs_done`` is the time attribute."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    brackets: int = Field(1, ge=1)


QUALITY_METRICS = ("val_accuracy", "val_loss", "train_loss")  # learned: early stopping ranks
COST_METRICS = ("params", "macs", "latency_ms")  # known before training, always minimised


class ObjectiveEntry(_Strict):
    """One entry of ``search.objectives``: a metric and its direction."""

    metric: Literal["val_accuracy", "val_loss", "train_loss", "params", "macs", "latency_ms"]
    mode: Literal["max", "min"]


class LatencySection(_Strict):
    """How ``latency_ms`` is measured once per candidate before it trains (``search.latency``):
    inference batches of ``batch_size`` on the trial's device with ``threads`` CPU threads,
    ``warmup`` untimed passes, the median of ``repeats`` timed ones."""

    batch_size: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(10, ge=1)


class SearchSection(_Strict):
    """The search loop (``search:``): what to optimise, how many samples, searcher, ASHA."""

    metric: Literal["val_accuracy", "val_loss", "train_loss"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0
    searcher: Literal["tpe", "random", "nsga2"] = "tpe"
    # accuracy versus cost: the first a quality metric, then costs (empty: metric and mode)
    objectives: list[ObjectiveEntry] = Field(default_factory=list)
    latency: LatencySection = Field(default_factory=LatencySection)
    n_startup_trials: int = Field(5, ge=0)
    # TPE with a cost objective: the random start spread over cost (space.cost_start)
    start: Literal["cost_spread", "random"] = "cost_spread"
    asha: AshaSection | None = Field(default_factory=AshaSection)  # null: no early stopping
    # configurations evaluated first (coatnet.search.space.warmstart); flat after loading
    enqueue: list[Any] = Field(default_factory=list)


class ConstraintSection(_Strict):
    """Budgets (``constraints:``); ``5e6``-style numbers are accepted and stored as ints."""

    max_params: int | None = Field(None, ge=1)
    max_macs: int | None = Field(None, ge=1)

    @field_validator("max_params", "max_macs", mode="before")
    @classmethod
    def _integral_float_to_int(cls, value: Any) -> Any:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return value


# ---------------------------------------------------------------------------- distributions
class FloatDist(_Strict):
    """``{type: float, low, high, step?, log?}`` -> ``trial.suggest_float``."""

    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0.0)
    log: bool = False


class IntDist(_Strict):
    """``{type: int, low, high, step?, log?}`` -> ``trial.suggest_int``."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False


Scalar = bool | int | float | str | None


class CategoricalDist(_Strict):
    """``{type: categorical, choices: [...]}`` -> ``trial.suggest_categorical``."""

    type: Literal["categorical"]
    choices: list[Scalar]


Dist = FloatDist | IntDist | CategoricalDist
_DIST_MODELS: dict[str, type[BaseModel]] = {
    "float": FloatDist, "int": IntDist, "categorical": CategoricalDist}


# ---------------------------------------------------------------------------- searched sections
class _Entries(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              arbitrary_types_allowed=True)


class StageEntries(_Entries):
    """One entry per stage S0 (stem) .. S4."""

    s0: Any
    s1: Any
    s2: Any
    s3: Any
    s4: Any

    def __getitem__(self, index: int) -> Any:
        return getattr(self, STAGES[index])


class ModelSpace(_Entries):
    """The architecture part of the space (``model:``); each value is fixed or a Dist."""

    layout: Any
    depth: StageEntries
    channels: StageEntries
    expand_scale: Any = 4
    head_dim: Any = 32
    ff_dropout: Any = 0.0
    attention_dropout: Any = 0.0
    path_dropout: Any = 0.0
    se_ratio: Any = 0.25
    ffn_expand_scale: Any = 4


class TrainSpace(_Entries):
    """The optimiser part of the space (``train:``); each value is fixed or a Dist."""

    lr: Any
    batch_size: Any
    weight_decay: Any = 0.05
    label_smoothing: Any = 0.0
    warmup_epochs: Any = 0


# ---------------------------------------------------------------------------- entry rules
@dataclass(frozen=True)
class _Spec:
    """What one ``model``/``train`` entry accepts."""

    kind: Literal["int", "float", "layout"]
    types: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    log_ok: bool = True

    def describe(self) -> str:
        if self.kind == "layout":
            return "a layout string, one of " + ", ".join(ALLOWED_LAYOUTS)
        noun = "an int" if self.kind == "int" else "a number"
        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f"{noun} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
        return noun

    def value_problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed here, or None."""
        if self.kind == "layout":
            return _layout_problem(value)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_number = is_int or (isinstance(value, float) and not isinstance(value, bool))
        if self.kind == "int" and not is_int:
            return f"{value!r} is not an int; allowed: {self.describe()}"
        if self.kind == "float" and not is_number:
            return f"{value!r} is not a number; allowed: {self.describe()}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value!r} is not finite; allowed: {self.describe()}"
        too_low = self.low is not None and (value < self.low or (self.low_open
                                                                 and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open
                                                                    and value == self.high))
        if too_low or too_high:
            return f"{value!r} is out of range; allowed: {self.describe()}"
        return None


_INT_ENTRY = ("int", "categorical")
_FLOAT_ENTRY = ("float", "categorical")
_DROPOUT = _Spec("float", _FLOAT_ENTRY, low=0.0, high=1.0, high_open=True)
_MODEL_SPECS: dict[str, _Spec] = {
    "layout": _Spec("layout", ("categorical",)),
    "depth": _Spec("int", _INT_ENTRY, low=1),
    "channels": _Spec("int", _INT_ENTRY, low=1, log_ok=False),
    "expand_scale": _Spec("int", _INT_ENTRY, low=1),
    "head_dim": _Spec("int", ("categorical",), low=1),
    "ff_dropout": _DROPOUT,
    "attention_dropout": _DROPOUT,
    "path_dropout": _DROPOUT,
    "se_ratio": _Spec("float", _FLOAT_ENTRY, low=0.0, high=1.0),
    "ffn_expand_scale": _Spec("int", _INT_ENTRY, low=1),
}
_TRAIN_SPECS: dict[str, _Spec] = {
    "lr": _Spec("float", _FLOAT_ENTRY, low=0.0, low_open=True),
    "weight_decay": _Spec("float", _FLOAT_ENTRY, low=0.0),
    "label_smoothing": _Spec("float", _FLOAT_ENTRY, low=0.0, high=1.0, high_open=True),
    "batch_size": _Spec("int", _INT_ENTRY, low=1),
    "warmup_epochs": _Spec("int", _INT_ENTRY, low=0),
}


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _layout_problem(value: Any) -> str | None:
    allowed = "allowed: " + ", ".join(ALLOWED_LAYOUTS)
    if not isinstance(value, str):
        return f"{value!r} is not a layout string; {allowed}"
    if len(value) != 4 or any(letter not in "CT" for letter in value):
        return (f"{value!r} is not a layout: write 4 letters, C (MBConv) or T (Transformer), "
                f"for stages S1..S4; {allowed}")
    if value not in ALLOWED_LAYOUTS:
        return (f"{value!r} puts a T stage before a C stage (every C stage must come before "
                f"every T stage); {allowed}")
    return None


# ---------------------------------------------------------------------------- reading entries
def _values(entry: Any) -> list[Any]:
    """Every value an int/str entry can take (fixed, categorical or an int grid)."""
    if isinstance(entry, CategoricalDist):
        return list(entry.choices)
    if isinstance(entry, IntDist):
        return list(range(entry.low, entry.high + 1, entry.step))
    if isinstance(entry, FloatDist):
        raise TypeError("a float distribution has no finite value list")
    return [entry]


def _smallest(entry: Any) -> Any:
    if isinstance(entry, (FloatDist, IntDist)):
        return entry.low
    return min(_values(entry))


def _show_entry(entry: Any) -> str:
    if isinstance(entry, IntDist):
        return f"{entry.low}..{entry.high} step {entry.step}"
    if isinstance(entry, CategoricalDist):
        return f"choices {entry.choices}"
    return f"fixed {entry!r}"
