"""``search.enqueue``: known configurations a search evaluates first (Optuna's enqueue).

Each entry is a partial dict of the space's sampled keys, nested as in the space file
(``{model: {layout: CCTT}, train: {lr: 0.003}}``) or flat as Optuna names them
(``{"model.layout": "CCTT", "train.lr": 0.003}``); keys left out are sampled as usual. An entry
is checked against the space by running the space's own sampling over it: every key must be a
parameter the space samples for that configuration, every value inside its range or choices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from coatnet.search.space.problems import _Problems


def flatten_entry(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{model: {depth: {s1: 2}}}`` -> ``{"model.depth.s1": 2}`` (flat keys stay as they are)."""
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_entry(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


class _CheckingTrial:
    """Answers suggest_* with an entry's value where it has one (checking it against the
    distribution asked for) and the distribution's low end or first choice elsewhere."""

    def __init__(self, entry: Mapping[str, Any], *, where: str, problems: _Problems) -> None:
        self.entry, self.where, self.problems = dict(entry), where, problems
        self.asked: list[str] = []

    def _bad(self, name: str, why: str) -> None:
        self.problems.add(f"{self.where}.{name}", why)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        self.asked.append(name)
        if name not in self.entry:
            return float(low)
        value = self.entry[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not low <= value <= high:
            self._bad(name, f"{value!r} is outside the space's range [{low}, {high}]")
            return float(low)
        return float(value)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int:
        self.asked.append(name)
        if name not in self.entry:
            return int(low)
        value = self.entry[name]
        step = step or 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high \
                or (value - low) % step:
            allowed = f"an int in [{low}, {high}]" + (f" in steps of {step}" if step > 1 else "")
            self._bad(name, f"{value!r} is not allowed here: must be {allowed}")
            return int(low)
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        self.asked.append(name)
        if name not in self.entry:
            return choices[0]
        value = self.entry[name]
        if value not in list(choices):
            self._bad(name, f"{value!r} is not one of the space's choices {list(choices)}")
            return choices[0]
        return value

    def set_user_attr(self, key: str, value: Any) -> None:
        pass


def check_enqueue(entries: Sequence[Any], *, sample: Any,
                  problems: _Problems) -> list[dict[str, Any]]:
    """The entries as flat Optuna params, each checked with ``sample(trial)`` (the space's
    sampling); problems name ``search.enqueue[i].<key>`` and what is allowed."""
    flat_entries: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        where = f"search.enqueue[{index}]"
        if not isinstance(entry, Mapping) or not entry:
            problems.add(where, "must be a non-empty mapping of sampled keys to values, e.g. "
                         "{model: {layout: CCTT}, train: {lr: 0.003}}")
            continue
        flat = flatten_entry(entry)
        trial = _CheckingTrial(flat, where=where, problems=problems)
        sample(trial)
        unknown = sorted(set(flat) - set(trial.asked))
        for name in unknown:
            problems.add(f"{where}.{name}", "not a parameter this space samples for this "
                         "configuration (fixed in the space, misspelt, or not used by its "
                         "layout); sampled here: " + ", ".join(trial.asked))
        flat_entries.append(flat)
    return flat_entries
