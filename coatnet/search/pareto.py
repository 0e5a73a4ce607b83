"""Accuracy versus cost: dominance, non-dominated ranks, the Pareto front and its hypervolume.

Pure functions over points (one tuple of objective values per trial) and their ``modes``
(``"max"`` or ``"min"`` per objective): what the search's front, its early stopping across
objectives (``coatnet.search.schedulers``) and the benchmark's hypervolume all share.
Every point is compared as given; a point with a missing or non-finite value is never on a
front and dominates nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Objective", "dominates", "hypervolume", "non_dominated_ranks", "pareto_front"]

Mode = Literal["max", "min"]
Point = Sequence[float | None]


@dataclass(frozen=True)
class Objective:
    """One objective of a search: a result metric and whether it is maximised or minimised."""

    metric: str
    mode: Mode


def _valid(point: Point) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in point)


def _as_min(point: Point, modes: Sequence[Mode]) -> tuple[float, ...]:
    return tuple(-float(v) if m == "max" else float(v)  # type: ignore[arg-type]
                 for v, m in zip(point, modes, strict=True))


def dominates(a: Point, b: Point, modes: Sequence[Mode]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    if not _valid(a):
        return False
    if not _valid(b):
        return True
    x, y = _as_min(a, modes), _as_min(b, modes)
    return all(p <= q for p, q in zip(x, y)) and any(p < q for p, q in zip(x, y))


def non_dominated_ranks(points: Sequence[Point], modes: Sequence[Mode]) -> list[int]:
    """Each point's non-dominated rank: 0 for the front, 1 for the front of the rest, ...
    Points with a missing value get the rank after the last (they are never on a front)."""
    remaining = [i for i, p in enumerate(points) if _valid(p)]
    ranks = [0] * len(points)
    rank = 0
    while remaining:
        front = [i for i in remaining
                 if not any(dominates(points[j], points[i], modes) for j in remaining if j != i)]
        for i in front:
            ranks[i] = rank
        remaining = [i for i in remaining if i not in front]
        rank += 1
    for i, p in enumerate(points):
        if not _valid(p):
            ranks[i] = rank
    return ranks


def pareto_front(points: Sequence[Point], modes: Sequence[Mode]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all on it)."""
    return [i for i, r in enumerate(non_dominated_ranks(points, modes))
            if r == 0 and _valid(points[i])]


def hypervolume(points: Sequence[Point], modes: Sequence[Mode],
                reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (a point worse than
    every one that counts in every objective: lower for ``max``, higher for ``min``).

    Points that do not strictly improve on the reference in every objective add nothing.
    Exact, by slicing along the first objective (fine for the tens to hundreds of trials of a
    search and two or three objectives).
    """
    ref = _as_min(reference, modes)
    boxes = [p for p in (_as_min(q, modes) for q in points if _valid(q))
             if all(v < r for v, r in zip(p, ref))]
    return _volume(boxes, ref)


def _volume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    ordered = sorted(set(points))
    total = 0.0
    for k, point in enumerate(ordered):  # slab [point[0], next[0]) is dominated by ordered[:k+1]
        upper = ordered[k + 1][0] if k + 1 < len(ordered) else ref[0]
        width = upper - point[0]
        if width > 0:
            total += width * _volume([p[1:] for p in ordered[:k + 1]], ref[1:])
    return total
