"""Search-space files: strict loading, validation and define-by-run sampling.

A space file (``search_spaces/*.yaml``, every key documented in ``search_spaces/README.md``)
has the sections ``data``, ``trial``, ``search``, ``constraints`` (fixed settings, pydantic
models) and ``model``, ``train`` (what is searched: each entry a fixed value or a
distribution). :func:`load_space` checks everything before anything runs and reports every
problem at once in a :class:`SpaceError`. This module must not import Ray (directly or through
its imports) so that validating a file stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from coatnet.config import CoAtNetConfig
from coatnet.search.strict_yaml import StrictYAMLError, load_yaml

__all__ = [
    "ALLOWED_LAYOUTS",
    "CONSTRAINT_NAMES",
    "CategoricalDist",
    "ConstraintSettings",
    "DataSettings",
    "FloatDist",
    "IntDist",
    "ModelSpace",
    "SearchSettings",
    "SearchSpace",
    "SpaceError",
    "TrainSpace",
    "TrialSettings",
    "constraints_func",
    "dataset_facts",
    "load_space",
]

logger = logging.getLogger(__name__)

ALLOWED_LAYOUTS = ("CCCC", "CCCT", "CCTT", "CTTT", "TTTT")
STAGES = ("s0", "s1", "s2", "s3", "s4")
CONSTRAINT_NAMES = ("params", "macs", "valid")
_DATASET_FACTS = {"digits": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}
_SYNTHETIC_DEFAULTS = {"num_classes": 10, "image_channel": 3, "num_samples": 512}
_SYNTHETIC_ONLY = ("num_classes", "image_channel", "num_samples")
_METRIC_MODE = {"val_accuracy": "max", "val_loss": "min", "train_loss": "min"}
_ENV_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


class SpaceError(ValueError):
    """A space file is invalid; ``problems`` holds one ``<file>: <key.path>: <why>`` per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------- sections
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataSettings(_Strict):
    """Which data a trial trains on (``data:``)."""

    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"]
    image_size: int = Field(ge=32)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    data_dir: str | None = None
    cache_dir: str | None = None
    path: str | None = None
    download: bool = False
    subset: int | None = Field(None, ge=1)
    num_classes: int | None = Field(None, ge=2)
    image_channel: int | None = Field(None, ge=1)
    num_samples: int | None = Field(None, ge=1)
    augment: bool = False


class TrialSettings(_Strict):
    """How one trial runs (``trial:``): epochs, Ray Train workers and resources, checkpoints."""

    epochs: int = Field(ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_failures: int = Field(1, ge=0)
    num_data_workers: int = Field(0, ge=0)
    compile: bool = False
    keep_checkpoints: int = Field(2, ge=1)


class AshaSettings(_Strict):
    """ASHA early stopping (``search.asha:``); ``epochs_done`` is the time attribute."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    brackets: int = Field(1, ge=1)


class SearchSettings(_Strict):
    """The search loop (``search:``): what to optimise, how many samples, searcher, ASHA."""

    metric: Literal["val_accuracy", "val_loss", "train_loss"] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0
    searcher: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(5, ge=0)
    asha: AshaSettings = Field(default_factory=AshaSettings)


class ConstraintSettings(_Strict):
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


# ---------------------------------------------------------------------------- problems
class _Problems:
    """Collects ``(key.path, why)`` pairs; formats them with the file name."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, why: str) -> None:
        self.items.append((path, why))

    def __len__(self) -> int:
        return len(self.items)

    def from_pydantic(self, err: ValidationError, *, prefix: str,
                      model: type[BaseModel]) -> None:
        for item in err.errors():
            loc = item["loc"]
            path = _join(prefix, *loc)
            kind = item["type"]
            if kind == "extra_forbidden":
                keys = _fields_at(model, loc[:-1])
                why = "unknown key; allowed keys: " + ", ".join(keys)
            elif kind == "missing":
                why = "required key is missing"
            elif kind in ("model_type", "model_attributes_type", "dict_type"):
                why = f"must be a mapping of keys (got {item['input']!r})"
            else:
                why = f"{item['msg']} (got {item['input']!r})"
                if kind == "bool_type":
                    why += "; write true or false"
            self.add(path, why)

    def error(self) -> SpaceError:
        return SpaceError([f"{self.file}: {path}: {why}" for path, why in self.items])


def _join(*parts: Any) -> str:
    out = ""
    for part in parts:
        if part in ("", None):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) pydantic model reached by ``loc``."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return sorted(model.model_fields)


# ---------------------------------------------------------------------------- facts
def dataset_facts(data: DataSettings | Mapping[str, Any]) -> tuple[int, int]:
    """``(num_classes, image_channel)`` of a ``data`` section, without importing torchvision.

    imagefolder counts the class sub-folders of ``path/train`` (when ``path`` holds train/ and
    val/) or of ``path``.
    """
    get = data.get if isinstance(data, Mapping) else (lambda key: getattr(data, key))
    dataset = get("dataset")
    if dataset in _DATASET_FACTS:
        return _DATASET_FACTS[dataset]
    if dataset == "synthetic":
        classes = get("num_classes") or _SYNTHETIC_DEFAULTS["num_classes"]
        channels = get("image_channel") or _SYNTHETIC_DEFAULTS["image_channel"]
        return int(classes), int(channels)
    if dataset == "imagefolder":
        return len(_class_folders(Path(get("path")))), 3
    raise ValueError(f"unknown dataset {dataset!r}")


def _class_folders(root: Path) -> list[str]:
    # Same rule as coatnet.search.data: train/ is used only when train/ and val/ both exist.
    split = (root / "train").is_dir() and (root / "val").is_dir()
    base = root / "train" if split else root
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


@functools.lru_cache(maxsize=8192)
def _complexity(config: CoAtNetConfig) -> tuple[int, int]:
    """``(params, macs)``; dropout does not change either, so it is zeroed for the cache key."""
    from coatnet.complexity import count_params_and_macs

    key = config.replace(ff_dropout=0.0, attention_dropout=0.0, path_dropout=0.0)
    if key != config:
        return _complexity(key)
    result = count_params_and_macs(config)
    return int(result.params), int(result.macs)


# ---------------------------------------------------------------------------- sampling helpers
def _suggest(trial: Any, name: str, entry: Any, kind: str) -> Any:
    if isinstance(entry, FloatDist):
        return trial.suggest_float(name, entry.low, entry.high, step=entry.step, log=entry.log)
    if isinstance(entry, IntDist):
        return trial.suggest_int(name, entry.low, entry.high, step=entry.step, log=entry.log)
    value = trial.suggest_categorical(name, entry.choices) \
        if isinstance(entry, CategoricalDist) else entry
    return float(value) if kind == "float" else value


def _allowed_channels(entry: Any, *, prev: int, head_dim: int | None) -> list[int]:
    return [v for v in _values(entry)
            if v >= prev and (head_dim is None or v % head_dim == 0)]


def _channel_problem(stage: int, entry: Any, *, prev: int, head_dim: int | None) -> str:
    values = _values(entry)
    if not any(v >= prev for v in values):
        return (f"model.channels.s{stage} ({_show_entry(entry)}) has no value >= {prev}, "
                f"the channels of S{stage - 1} (channels must not decrease)")
    return (f"model.channels.s{stage} ({_show_entry(entry)}) has no value >= {prev} that is "
            f"divisible by head_dim {head_dim} (S{stage} is a T stage)")


def _suggest_channels(trial: Any, name: str, entry: Any, *, stage: int, prev: int,
                      head_dim: int | None) -> tuple[int, str | None]:
    """Sample one stage's channels so that the result is valid whenever that is possible.

    An int range is narrowed per trial to the values >= the previous stage's channels and, in a
    T stage, divisible by head_dim (an arithmetic progression, so still one suggest_int). A
    categorical entry cannot change its choices, so an invalid choice is reported instead.
    """
    allowed = _allowed_channels(entry, prev=prev, head_dim=head_dim)
    if isinstance(entry, IntDist) and allowed:
        step = allowed[1] - allowed[0] if len(allowed) > 1 else 1
        return trial.suggest_int(name, allowed[0], allowed[-1], step=step), None
    value = _suggest(trial, name, entry, "int")
    if value in allowed:
        return value, None
    if not allowed:
        return value, _channel_problem(stage, entry, prev=prev, head_dim=head_dim)
    if value < prev:
        return value, (f"model.channels.s{stage}={value} is below S{stage - 1}'s {prev} "
                       "(channels must not decrease)")
    return value, (f"model.channels.s{stage}={value} is not divisible by head_dim {head_dim} "
                   f"(S{stage} is a T stage)")


class _ReplayTrial:
    """Answers suggest_* from a dict of flat Optuna params (for candidate_from_params)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)
        self.user_attrs: dict[str, Any] = {}

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise KeyError(name)
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return float(self._get(name))

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return int(self._get(name))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        value = self._get(name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        return value

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def _constraint_values(*, params: int | None, macs: int | None, valid: bool,
                       constraints: ConstraintSettings) -> list[float]:
    """``[params, macs, valid]`` violations; <= 0 is feasible (Optuna's convention).

    Budgets are relative (``params / max_params - 1``) so both have the same scale.
    """
    def over(value: int | None, limit: int | None) -> float:
        if value is None or limit is None:
            return 0.0
        return float(value) / float(limit) - 1.0

    return [over(params, constraints.max_params), over(macs, constraints.max_macs),
            0.0 if valid else 1.0]


def constraints_func(frozen_trial: Any) -> list[float]:
    """Constraint values stored by ``SearchSpace.define_by_run`` (picklable, for TPESampler).

    Use as ``optuna.samplers.TPESampler(constraints_func=constraints_func)``. A trial without
    the attribute counts as feasible.
    """
    values = frozen_trial.user_attrs.get("constraint")
    if values is None:
        return [0.0] * len(CONSTRAINT_NAMES)
    return [float(v) for v in values]


# ---------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class _MinCandidate:
    layout: str
    head_dim: int | None
    config: CoAtNetConfig | None
    problem: tuple[int | None, str] | None  # (stage, why) when this layout/head_dim never builds


@dataclass(frozen=True, eq=False)
class SearchSpace:
    """A validated space file. Build with :func:`load_space`; never mutate (frozen)."""

    path: Path
    text: str
    sha256: str
    data: DataSettings
    trial: TrialSettings
    search: SearchSettings
    constraints: ConstraintSettings
    model: ModelSpace
    train: TrainSpace
    num_classes: int
    image_channel: int
    description: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ sampling
    def define_by_run(self, trial: Any, *, set_constraints: bool = False) -> dict[str, Any]:
        """Sample one candidate with ``trial.suggest_*`` (Ray's OptunaSearch space callable).

        Stores the constraint values (see :func:`constraints_func`) as the user attr
        ``constraint`` on the real Optuna trial (Ray wraps it in a captor that keeps it as
        ``ot_trial``). ``set_constraints=True`` also calls Optuna 5's ``trial.set_constraint``
        (then TPE needs no ``constraints_func``; don't use both or violations count twice).
        """
        candidate, values = self._candidate(trial)
        real = getattr(trial, "ot_trial", trial)
        real.set_user_attr("constraint", values)
        if set_constraints:
            for name, value in zip(CONSTRAINT_NAMES, values):
                real.set_constraint(name, value)
        return {"candidate": candidate}

    def candidate_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The candidate dict that ``define_by_run`` built from these flat Optuna params.

        Extra keys (e.g. a Tune config's ``candidate``) are ignored; a missing one raises
        ``ValueError``.
        """
        try:
            candidate, _ = self._candidate(_ReplayTrial(params))
        except KeyError as err:
            raise ValueError(f"params lack {err.args[0]!r}, which this space samples") from None
        return candidate

    def _candidate(self, trial: Any) -> tuple[dict[str, Any], list[float]]:
        kwargs, hparams, problems = self._sample(trial)
        model: dict[str, Any] | None = None
        params = macs = None
        if not problems:
            try:
                config = CoAtNetConfig(**kwargs)
            except ValueError as err:
                problems.append(str(err).replace("\n", " "))
            else:
                model = config.to_dict()
                try:
                    params, macs = _complexity(config)
                except Exception as err:  # noqa: BLE001 - one bad candidate must not stop a search
                    logger.warning("could not count params/MACs of %s: %s", config, err)
                    problems.append(f"could not count params/MACs: {err}")
                    model = None
        valid = model is not None
        if valid:
            limits = self.constraints
            if limits.max_params is not None and params > limits.max_params:
                problems.append(f"{params:,} params > max_params {limits.max_params:,}")
            if limits.max_macs is not None and macs > limits.max_macs:
                problems.append(f"{macs:,} MACs > max_macs {limits.max_macs:,}")
        candidate = {
            "model": model,
            "hparams": hparams,
            "params": params,
            "macs": macs,
            "infeasible_reason": "; ".join(problems) if problems else None,
        }
        values = _constraint_values(params=params, macs=macs, valid=valid,
                                    constraints=self.constraints)
        return candidate, values

    def _sample(self, trial: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Define-by-run sampling; returns CoAtNetConfig kwargs, hparams and problems."""
        m = self.model
        layout = _suggest(trial, "model.layout", m.layout, "layout")
        has_t, has_c = "T" in layout, "C" in layout
        head_dim = _suggest(trial, "model.head_dim", m.head_dim, "int") if has_t else None
        depths = [_suggest(trial, f"model.depth.{s}", m.depth[i], "int")
                  for i, s in enumerate(STAGES)]
        channels: list[int] = []
        problems: list[str] = []
        prev = 1
        for i, s in enumerate(STAGES):
            t_stage = i >= 1 and layout[i - 1] == "T"
            value, why = _suggest_channels(trial, f"model.channels.{s}", m.channels[i],
                                           stage=i, prev=prev,
                                           head_dim=head_dim if t_stage else None)
            channels.append(value)
            if why:
                problems.append(why)
            prev = max(prev, value)
        kwargs: dict[str, Any] = dict(
            image_height=self.data.image_size, image_width=self.data.image_size,
            image_channel=self.image_channel, num_classes=self.num_classes,
            num_blocks_in_layers=tuple(depths), block_type_in_layers=tuple(layout),
            num_channels_in_layers=tuple(channels), head_dim=head_dim)
        if has_c:
            kwargs["expand_scale_in_layers"] = _suggest(trial, "model.expand_scale",
                                                        m.expand_scale, "int")
            kwargs["se_ratio"] = _suggest(trial, "model.se_ratio", m.se_ratio, "float")
        if has_t:
            kwargs["ffn_expand_scale"] = _suggest(trial, "model.ffn_expand_scale",
                                                  m.ffn_expand_scale, "int")
            kwargs["attention_dropout"] = _suggest(trial, "model.attention_dropout",
                                                   m.attention_dropout, "float")
        kwargs["ff_dropout"] = _suggest(trial, "model.ff_dropout", m.ff_dropout, "float")
        kwargs["path_dropout"] = _suggest(trial, "model.path_dropout", m.path_dropout, "float")
        t = self.train
        hparams = {
            "lr": float(_suggest(trial, "train.lr", t.lr, "float")),
            "weight_decay": float(_suggest(trial, "train.weight_decay", t.weight_decay,
                                           "float")),
            "label_smoothing": float(_suggest(trial, "train.label_smoothing",
                                              t.label_smoothing, "float")),
            "batch_size": int(_suggest(trial, "train.batch_size", t.batch_size, "int")),
            "warmup_epochs": int(_suggest(trial, "train.warmup_epochs", t.warmup_epochs,
                                          "int")),
        }
        return kwargs, hparams, problems

    # ------------------------------------------------------------------ variants
    def with_overrides(self, *, num_samples: int | None = None,
                       max_concurrent_trials: int | None = None,
                       seed: int | None = None) -> SearchSpace:
        """The same space with command-line overrides of the ``search`` section (validated)."""
        changes = {k: v for k, v in dict(num_samples=num_samples,
                                        max_concurrent_trials=max_concurrent_trials,
                                        seed=seed).items() if v is not None}
        if not changes:
            return self
        merged = {**self.search.model_dump(), **changes}
        try:
            search = SearchSettings.model_validate(merged)
        except ValidationError as err:
            problems = _Problems(f"{self.path} (overrides)")
            problems.from_pydantic(err, prefix="search", model=SearchSettings)
            raise problems.error() from None
        return dataclasses.replace(self, search=search,
                                   overrides={**self.overrides, **changes})

    def smoke_test(self) -> SearchSpace:
        """A tiny run of the same space: <= 3 samples, 2 epochs, <= 256 images, <= 64 px.

        The model and train distributions stay the same (warm-up is capped at the epochs), so
        the smoke test exercises exactly the code paths of the real search.
        """
        epochs = min(self.trial.epochs, 2)
        data_changes: dict[str, Any] = {
            "subset": min(self.data.subset or 256, 256),
            "image_size": min(self.data.image_size, 64),
        }
        if self.data.dataset == "synthetic":
            data_changes["num_samples"] = min(self.data.num_samples or 256, 256)
        num_samples = min(self.search.num_samples, 3)
        search = self.search.model_copy(update={
            "num_samples": num_samples,
            "max_concurrent_trials": min(self.search.max_concurrent_trials or 2, 2),
            "n_startup_trials": min(self.search.n_startup_trials, num_samples),
            "asha": self.search.asha.model_copy(update={"grace_period": 1}),
        })
        train = self.train
        warmup = self.train.warmup_epochs
        if max(_values(warmup)) > epochs:
            train = train.model_copy(update={"warmup_epochs": min(_smallest(warmup), epochs)})
        return dataclasses.replace(
            self, data=self.data.model_copy(update=data_changes),
            trial=self.trial.model_copy(update={"epochs": epochs}),
            search=search, train=train, overrides={**self.overrides, "smoke_test": True})

    # ------------------------------------------------------------------ complexity
    def min_complexity(self) -> tuple[int, int]:
        """Smallest possible ``(params, macs)`` over the space (each minimised on its own)."""
        counted = [_complexity(c.config) for c in self._min_candidates if c.config is not None]
        if not counted:
            raise ValueError(f"{self.path}: no candidate of this space can be built")
        return min(p for p, _ in counted), min(m for _, m in counted)

    @functools.cached_property
    def _min_candidates(self) -> list[_MinCandidate]:
        return list(_min_candidates(self.model, image_size=self.data.image_size,
                                    num_classes=self.num_classes,
                                    image_channel=self.image_channel))


def _min_candidates(model: ModelSpace, *, image_size: int, num_classes: int,
                    image_channel: int) -> Iterator[_MinCandidate]:
    """For each layout and head_dim: the smallest valid config, or why there is none.

    Params and MACs grow with every depth, width and expansion, and a smaller stage width only
    widens the next stage's choices, so taking the smallest allowed value stage by stage gives
    the smallest config of that layout/head_dim (or proves there is none).
    """
    head_dims = sorted(set(_values(model.head_dim)))
    for layout in dict.fromkeys(_values(model.layout)):
        for head_dim in (head_dims if "T" in layout else [None]):
            channels: list[int] = []
            problem = None
            prev = 1
            for i in range(len(STAGES)):
                hd = head_dim if i >= 1 and layout[i - 1] == "T" else None
                allowed = _allowed_channels(model.channels[i], prev=prev, head_dim=hd)
                if not allowed:
                    problem = (i, _channel_problem(i, model.channels[i], prev=prev,
                                                   head_dim=hd))
                    break
                prev = min(allowed)
                channels.append(prev)
            config = None
            if problem is None:
                kwargs: dict[str, Any] = dict(
                    image_height=image_size, image_width=image_size,
                    image_channel=image_channel, num_classes=num_classes,
                    num_blocks_in_layers=tuple(_smallest(model.depth[i]) for i in range(5)),
                    block_type_in_layers=tuple(layout), num_channels_in_layers=tuple(channels),
                    head_dim=head_dim, expand_scale_in_layers=_smallest(model.expand_scale),
                    se_ratio=float(_smallest(model.se_ratio)),
                    ffn_expand_scale=_smallest(model.ffn_expand_scale))
                try:
                    config = CoAtNetConfig(**kwargs)
                except ValueError as err:
                    problem = (None, str(err).replace("\n", " "))
            yield _MinCandidate(layout, head_dim, config, problem)


# ---------------------------------------------------------------------------- loading
def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read, parse and validate a space file; raise :class:`SpaceError` listing every problem."""
    file = str(path)
    problems = _Problems(file)
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as err:
        raise SpaceError([f"{file}: (file): cannot read: {err.strerror or err}"]) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpaceError([f"{file}: (file): not UTF-8 text: {err}"]) from None
    try:
        doc = load_yaml(text)
    except StrictYAMLError as err:
        where = f"line {err.line}" if err.line else "(yaml)"
        raise SpaceError([f"{file}: {where}: {err.message}"]) from None
    except yaml.YAMLError as err:
        raise SpaceError([f"{file}: {_yaml_where(err)}: invalid YAML: {_yaml_why(err)}"]) \
            from None

    sections = {"data": DataSettings, "trial": TrialSettings, "search": SearchSettings,
                "constraints": ConstraintSettings, "model": ModelSpace, "train": TrainSpace}
    allowed_top = sorted([*sections, "description"])
    if not isinstance(doc, dict):
        raise SpaceError([f"{file}: (top level): must be a mapping with the sections "
                          f"{', '.join(allowed_top)} (got {type(doc).__name__})"])
    for key in doc:
        if key not in allowed_top:
            problems.add(_join(str(key)), "unknown key; allowed keys: " + ", ".join(allowed_top))
    for key in ("data", "trial", "search", "model", "train"):
        if key not in doc:
            problems.add(key, "required section is missing")
    description = doc.get("description")
    if description is not None and not isinstance(description, str):
        problems.add("description", f"must be a string (got {description!r})")

    settings: dict[str, BaseModel | None] = {}
    for name in ("data", "trial", "search", "constraints"):
        raw = doc.get(name, {} if name == "constraints" else None)
        if name not in doc and name != "constraints":
            settings[name] = None
            continue
        if raw is None and name == "constraints":
            raw = {}
        if not isinstance(raw, dict):
            problems.add(name, f"must be a mapping of keys (got {raw!r})")
            settings[name] = None
            continue
        try:
            settings[name] = sections[name].model_validate(raw)
        except ValidationError as err:
            problems.from_pydantic(err, prefix=name, model=sections[name])
            settings[name] = None

    model = _parse_entries(doc, "model", ModelSpace, _MODEL_SPECS, problems)
    train = _parse_entries(doc, "train", TrainSpace, _TRAIN_SPECS, problems)

    data = settings["data"]
    trial = settings["trial"]
    search = settings["search"]
    constraints = settings["constraints"]
    facts: tuple[int, int] | None = None
    if isinstance(data, DataSettings):
        data = _check_data(data, problems)
        if data is not None:
            facts = dataset_facts(data)
    if isinstance(search, SearchSettings):
        expected = _METRIC_MODE[search.metric]
        if search.mode != expected:
            problems.add("search.mode", f"{search.mode!r} with metric {search.metric!r} "
                         f"would keep the worst trials; use {expected!r}")
        if isinstance(trial, TrialSettings) and search.asha.grace_period > trial.epochs:
            problems.add("search.asha.grace_period",
                         f"{search.asha.grace_period} is more than trial.epochs "
                         f"({trial.epochs}); allowed: 1..{trial.epochs}")
    if isinstance(train, TrainSpace) and isinstance(trial, TrialSettings):
        most = max(_values(train.warmup_epochs))
        if most > trial.epochs:
            problems.add("train.warmup_epochs", f"can reach {most}, more than trial.epochs "
                         f"({trial.epochs}); allowed: 0..{trial.epochs}")

    if isinstance(model, ModelSpace) and facts is not None:
        mins = list(_min_candidates(model, image_size=data.image_size, num_classes=facts[0],
                                    image_channel=facts[1]))
        _check_buildable(model, mins, problems)
        if not problems and isinstance(constraints, ConstraintSettings):
            _check_budget(constraints, mins, problems)

    if problems:
        raise problems.error()
    assert facts is not None and data is not None
    assert isinstance(trial, TrialSettings) and isinstance(search, SearchSettings)
    assert isinstance(constraints, ConstraintSettings)
    return SearchSpace(
        path=Path(path), text=text, sha256=hashlib.sha256(raw_bytes).hexdigest(),
        data=data, trial=trial, search=search, constraints=constraints, model=model,
        train=train, num_classes=facts[0], image_channel=facts[1], description=description)


def _yaml_where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}" if mark is not None else "(yaml)"


def _yaml_why(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None:
        context = f"{context} at line {context_mark.line + 1}"
    if problem:
        return f"{context}, {problem}" if context else problem
    return str(err).replace("\n", " ")


def _parse_entries(doc: Mapping[str, Any], name: str, section: type[BaseModel],
                   specs: Mapping[str, _Spec], problems: _Problems) -> Any:
    """Validate a ``model``/``train`` section; return the pydantic model or None."""
    raw = doc.get(name)
    if name not in doc:
        return None
    if not isinstance(raw, dict):
        problems.add(name, f"must be a mapping of keys (got {raw!r})")
        return None
    before = len(problems)
    try:
        section.model_validate(raw)  # unknown / missing keys, non-mapping stage groups
    except ValidationError as err:
        problems.from_pydantic(err, prefix=name, model=section)
    parsed: dict[str, Any] = {}
    for key, spec in specs.items():
        if key not in raw:
            continue
        if key in ("depth", "channels"):
            group = raw[key]
            if not isinstance(group, dict):
                continue  # reported by pydantic
            parsed[key] = {s: _parse_entry(group[s], f"{name}.{key}.{s}", spec, problems)
                           for s in STAGES if s in group}
        else:
            parsed[key] = _parse_entry(raw[key], f"{name}.{key}", spec, problems)
    if len(problems) > before:
        return None
    return section.model_validate(parsed)


def _parse_entry(raw: Any, path: str, spec: _Spec, problems: _Problems) -> Any:
    """One ``model``/``train`` entry: a fixed value or a distribution mapping."""
    types = ", ".join(spec.types)
    if isinstance(raw, list):
        problems.add(path, "a list is not a value here; to search over values write "
                     "{type: categorical, choices: [...]}")
        return None
    if not isinstance(raw, dict):
        why = spec.value_problem(raw)
        if why:
            problems.add(path, why + f"; or a distribution {{type: {types.replace(', ', '|')}"
                         ", ...}")
        return raw
    dist_type = raw.get("type")
    if dist_type is None:
        problems.add(path, f"a distribution needs a 'type' key (allowed here: {types}); "
                     "or give a plain value")
        return None
    if dist_type not in _DIST_MODELS:
        problems.add(f"{path}.type", f"unknown distribution type {dist_type!r}; "
                     f"allowed here: {types}")
        return None
    if dist_type not in spec.types:
        problems.add(f"{path}.type", f"type {dist_type!r} is not allowed here; allowed here: "
                     f"{types} (values: {spec.describe()})")
        return None
    model = _DIST_MODELS[dist_type]
    try:
        dist = model.model_validate(raw)
    except ValidationError as err:
        problems.from_pydantic(err, prefix=path, model=model)
        return None
    before = len(problems)
    if isinstance(dist, CategoricalDist):
        if not dist.choices:
            problems.add(f"{path}.choices", "must list at least one value")
        for i, choice in enumerate(dist.choices):
            if any(type(s) is type(choice) and s == choice for s in dist.choices[:i]):
                problems.add(f"{path}.choices[{i}]", f"duplicate value {choice!r}")
            why = spec.value_problem(choice)
            if why:
                problems.add(f"{path}.choices[{i}]", why)
        return dist if len(problems) == before else None
    # float / int ranges
    if dist.low > dist.high:
        problems.add(path, f"low ({dist.low!r}) must be <= high ({dist.high!r})")
    if dist.log and not spec.log_ok:
        problems.add(f"{path}.log", "log is not supported here (widths are sampled on the "
                     "head_dim grid); use step instead")
    has_step = dist.step is not None and (isinstance(dist, FloatDist) or dist.step != 1)
    if dist.log and has_step:
        problems.add(path, "step and log cannot be combined (Optuna rejects it); drop one")
    elif dist.log and dist.low <= 0:
        problems.add(f"{path}.low", f"log: true needs low > 0 (got {dist.low!r})")
    if has_step and dist.low <= dist.high:
        span = (dist.high - dist.low) / dist.step
        if abs(span - round(span)) > 1e-9:
            problems.add(path, f"high - low ({dist.high - dist.low!r}) must be a multiple of "
                         f"step ({dist.step!r})")
    for end in ("low", "high"):
        why = spec.value_problem(getattr(dist, end))
        if why:
            problems.add(f"{path}.{end}", why)
    return dist if len(problems) == before else None


def _expand_path(value: str, key: str, problems: _Problems) -> str | None:
    for match in _ENV_VAR.finditer(value):
        var = match.group(1) or (match.group(2) or "").split(":-")[0]
        if var and var not in os.environ:
            problems.add(key, f"environment variable {var} (used in {value!r}) is not set")
            return None
    return os.path.abspath(os.path.expanduser(os.path.expandvars(value)))


def _check_data(data: DataSettings, problems: _Problems) -> DataSettings | None:
    """Dataset-specific rules; returns the section with paths expanded and defaults filled."""
    before = len(problems)
    changes: dict[str, Any] = {}
    if data.dataset != "synthetic":
        for key in _SYNTHETIC_ONLY:
            if getattr(data, key) is not None:
                problems.add(f"data.{key}", f"only allowed when dataset is 'synthetic' "
                             f"({data.dataset} fixes its classes, channels and size)")
    else:
        for key, default in _SYNTHETIC_DEFAULTS.items():
            if getattr(data, key) is None:
                changes[key] = default
    for key in ("data_dir", "cache_dir"):
        if getattr(data, key) is not None:
            expanded = _expand_path(getattr(data, key), f"data.{key}", problems)
            if expanded is not None:
                changes[key] = expanded
    if data.dataset == "imagefolder":
        if data.path is None:
            problems.add("data.path", "required when dataset is 'imagefolder' (a folder with "
                         "one sub-folder per class, or with train/ and val/ holding them)")
        else:
            expanded = _expand_path(data.path, "data.path", problems)
            if expanded is not None:
                root = Path(expanded)
                if not root.is_dir():
                    problems.add("data.path", f"{data.path!r} is not an existing folder")
                elif len(_class_folders(root)) < 2:
                    problems.add("data.path", f"{data.path!r} needs at least 2 class "
                                 "sub-folders (in it, or in its train/ folder)")
                else:
                    changes["path"] = expanded
    elif data.path is not None:
        problems.add("data.path", "only used when dataset is 'imagefolder'; use data_dir for "
                     "where a downloaded dataset lives")
    if len(problems) > before:
        return None
    return data.model_copy(update=changes) if changes else data


def _check_buildable(model: ModelSpace, mins: list[_MinCandidate], problems: _Problems) -> None:
    """Every layout and head_dim choice must yield at least one valid config."""
    by_layout: dict[str, list[_MinCandidate]] = {}
    for cand in mins:
        by_layout.setdefault(cand.layout, []).append(cand)
    good_head_dims = {c.head_dim for c in mins if c.config is not None}
    for layout, cands in by_layout.items():
        if any(c.config is not None for c in cands):
            continue
        stage, why = cands[0].problem  # type: ignore[misc]
        tried = [c.head_dim for c in cands if c.head_dim is not None]
        extra = f" (tried head_dim {', '.join(map(str, tried))})" if len(tried) > 1 else ""
        problems.add("model" if stage is None else f"model.channels.s{stage}",
                     f"layout {layout!r} can never be built: {why}{extra}")
    t_layouts = [lay for lay in by_layout if "T" in lay]
    buildable_t = [lay for lay in t_layouts
                   if any(c.config is not None for c in by_layout[lay])]
    if buildable_t:
        for head_dim in sorted(set(_values(model.head_dim))):
            if head_dim not in good_head_dims:
                problems.add("model.head_dim",
                             f"{head_dim} can never be used: no layout with a T stage has "
                             f"T-stage channels divisible by {head_dim}")


def _check_budget(constraints: ConstraintSettings, mins: list[_MinCandidate],
                  problems: _Problems) -> None:
    """At least one candidate must fit max_params and max_macs together."""
    if constraints.max_params is None and constraints.max_macs is None:
        return
    counted: list[tuple[int, int, CoAtNetConfig]] = []
    for cand in mins:
        if cand.config is None:
            continue
        params, macs = _complexity(cand.config)
        if (constraints.max_params is None or params <= constraints.max_params) and \
                (constraints.max_macs is None or macs <= constraints.max_macs):
            return
        counted.append((params, macs, cand.config))
    if not counted:
        return

    def show(cfg: CoAtNetConfig) -> str:
        return (f"layout {''.join(cfg.block_type_in_layers)}, depth "
                f"{list(cfg.num_blocks_in_layers)}, channels {list(cfg.num_channels_in_layers)}")

    min_params = min(counted, key=lambda c: c[0])
    min_macs = min(counted, key=lambda c: c[1])
    reported = False
    if constraints.max_params is not None and min_params[0] > constraints.max_params:
        problems.add("constraints.max_params",
                     f"no candidate can meet max_params={constraints.max_params:,}: the "
                     f"smallest candidate has {min_params[0]:,} params ({show(min_params[2])})")
        reported = True
    if constraints.max_macs is not None and min_macs[1] > constraints.max_macs:
        problems.add("constraints.max_macs",
                     f"no candidate can meet max_macs={constraints.max_macs:,}: the smallest "
                     f"candidate has {min_macs[1]:,} MACs ({show(min_macs[2])})")
        reported = True
    if not reported:
        problems.add("constraints",
                     f"no candidate meets max_params={constraints.max_params:,} and "
                     f"max_macs={constraints.max_macs:,} together: the fewest params are "
                     f"{min_params[0]:,} (with {min_params[1]:,} MACs), the fewest MACs are "
                     f"{min_macs[1]:,} (with {min_macs[0]:,} params)")
