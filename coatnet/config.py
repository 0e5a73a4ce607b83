"""CoAtNet configuration: an immutable, validated description of one architecture.

The model only reads a config, never changes it, so a search result can be stored as a plain
dict (``to_dict``), written to YAML and turned back into the same model with ``from_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

BLOCK_TYPES = ("C", "T")
MIN_IMAGE_SIDE = 32
NUM_STAGES = 5  # S0 (stem) .. S4
NUM_BLOCK_STAGES = 4  # S1 .. S4 carry a block type
DEFAULT_HEAD_DIM = 32  # the paper's head size


def _activation_exists(name: str) -> bool:
    attr = getattr(nn, name, None)
    return isinstance(attr, type) and issubclass(attr, nn.Module)


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CoAtNetConfig:
    """One CoAtNet architecture. Lists are stored as tuples; all rules are checked at once.

    ``num_blocks_in_layers`` and ``num_channels_in_layers`` cover S0..S4 (S0 is the stem, its
    "blocks" are its 3x3 convs), ``block_type_in_layers`` covers S1..S4 with 'C' (MBConv) or 'T'
    (relative-attention Transformer). Attention width is set by ``head_dim`` (the paper's head
    size, 32 by default) or by ``heads`` (the seed's number of heads per T stage), not both.
    """

    image_height: int = 224
    image_width: int = 224
    image_channel: int = 3
    num_blocks_in_layers: tuple[int, ...] = (2, 2, 3, 5, 2)
    block_type_in_layers: tuple[str, ...] = ("C", "C", "T", "T")
    num_channels_in_layers: tuple[int, ...] = (64, 96, 192, 384, 768)
    expand_scale_in_layers: int | tuple[int, ...] = 4
    heads: int | None = None
    head_dim: int | None = None
    num_classes: int = 1000
    pred_act_func_name: str | None = None
    pred_hidden_dim: int | None = None
    ff_dropout: float = 0.0
    attention_dropout: float = 0.0
    path_dropout: float = 0.0
    se_ratio: float = 0.25
    ffn_expand_scale: int = 4

    def __post_init__(self) -> None:
        for name in ("num_blocks_in_layers", "block_type_in_layers", "num_channels_in_layers",
                     "expand_scale_in_layers"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if self.heads is None and self.head_dim is None:
            object.__setattr__(self, "head_dim", DEFAULT_HEAD_DIM)
        problems = config_problems(self)
        if problems:
            raise ValueError("Invalid CoAtNetConfig:\n  - " + "\n  - ".join(problems))

    # ------------------------------------------------------------------ derived values
    @property
    def expand_scales(self) -> tuple[int, ...]:
        """MBConv expansion per S1..S4 stage."""
        if isinstance(self.expand_scale_in_layers, tuple):
            return self.expand_scale_in_layers
        return (self.expand_scale_in_layers,) * NUM_BLOCK_STAGES

    def heads_for(self, channels: int) -> int:
        """Number of attention heads in a T stage with ``channels`` channels."""
        if self.heads is not None:
            return self.heads
        return channels // self.head_dim

    # ------------------------------------------------------------------ round trips
    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-friendly dict (lists, not tuples)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CoAtNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Invalid CoAtNetConfig: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> CoAtNetConfig:
        """Load a config from a YAML file, e.g. a search's ``best_config.yaml``."""
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
            data = data["model"]  # best_config.yaml keeps the model under `model:`
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of CoAtNetConfig fields")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> CoAtNetConfig:
        return dataclasses.replace(self, **changes)


def config_problems(cfg: CoAtNetConfig) -> list[str]:
    """Every rule a config breaks, as messages naming the field, the value and what is allowed."""
    problems: list[str] = []

    def check_positive_int(name: str, value: Any) -> bool:
        if not _is_int(value) or value < 1:
            problems.append(f"{name}={value!r}: must be a positive int")
            return False
        return True

    for name in ("image_height", "image_width"):
        value = getattr(cfg, name)
        if check_positive_int(name, value) and value < MIN_IMAGE_SIDE:
            problems.append(f"{name}={value!r}: must be at least {MIN_IMAGE_SIDE}")
    check_positive_int("image_channel", cfg.image_channel)
    check_positive_int("num_classes", cfg.num_classes)
    check_positive_int("ffn_expand_scale", cfg.ffn_expand_scale)

    def check_list(name: str, value: Any, length: int) -> bool:
        if not isinstance(value, tuple) or len(value) != length:
            problems.append(f"{name}={_show(value)}: must be a list of {length} values")
            return False
        return True

    blocks_ok = check_list("num_blocks_in_layers", cfg.num_blocks_in_layers, NUM_STAGES)
    if blocks_ok and not all(_is_int(v) and v >= 1 for v in cfg.num_blocks_in_layers):
        problems.append(f"num_blocks_in_layers={_show(cfg.num_blocks_in_layers)}: "
                        "every entry must be a positive int")
        blocks_ok = False
    types_ok = check_list("block_type_in_layers", cfg.block_type_in_layers, NUM_BLOCK_STAGES)
    if types_ok and not all(t in BLOCK_TYPES for t in cfg.block_type_in_layers):
        problems.append(f"block_type_in_layers={_show(cfg.block_type_in_layers)}: "
                        f"every entry must be one of {list(BLOCK_TYPES)}")
        types_ok = False
    channels_ok = check_list("num_channels_in_layers", cfg.num_channels_in_layers, NUM_STAGES)
    if channels_ok and not all(_is_int(v) and v >= 1 for v in cfg.num_channels_in_layers):
        problems.append(f"num_channels_in_layers={_show(cfg.num_channels_in_layers)}: "
                        "every entry must be a positive int")
        channels_ok = False

    expand = cfg.expand_scale_in_layers
    if isinstance(expand, tuple):
        if len(expand) != NUM_BLOCK_STAGES or not all(_is_int(v) and v >= 1 for v in expand):
            problems.append(f"expand_scale_in_layers={_show(expand)}: must be a positive int "
                            f"or a list of {NUM_BLOCK_STAGES} positive ints")
    elif not _is_int(expand) or expand < 1:
        problems.append(f"expand_scale_in_layers={expand!r}: must be a positive int "
                        f"or a list of {NUM_BLOCK_STAGES} positive ints")

    width_ok = True
    if cfg.heads is not None and cfg.head_dim is not None:
        problems.append(f"heads={cfg.heads!r} and head_dim={cfg.head_dim!r}: give only one "
                        "(heads = number of heads, head_dim = channels per head)")
        width_ok = False
    elif cfg.heads is not None:
        width_ok = check_positive_int("heads", cfg.heads)
    else:
        width_ok = check_positive_int("head_dim", cfg.head_dim)

    if types_ok and channels_ok and width_ok:
        for stage, block_type in enumerate(cfg.block_type_in_layers, start=1):
            channels = cfg.num_channels_in_layers[stage]
            if block_type != "T":
                continue
            if cfg.heads is not None and channels % cfg.heads:
                problems.append(f"num_channels_in_layers[{stage}]={channels}: a T stage's "
                                f"channels must be divisible by heads={cfg.heads}")
            if cfg.head_dim is not None and channels % cfg.head_dim:
                problems.append(f"num_channels_in_layers[{stage}]={channels}: a T stage's "
                                f"channels must be divisible by head_dim={cfg.head_dim}")

    for name in ("ff_dropout", "attention_dropout", "path_dropout"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.0 <= value < 1.0:
            problems.append(f"{name}={value!r}: must be a number in [0, 1)")
    if isinstance(cfg.se_ratio, bool) or not isinstance(cfg.se_ratio, (int, float)) \
            or not 0.0 <= cfg.se_ratio <= 1.0:
        problems.append(f"se_ratio={cfg.se_ratio!r}: must be a number in [0, 1]")

    if cfg.pred_act_func_name is not None and (
            not isinstance(cfg.pred_act_func_name, str)
            or not _activation_exists(cfg.pred_act_func_name)):
        problems.append(f"pred_act_func_name={cfg.pred_act_func_name!r}: must name an "
                        "activation class in torch.nn, e.g. 'ReLU', 'GELU', 'SiLU', 'Tanh'")
    if cfg.pred_hidden_dim is not None:
        check_positive_int("pred_hidden_dim", cfg.pred_hidden_dim)
    return problems


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


class CoAtNet:
    """The paper's presets (Table 3): ``CoAtNet.CoAtNet_0()`` .. ``CoAtNet.CoAtNet_4()``.

    Every preset takes only optional keywords, e.g. ``CoAtNet.CoAtNet_2(num_classes=10)`` or
    ``CoAtNet.CoAtNet_0(image_height=384, image_width=384)``.
    """

    _SMALL_DEPTHS = (2, 2, 6, 14, 2)

    @staticmethod
    def _preset(blocks: tuple[int, ...], channels: tuple[int, ...],
                **overrides: Any) -> CoAtNetConfig:
        base = dict(num_blocks_in_layers=blocks, num_channels_in_layers=channels,
                    block_type_in_layers=("C", "C", "T", "T"), expand_scale_in_layers=4)
        base.update(overrides)
        return CoAtNetConfig(**base)

    @staticmethod
    def CoAtNet_0(**overrides: Any) -> CoAtNetConfig:
        return CoAtNet._preset((2, 2, 3, 5, 2), (64, 96, 192, 384, 768), **overrides)

    @staticmethod
    def CoAtNet_1(**overrides: Any) -> CoAtNetConfig:
        return CoAtNet._preset((2, 2, 6, 14, 2), (64, 96, 192, 384, 768), **overrides)

    @staticmethod
    def CoAtNet_2(**overrides: Any) -> CoAtNetConfig:
        return CoAtNet._preset((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024), **overrides)

    @staticmethod
    def CoAtNet_3(**overrides: Any) -> CoAtNetConfig:
        return CoAtNet._preset((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536), **overrides)

    @staticmethod
    def CoAtNet_4(**overrides: Any) -> CoAtNetConfig:
        return CoAtNet._preset((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536), **overrides)

    PRESETS = ("CoAtNet_0", "CoAtNet_1", "CoAtNet_2", "CoAtNet_3", "CoAtNet_4")

    @staticmethod
    def by_name(name: str, **overrides: Any) -> CoAtNetConfig:
        if name not in CoAtNet.PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {list(CoAtNet.PRESETS)}")
        return getattr(CoAtNet, name)(**overrides)


__all__ = ["CoAtNetConfig", "CoAtNet", "config_problems", "BLOCK_TYPES", "DEFAULT_HEAD_DIM"]
