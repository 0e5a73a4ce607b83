"""The :class:`SearchSpace`: a validated space file, and what a search asks of it.

It holds the parsed sections and the file's text and hash, samples candidates
(``define_by_run``, ``candidate_from_params``), derives variants (``with_overrides``,
``smoke_test``) and reports its smallest cost (``min_complexity``). It is built by
``coatnet.search.space.loading.load_space`` and never mutated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coatnet.search.contracts import Candidate
from coatnet.search.space.feasibility import _min_candidates, _min_complexity, _MinCandidate
from coatnet.search.space.problems import _Problems
from coatnet.search.space.sampling import (CONSTRAINT_NAMES, _ReplayTrial, _sample_candidate,
                                           scratch_study)
from coatnet.search.space.schema import (
    ConstraintSection,
    DataSection,
    ModelSpace,
    SearchSection,
    TrainSpace,
    TrialSection,
    _smallest,
    _values,
)

__all__ = ["SearchSpace"]


@dataclass(frozen=True, eq=False)
class SearchSpace:
    """A validated space file. Build with :func:`load_space`; never mutate (frozen)."""

    path: Path
    text: str
    sha256: str
    data: DataSection
    trial: TrialSection
    search: SearchSection
    constraints: ConstraintSection
    model: ModelSpace
    train: TrainSpace
    num_classes: int
    image_channel: int
    description: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ sampling
    def define_by_run(self, trial: Any, *, set_constraints: bool = False) -> dict[str, Any]:
        """Sample one candidate with ``trial.suggest_*`` (Ray's OptunaSearch space callable).

        Returns ``{"candidate": Candidate.to_dict()}`` (Tune's config is a plain dict). Stores
        the constraint values (see :func:`constraints_func`) as the user attr ``constraint`` on
        the real Optuna trial (Ray wraps it in a captor that keeps it as ``ot_trial``).
        ``set_constraints=True`` also calls Optuna 5's ``trial.set_constraint`` (then TPE needs
        no ``constraints_func``; don't use both or violations count twice).
        """
        candidate, values = self._sample(trial)
        real = getattr(trial, "ot_trial", trial)
        real.set_user_attr("constraint", values)
        if set_constraints:
            for name, value in zip(CONSTRAINT_NAMES, values):
                real.set_constraint(name, value)
        return {"candidate": candidate.to_dict()}

    def candidate_from_params(self, params: Mapping[str, Any]) -> Candidate:
        """The candidate that ``define_by_run`` built from these flat Optuna params.

        Extra keys (e.g. a Tune config's ``candidate``) are ignored; a missing one raises
        ``ValueError``.
        """
        try:
            candidate, _ = self._sample(_ReplayTrial(params))
        except KeyError as err:
            raise ValueError(f"params lack {err.args[0]!r}, which this space samples") from None
        return candidate

    def sampled_names(self, *, draws: int = 4) -> list[str]:
        """The flat names this space samples (``model.layout``, ``train.lr``, ...), in
        sampling order, from a few random draws on a throwaway in-memory study."""
        import optuna

        study = scratch_study(sampler=optuna.samplers.RandomSampler(seed=0))
        names: list[str] = []
        for _ in range(draws):
            trial = study.ask()
            self._sample(trial)
            names += [name for name in trial.params if name not in names]
        return names

    def _sample(self, trial: Any) -> tuple[Candidate, list[float]]:
        return _sample_candidate(trial, model=self.model, train=self.train,
                                 constraints=self.constraints,
                                 image_size=self.data.image_size,
                                 num_classes=self.num_classes,
                                 image_channel=self.image_channel)

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
            search = SearchSection.model_validate(merged)
        except ValidationError as err:
            problems = _Problems(f"{self.path} (overrides)")
            problems.from_pydantic(err, prefix="search", model=SearchSection)
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
        train = self.train
        warmup = self.train.warmup_epochs
        enqueue = list(self.search.enqueue)
        if max(_values(warmup)) > epochs:
            train = train.model_copy(update={"warmup_epochs": min(_smallest(warmup), epochs)})
            # warm-up is fixed now: enqueued configurations no longer choose it
            enqueue = [{k: v for k, v in point.items() if k != "train.warmup_epochs"}
                       for point in enqueue]
        search = self.search.model_copy(update={
            "enqueue": [point for point in enqueue if point],
            "num_samples": num_samples,
            "max_concurrent_trials": min(self.search.max_concurrent_trials or 2, 2),
            "n_startup_trials": min(self.search.n_startup_trials, num_samples),
            "asha": None if self.search.asha is None
            else self.search.asha.model_copy(update={"grace_period": 1}),
        })
        return dataclasses.replace(
            self, data=self.data.model_copy(update=data_changes),
            trial=self.trial.model_copy(update={"epochs": epochs}),
            search=search, train=train, overrides={**self.overrides, "smoke_test": True})

    # ------------------------------------------------------------------ complexity
    def min_complexity(self) -> tuple[int, int]:
        """Smallest possible ``(params, macs)`` over the space (each minimised on its own)."""
        return _min_complexity(self._min_candidates, path=self.path)

    @functools.cached_property
    def _min_candidates(self) -> list[_MinCandidate]:
        return list(_min_candidates(self.model, image_size=self.data.image_size,
                                    num_classes=self.num_classes,
                                    image_channel=self.image_channel))
