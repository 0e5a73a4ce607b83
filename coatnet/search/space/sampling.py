"""Define-by-run sampling: one :class:`~coatnet.search.contracts.Candidate` per Optuna trial.

``_sample_candidate`` asks ``trial.suggest_*`` for every entry in a fixed order (TPE depends
on it): the layout, head_dim (T layouts only), depths, channels, the block-type parameters,
dropouts, then the ``train`` entries; parameter names are the key paths (``model.depth.s1``).
Channels are narrowed per trial so that they stay valid where that is possible. The result
carries its params/MACs and constraint values ``[params, macs, valid]`` (<= 0 is feasible),
which :func:`constraints_func` hands to TPE. ``_ReplayTrial`` replays flat params.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from coatnet.config import CoAtNetConfig
from coatnet.search.contracts import Candidate, Hyperparameters
from coatnet.search.space.feasibility import _allowed_channels, _channel_problem, _complexity
from coatnet.search.space.schema import (
    STAGES,
    CategoricalDist,
    ConstraintSection,
    FloatDist,
    IntDist,
    ModelSpace,
    TrainSpace,
)

__all__ = ["CONSTRAINT_NAMES", "constraints_func", "scratch_study"]

logger = logging.getLogger(__name__)

CONSTRAINT_NAMES = ("params", "macs", "valid")


# ---------------------------------------------------------------------------- one entry
def _suggest(trial: Any, name: str, entry: Any, kind: str) -> Any:
    if isinstance(entry, FloatDist):
        return trial.suggest_float(name, entry.low, entry.high, step=entry.step, log=entry.log)
    if isinstance(entry, IntDist):
        return trial.suggest_int(name, entry.low, entry.high, step=entry.step, log=entry.log)
    value = trial.suggest_categorical(name, entry.choices) \
        if isinstance(entry, CategoricalDist) else entry
    return float(value) if kind == "float" else value


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


# ---------------------------------------------------------------------------- one candidate
def _sample_candidate(trial: Any, *, model: ModelSpace, train: TrainSpace,
                      constraints: ConstraintSection, image_size: int, num_classes: int,
                      image_channel: int) -> tuple[Candidate, list[float]]:
    """Sample one candidate; returns it and its constraint values."""
    kwargs, problems = _sample_model(trial, model, image_size=image_size,
                                     num_classes=num_classes, image_channel=image_channel)
    hparams = _sample_hparams(trial, train)
    config_dict: dict[str, Any] | None = None
    params = macs = None
    if not problems:
        try:
            config = CoAtNetConfig(**kwargs)
        except ValueError as err:
            problems.append(str(err).replace("\n", " "))
        else:
            config_dict = config.to_dict()
            try:
                params, macs = _complexity(config)
            except Exception as err:  # noqa: BLE001 - one bad candidate must not stop a search
                logger.warning("could not count params/MACs of %s: %s", config, err)
                problems.append(f"could not count params/MACs: {err}")
                config_dict = None
    valid = config_dict is not None
    if valid:
        if constraints.max_params is not None and params > constraints.max_params:
            problems.append(f"{params:,} params > max_params {constraints.max_params:,}")
        if constraints.max_macs is not None and macs > constraints.max_macs:
            problems.append(f"{macs:,} MACs > max_macs {constraints.max_macs:,}")
    candidate = Candidate(model=config_dict, hparams=hparams, params=params, macs=macs,
                          infeasible_reason="; ".join(problems) if problems else None)
    values = _constraint_values(params=params, macs=macs, valid=valid, constraints=constraints)
    return candidate, values


def _sample_model(trial: Any, m: ModelSpace, *, image_size: int, num_classes: int,
                  image_channel: int) -> tuple[dict[str, Any], list[str]]:
    """The ``model`` entries; returns CoAtNetConfig kwargs and the problems found."""
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
        image_height=image_size, image_width=image_size,
        image_channel=image_channel, num_classes=num_classes,
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
    return kwargs, problems


def _sample_hparams(trial: Any, t: TrainSpace) -> Hyperparameters:
    """The ``train`` entries, in the order lr, weight_decay, label_smoothing, batch_size,
    warmup_epochs."""
    return Hyperparameters(
        lr=float(_suggest(trial, "train.lr", t.lr, "float")),
        weight_decay=float(_suggest(trial, "train.weight_decay", t.weight_decay, "float")),
        label_smoothing=float(_suggest(trial, "train.label_smoothing", t.label_smoothing,
                                       "float")),
        batch_size=int(_suggest(trial, "train.batch_size", t.batch_size, "int")),
        warmup_epochs=int(_suggest(trial, "train.warmup_epochs", t.warmup_epochs, "int")),
    )


# ---------------------------------------------------------------------------- replay
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


# ---------------------------------------------------------------------------- constraints
def _constraint_values(*, params: int | None, macs: int | None, valid: bool,
                       constraints: ConstraintSection) -> list[float]:
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


def scratch_study(**kwargs: Any) -> Any:
    """A throwaway in-memory ``optuna.create_study(**kwargs)``, made without Optuna's "A new
    study created in memory" line on the screen."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(**kwargs)
    finally:
        optuna.logging.set_verbosity(verbosity)
