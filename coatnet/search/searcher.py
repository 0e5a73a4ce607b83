"""The search's Optuna searcher: Ray's ``OptunaSearch`` with a stored study and the truth.

``StudySearch`` subclasses Ray 2.60's ``OptunaSearch`` (define-by-run over
``SearchSpace.define_by_run``) and corrects what it gets wrong for this search:

* **The study lives in a file.** An Optuna RDB storage in the experiment directory
  (``optuna.db``), so ``optuna.load_study`` and ``optuna-dashboard sqlite:///.../optuna.db``
  read it while the search runs and after. Every ask is on disk before Tune even creates the
  trial, so the study is never behind Tune's saved state; each Optuna trial carries the Tune
  trial id as the user attribute ``tune_trial_id`` and, once it ends, its MLflow child run id
  as ``mlflow_run_id``.
* **Known configurations go first, once.** ``enqueue`` (the space's ``search.enqueue``) is
  enqueued into a new study only (Ray would enqueue again into the stored study on every
  fresh start), marked ``enqueued``; then ``start`` (the cost-spread start of
  ``space.cost_start``, computed for a new study only), marked ``cost_spread_start``.
* **A restored searcher may not know a trial.** Tune saves (and copies to storage, in the
  background) its experiment state and the searcher's pickle one after the other; a driver
  killed in between leaves a searcher older than the trials Tune restores, and Ray's
  ``OptunaSearch`` then fails the whole search with a ``KeyError`` on that trial's first result.
  Here the trial is found again in the stored study by its ``tune_trial_id``.
* **Early-stopped is not complete.** Ray reports only Tune's ``training_iteration`` as the step
  and tells Optuna ``COMPLETE`` with an early-stopped trial's last, early value. Here every
  epoch's value is an intermediate value at step ``epochs_done``, a trial that ended before
  ``max_epochs`` is told ``PRUNED``, a diverged, failed or non-finite one ``FAIL`` (Ray only
  logs the ``tell`` error for a NaN and leaves the trial RUNNING).
* **Several objectives.** With ``metric`` a list (quality first, then costs such as ``macs``)
  the study has one direction per objective and a finished trial is told every value from its
  last result. Optuna cannot store intermediate values of a multi-objective trial
  (``Trial.report`` raises), so each epoch's quality value goes to the trial's user attribute
  ``intermediate_<metric>`` (``{epoch: value}``) instead; PRUNED and FAIL are told as above. An
  infeasible candidate is told quality 0 (or the worst) and its known costs (``inf`` when
  unknown), behind every feasible one through its constraint.
* **A restored trial may be told already.** A trial that ended in a killed driver before Tune
  saved that comes back RUNNING; its study trial is finished, and its results are then skipped
  (Ray's searcher would raise ``UpdateFinishedTrialError`` into Tune and end the search).
  Nothing the searcher does with the study may stop the search: errors are logged.
* **No trial stays RUNNING.** ``close_orphans`` (called by the runner once ``fit`` returns)
  records every trial whose Tune trial is not in the search's results, the asks of a killed
  driver that Tune never saved, in the study attribute ``orphaned_trials`` and fails those
  still RUNNING; ``search_trials`` is the study less those, one to one with the search.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

STUDY_FILE = "optuna.db"
TRIAL_ID_ATTR = "tune_trial_id"
ORPHANED_ATTR = "orphaned"
RUN_ID_ATTR = "mlflow_run_id"
ENQUEUED_ATTR = "enqueued"
START_ATTR = "cost_spread_start"
ORPHANS_ATTR = "orphaned_trials"
INTERMEDIATE_ATTR_PREFIX = "intermediate_"  # several objectives: {epoch: quality value}


def storage_url(experiment_dir: Path) -> str:
    """The Optuna storage URL of a search's study (``sqlite:///<dir>/optuna.db``)."""
    return f"sqlite:///{Path(experiment_dir).resolve() / STUDY_FILE}"


class StudySearch(OptunaSearch):
    """``OptunaSearch`` over a stored study, told the truth (see the module docstring)."""

    def __init__(self, *, space: Any, metric: str | Sequence[str], mode: str | Sequence[str],
                 sampler: optuna.samplers.BaseSampler, storage: str, study_name: str,
                 max_epochs: int, enqueue: Sequence[Mapping[str, Any]] = (),
                 start: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
                 run_id_of: Callable[[str], str | None] | None = None) -> None:
        if not isinstance(metric, str):  # several objectives: Ray's OptunaSearch takes lists
            metric, mode = list(metric), list(mode)
            if len(metric) == 1:
                metric, mode = metric[0], mode[0]
        self._objectives = [metric] if isinstance(metric, str) else list(metric)
        self._modes = [mode] if isinstance(mode, str) else list(mode)
        self._quality = self._objectives[0]
        self._max_epochs = int(max_epochs)
        self._reported: dict[str, set[int]] = {}
        self._enqueue = [dict(point) for point in enqueue]
        self._start = start
        self._run_id_of = run_id_of
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler,
                         study_name=study_name,
                         storage=optuna.storages.RDBStorage(storage))

    def _setup_study(self, mode: str | list[str]) -> None:
        super()._setup_study(mode)
        # A new study only: a driver killed after enqueueing left them WAITING (asked next)
        if self._ot_study.get_trials(deepcopy=False):
            return
        for point in self._enqueue:
            self._ot_study.enqueue_trial(point, user_attrs={ENQUEUED_ATTR: True})
        if self._enqueue:
            logger.info("enqueued %d known configuration(s) to be evaluated first",
                        len(self._enqueue))
        try:
            for point in self._start() if self._start is not None else ():
                self._ot_study.enqueue_trial(point, user_attrs={START_ATTR: True})
        except Exception as err:  # noqa: BLE001 - the searcher must never stop the search
            logger.warning("no cost-spread start (%s): the start is TPE's random one", err)

    # ------------------------------------------------------------------ Tune's calls
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None:
            trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials:
            return
        trial = self._trial(trial_id)
        value, step = result.get(self._quality), result.get("epochs_done")
        if trial is None or not _finite(value) or not isinstance(step, int) or step < 1:
            return
        reported = self._reported.setdefault(trial_id, set())
        if step in reported:  # a resumed trial re-reports its last epoch
            return
        try:
            if len(self._objectives) == 1:
                trial.report(float(value), step)
            else:  # Optuna keeps no intermediate values for several objectives
                key = f"{INTERMEDIATE_ATTR_PREFIX}{self._quality}"
                frozen = self._ot_study._storage.get_trial(trial._trial_id)
                if frozen.state.is_finished():
                    raise optuna.exceptions.UpdateFinishedTrialError(
                        f"trial {frozen.number} is finished")
                values = dict(frozen.user_attrs.get(key) or {})
                values[str(step)] = float(value)
                trial.set_user_attr(key, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # told already, by a driver killed before Tune saved that the trial had ended
            self._completed_trials.add(trial_id)
            return
        except Exception as err:  # noqa: BLE001 - the searcher must never stop the search
            logger.warning("could not report epoch %s of trial %s to Optuna: %s", step,
                           trial_id, err)
            return
        reported.add(step)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        trial = self._trial(trial_id)
        if trial is None:
            logger.warning("trial %s is not in the Optuna study; not told", trial_id)
            return
        # Tune skips on_trial_result for the result that ends a trial (ASHA's stop, the last
        # epoch): it is the final intermediate value
        if result and result.get("status") not in ("infeasible", "diverged"):
            self.on_trial_result(trial_id, result)
        state, value = self._outcome(result or {}, error=error)
        run_id = self._run_id_of(trial_id) if self._run_id_of is not None else None
        try:
            if run_id:
                trial.set_user_attr(RUN_ID_ATTR, run_id)
            self._ot_study.tell(trial, value, state=state, skip_if_finished=True)
        except Exception as err:  # noqa: BLE001 - the searcher must never stop the search
            logger.warning("could not tell Optuna how trial %s ended: %s", trial_id, err)
        self._completed_trials.add(trial_id)

    # ------------------------------------------------------------------ helpers
    def _outcome(self, result: Mapping[str, Any], *,
                 error: bool) -> tuple[TrialState, float | list[float] | None]:
        value = result.get(self._quality)
        if error or result.get("status") == "diverged" or not _finite(value):
            return TrialState.FAIL, None
        infeasible = result.get("status") == "infeasible"
        if not infeasible and int(result.get("epochs_done") or 0) < self._max_epochs:
            return TrialState.PRUNED, None  # ranked by how far it got and its last value
        if len(self._objectives) == 1:
            return TrialState.COMPLETE, float(value)
        values = [float(value)]
        for metric, mode in zip(self._objectives[1:], self._modes[1:]):
            cost = result.get(metric)
            if _finite(cost):
                values.append(float(cost))
            elif infeasible:  # a candidate that cannot be built has no measured cost
                values.append(math.inf if mode == "min" else -math.inf)
            else:
                logger.warning("trial %s reported no %s: told FAIL", result.get("trial_id"),
                               metric)
                return TrialState.FAIL, None
        return TrialState.COMPLETE, values

    def _trial(self, trial_id: str) -> optuna.Trial | None:
        """The Optuna trial of a Tune trial; after a restore, found by its user attribute."""
        trial = self._ot_trials.get(trial_id)
        if trial is not None:
            return trial
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.user_attrs.get(TRIAL_ID_ATTR) == trial_id:
                trial = optuna.Trial(self._ot_study, frozen._trial_id)
                self._ot_trials[trial_id] = trial
                logger.info("trial %s: found in the stored study (the restored searcher "
                            "state was older than the trial)", trial_id)
                return trial
        return None


def close_orphans(*, storage: str, study_name: str, trial_ids: Iterable[str]) -> int:
    """Record every trial of the study whose Tune trial is not in ``trial_ids`` as orphaned
    and fail those still RUNNING; returns how many were newly recorded. Run it when no trial
    of the search is running.

    An orphan is an ask of a killed driver that Tune never saved: it may still be RUNNING, or
    it may have started and ended between two of Tune's saves (a finished orphan keeps its
    state: its value is a true observation of that configuration, and TPE may learn from it;
    Optuna cannot change a finished trial). Their numbers are the study's user attribute
    ``orphaned_trials``; a RUNNING one also gets the trial attribute ``orphaned = true``
    before it is failed. ``search_trials`` gives the study's trials less the orphans.
    """
    keep = set(trial_ids)
    study = optuna.load_study(study_name=study_name, storage=storage)
    orphans = set(study.user_attrs.get(ORPHANS_ATTR, []))
    new = []
    for frozen in study.get_trials(deepcopy=False):
        if frozen.user_attrs.get(TRIAL_ID_ATTR) in keep or frozen.number in orphans:
            continue
        if frozen.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(frozen._trial_id, ORPHANED_ATTR, True)
            study.tell(frozen.number, state=TrialState.FAIL)
        new.append(frozen.number)
    if new:
        study.set_user_attr(ORPHANS_ATTR, sorted(orphans | set(new)))
        logger.info("recorded %d Optuna trial(s) that a killed driver asked for but Tune "
                    "never saved (study attribute %s; any still RUNNING failed)", len(new),
                    ORPHANS_ATTR)
    return len(new)


def search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials that are the search's trials: all but the recorded orphans."""
    orphans = set(study.user_attrs.get(ORPHANS_ATTR, []))
    return [t for t in study.get_trials() if t.number not in orphans]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
