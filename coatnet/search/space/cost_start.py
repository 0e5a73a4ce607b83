"""The cost-spread start: an accuracy-versus-cost search's random start, spread over its cost.

TPE begins with ``search.n_startup_trials`` random candidates. Drawn uniformly from the space,
they land where most candidates are, the middle of the cost range, and leave the cheap end
of the front ("the most accurate model under my cost") to be found after them. A cost known
before training (``params``, ``macs``) needs no trial to be known, so here the start is still
drawn at random but picked along the cost axis: ``draws`` random candidates (seeded), the
feasible ones sorted by cost, and for ``n`` points evenly spaced in log cost from the
cheapest to the dearest the nearest candidate not yet picked, cheapest first. Every other
parameter (learning rate, dropout, ...) is as random as in TPE's own start. ``latency_ms``,
measured in the trial, is spread by MACs. The runner enqueues the points after the space's
``search.enqueue`` (``search.start: cost_spread``, the default; ``random`` turns it off).
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any

from coatnet.search.space.sampling import scratch_study

__all__ = ["STATIC_COSTS", "cost_spread_start"]

logger = logging.getLogger(__name__)

STATIC_COSTS = ("params", "macs")  # known from the config alone; latency_ms is spread by MACs


def cost_spread_start(space: Any, *, n: int, cost: str, seed: int | None,
                      draws: int = 32) -> list[dict[str, Any]]:
    """``n`` flat Optuna params dicts (``{"model.layout": ..., "train.lr": ...}``) of feasible
    candidates of ``space`` (a :class:`~coatnet.search.space.SearchSpace`) spread over
    ``cost`` (``params`` or ``macs``; anything else counts as ``macs``), cheapest first.

    Fewer when fewer than ``n`` of the ``draws`` are feasible (none: an empty list, and the
    search starts at random as usual).
    """
    import optuna

    if n <= 0:
        return []
    attr = cost if cost in STATIC_COSTS else "macs"
    study = scratch_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    found: list[tuple[float, dict[str, Any]]] = []
    draws = max(draws, n)
    for _ in range(draws):
        trial = study.ask()
        candidate, _ = space._sample(trial)
        value = getattr(candidate, attr)
        if candidate.infeasible_reason is None and value:
            found.append((math.log(float(value)), dict(trial.params)))
    found.sort(key=lambda item: item[0])
    picked = _spread([log_cost for log_cost, _ in found], n)
    points = [found[i][1] for i in picked]
    if points:
        logger.info("cost-spread start: %d of %d random candidates, %s %s to %s", len(points),
                    draws, attr, f"{math.exp(found[picked[0]][0]):,.0f}",
                    f"{math.exp(found[picked[-1]][0]):,.0f}")
    return points


def _spread(sorted_values: list[float], n: int) -> list[int]:
    """Indices of up to ``n`` distinct items of ``sorted_values`` nearest to ``n`` evenly
    spaced targets from the first to the last, ascending."""
    if not sorted_values:
        return []
    n = min(n, len(sorted_values))
    low, high = sorted_values[0], sorted_values[-1]
    targets = [low] if n == 1 else [low + (high - low) * k / (n - 1) for k in range(n)]
    free = list(range(len(sorted_values)))
    picked: list[int] = []
    for target in targets:
        values = [sorted_values[i] for i in free]
        at = bisect.bisect_left(values, target)
        near = [j for j in (at - 1, at) if 0 <= j < len(free)]
        j = min(near, key=lambda j: abs(values[j] - target))
        picked.append(free.pop(j))
    return sorted(picked)
