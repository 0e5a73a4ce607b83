"""Whether a space can yield a candidate at all, and what its smallest candidates cost.

For each layout and head_dim, ``_min_candidates`` builds the smallest valid config (or says
why there is none). From them ``_check_buildable`` rejects layouts and head_dims that can never
be built, ``_check_budget`` rejects budgets no candidate meets, and ``_min_complexity`` gives
``SearchSpace.min_complexity``. The channel rules (``_allowed_channels``,
``_channel_problem``) are shared with sampling; ``_complexity`` counts params and MACs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coatnet.config import CoAtNetConfig
from coatnet.search.space.problems import _Problems
from coatnet.search.space.schema import (
    STAGES,
    ConstraintSection,
    ModelSpace,
    _show_entry,
    _smallest,
    _values,
)


@functools.lru_cache(maxsize=8192)
def _complexity(config: CoAtNetConfig) -> tuple[int, int]:
    """``(params, macs)``; dropout does not change either, so it is zeroed for the cache key."""
    from coatnet.complexity import count_params_and_macs

    key = config.replace(ff_dropout=0.0, attention_dropout=0.0, path_dropout=0.0)
    if key != config:
        return _complexity(key)
    result = count_params_and_macs(config)
    return int(result.params), int(result.macs)


# ---------------------------------------------------------------------------- channel rules
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


# ---------------------------------------------------------------------------- smallest candidates
@dataclass(frozen=True)
class _MinCandidate:
    layout: str
    head_dim: int | None
    config: CoAtNetConfig | None
    problem: tuple[int | None, str] | None  # (stage, why) when this layout/head_dim never builds


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


def _min_complexity(mins: list[_MinCandidate], *, path: Path) -> tuple[int, int]:
    """Smallest ``(params, macs)`` over the buildable ``mins`` (each minimised on its own)."""
    counted = [_complexity(c.config) for c in mins if c.config is not None]
    if not counted:
        raise ValueError(f"{path}: no candidate of this space can be built")
    return min(p for p, _ in counted), min(m for _, m in counted)


# ---------------------------------------------------------------------------- checks
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


def _check_budget(constraints: ConstraintSection, mins: list[_MinCandidate],
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
