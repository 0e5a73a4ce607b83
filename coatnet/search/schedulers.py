"""Early stopping for an accuracy-versus-cost search: ASHA's rungs, a Pareto rung decision.

Ray's ``ASHAScheduler`` ranks the trials at a rung by one metric, so with accuracy as the
metric a small model that is less accurate than a big one at the same rung is stopped, even
when nothing is both as cheap and as accurate: the cheap end of the front is cut first.
``ParetoASHA`` keeps ASHA's asynchronous rungs (``grace_period * reduction_factor**k`` epochs,
below ``max_t``) and decides at a rung by non-dominated rank over every objective (accuracy
and the candidate's cost, e.g. ``macs``, which each result carries): a trial continues when
fewer than ``1 / reduction_factor`` of the trials recorded at that rung are on strictly better
fronts. A trial on the rung's front is therefore never stopped there; with one objective the
top ``1 / reduction_factor`` by the metric continue, as in ASHA (which interpolates a
percentile of the values recorded before the trial's; here the trial itself is counted).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from coatnet.search.pareto import Objective, non_dominated_ranks

logger = logging.getLogger(__name__)

__all__ = ["ParetoASHA", "rung_keeps"]


def rung_keeps(trial_id: str, recorded: Mapping[str, Sequence[float | None]], *,
               modes: Sequence[str], reduction_factor: float) -> bool:
    """Whether ``trial_id`` continues past a rung where ``recorded`` (trial id -> objective
    values at the rung, the trial's own included) were seen."""
    ids = list(recorded)
    ranks = dict(zip(ids, non_dominated_ranks([recorded[i] for i in ids], modes)))  # type: ignore[arg-type]
    better = sum(1 for i in ids if ranks[i] < ranks[trial_id])
    return better < max(1.0, len(ids) / reduction_factor)


class ParetoASHA(FIFOScheduler):
    """ASHA (one bracket) whose rung decision is by non-dominated rank (module docstring)."""

    def __init__(self, *, objectives: Sequence[Objective], max_t: int,
                 time_attr: str = "epochs_done", grace_period: int = 1,
                 reduction_factor: float = 2.0) -> None:
        if not objectives:
            raise ValueError("ParetoASHA needs at least one objective")
        if grace_period < 1 or max_t < grace_period:
            raise ValueError(f"need 1 <= grace_period <= max_t, got {grace_period}, {max_t}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        super().__init__()
        self._objectives = tuple(objectives)
        self._time_attr = time_attr
        self._max_t = int(max_t)
        self._reduction_factor = float(reduction_factor)
        milestones, k = [], 0
        while grace_period * reduction_factor ** k < max_t:
            milestones.append(int(math.ceil(grace_period * reduction_factor ** k)))
            k += 1
        # rung (epochs) -> trial id -> objective values there; plain dicts: Tune pickles us
        self._rungs: dict[int, dict[str, tuple[float | None, ...]]] = {
            m: {} for m in sorted(set(milestones))}
        self._stopped = 0

    @property
    def rungs(self) -> dict[int, dict[str, tuple[float | None, ...]]]:
        return {m: dict(r) for m, r in self._rungs.items()}

    def set_search_properties(self, metric: str | None, mode: str | None,
                              **spec: Any) -> bool:
        return True  # the objectives are ours; Tune's single metric is the first of them

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        t = result.get(self._time_attr)
        if not isinstance(t, (int, float)):
            return TrialScheduler.CONTINUE
        if t >= self._max_t:
            return TrialScheduler.STOP
        for milestone in sorted(self._rungs, reverse=True):  # the highest rung reached
            recorded = self._rungs[milestone]
            if t < milestone or trial.trial_id in recorded:
                continue
            recorded[trial.trial_id] = tuple(_number(result.get(o.metric))
                                             for o in self._objectives)
            if rung_keeps(trial.trial_id, recorded, modes=[o.mode for o in self._objectives],
                          reduction_factor=self._reduction_factor):
                return TrialScheduler.CONTINUE
            self._stopped += 1
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        filled = ", ".join(f"{m}: {len(r)}" for m, r in self._rungs.items())
        return (f"ParetoASHA over {[o.metric for o in self._objectives]}: rungs {{{filled}}}, "
                f"{self._stopped} stopped")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
