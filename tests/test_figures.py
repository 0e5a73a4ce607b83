"""The search's figures (``coatnet.search.figures``) from real Optuna studies: which trials they
show, the four PNGs at 20 and 500 trials, several objectives, what is skipped and why, and that
a bad study or a failing figure never raises. No Ray, no MLflow: studies are built with
``optuna.trial.create_trial``.
"""

from __future__ import annotations

import ast
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
import pytest
from matplotlib import image as mpimg
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers._base import _CONSTRAINTS_KEY
from optuna.trial import TrialState, create_trial

from coatnet.search import figures
from coatnet.search.figures import (
    FIGURE_FILES,
    best_so_far,
    figure_trials,
    write_figures,
)

REPO = Path(__file__).resolve().parent.parent
METRIC = "val_accuracy"
LAYOUTS = ["CCTT", "CCCT", "CCCC"]


def _params(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's params and distributions like the space's: a categorical layout, a
    conditional head_dim, a log lr, an int depth and channels narrowed per trial."""
    layout = str(rng.choice(LAYOUTS))
    high = int(rng.choice([64, 128]))
    params: dict[str, Any] = {
        "model.layout": layout, "train.lr": float(10 ** rng.uniform(-4, -2)),
        "model.depth.s1": int(rng.integers(1, 4)),
        "model.channels.s1": int(rng.choice(range(32, high + 1, 32)))}
    dists: dict[str, Any] = {
        "model.layout": CategoricalDistribution(LAYOUTS),
        "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.depth.s1": IntDistribution(1, 3),
        "model.channels.s1": IntDistribution(32, high, step=32)}
    if "T" in layout:
        params["model.head_dim"] = 32
        dists["model.head_dim"] = CategoricalDistribution([16, 32])
    return params, dists


def _trials(n: int, *, multi: bool = False, seed: int = 0,
            epochs: int = 6) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials after ``epochs`` epochs and PRUNED ones earlier, every 7th FAIL."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        params, dists = _params(rng)
        last = epochs if k % 3 else int(rng.integers(1, epochs))
        top = 0.4 + 0.4 * rng.random()
        curve = {e: top * (1 - math.exp(-e)) for e in range(1, last + 1)}
        state = TrialState.FAIL if k % 7 == 6 else \
            TrialState.COMPLETE if last == epochs else TrialState.PRUNED
        kwargs: dict[str, Any] = {"state": state, "params": params, "distributions": dists}
        final = curve[last] if state == TrialState.COMPLETE else None
        if multi:  # the searcher's attr: {epoch (str): value}
            kwargs["user_attrs"] = {f"intermediate_{METRIC}":
                                    {str(e): v for e, v in curve.items()}}
            kwargs["values"] = None if final is None else [final, float(rng.integers(1e6, 1e9))]
        else:
            kwargs["intermediate_values"] = curve
            kwargs["value"] = final
        out.append(create_trial(**kwargs))
    return out


def _study(trials: list[optuna.trial.FrozenTrial], *, multi: bool = False,
           storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(storage=storage,
                                directions=["maximize", "minimize"] if multi else ["maximize"])
    study.add_trials(trials)
    return study


def _check_png(path: Path) -> None:
    img = mpimg.imread(path)
    height, width = img.shape[:2]
    assert (width, height) == (1200, 700), path
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"


# ---------------------------------------------------------------------------- the trials shown
def test_searcher_names_agree() -> None:
    """figures does not import the searcher (Ray); its attribute names must stay the same."""
    tree = ast.parse((REPO / "coatnet/search/searcher.py").read_text())
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    for name in ("ORPHANED_ATTR", "ORPHANS_ATTR", "INTERMEDIATE_ATTR_PREFIX"):
        assert getattr(figures, name) == consts[name], name
    space = (REPO / "coatnet/search/space/searchspace.py").read_text()
    assert f'real.set_user_attr("{figures.CONSTRAINT_USER_ATTR}", values)' in space


def test_figure_trials_leave_out_failed_unfinished_infeasible_and_orphaned() -> None:
    dists = {"train.lr": FloatDistribution(1e-4, 1e-2, log=True)}

    def trial(value: float | None = 0.5, state: TrialState = TrialState.COMPLETE,
              **kwargs: Any) -> optuna.trial.FrozenTrial:
        return create_trial(state=state, value=value, params={"train.lr": 1e-3},
                            distributions=dists, **kwargs)

    study = _study([
        trial(0.5),                                                     # 0 kept
        trial(0.99, constraints={"params": 0.4, "macs": -0.1}),         # 1 infeasible (Optuna 5)
        trial(0.98, system_attrs={_CONSTRAINTS_KEY: [0.0, 0.3, 0.0]}),  # 2 infeasible (list)
        trial(0.97, user_attrs={"constraint": [0.0, 0.0, 1.0]}),        # 3 infeasible (space)
        trial(None, TrialState.FAIL),                                   # 4 failed
        trial(None, TrialState.RUNNING),                                # 5 running
        trial(None, TrialState.WAITING),                                # 6 waiting
        trial(0.96, user_attrs={"orphaned": True}),                     # 7 orphan (attr)
        trial(0.95),                                                    # 8 orphan (study attr)
        trial(0.6, constraints={"params": 0.0, "macs": -0.5}),          # 9 kept: feasible
        trial(None, TrialState.PRUNED, intermediate_values={1: 0.2, 2: 0.3}),  # 10 kept
        trial(None, TrialState.PRUNED),                                 # 11 no value at all
        trial(float("inf")),                                            # 12 no finite value
    ])
    study.set_user_attr("orphaned_trials", [8])
    shown = figure_trials(study, metric=METRIC)
    assert [t.number for t in shown] == [0, 9, 10]
    assert [t.pruned for t in shown] == [False, False, True]
    assert shown[2].value == 0.3  # a pruned trial's last intermediate value
    assert shown[2].curve == ((1, 0.2), (2, 0.3))


def test_figure_trials_read_multi_objective_intermediates_from_the_user_attr() -> None:
    study = _study(_trials(14, multi=True), multi=True)
    shown = figure_trials(study, metric=METRIC)
    frozen = {t.number: t for t in study.trials}
    assert shown and all(t.curve for t in shown)
    for t in shown:
        attr = frozen[t.number].user_attrs[f"intermediate_{METRIC}"]
        assert t.curve == tuple(sorted((int(k), v) for k, v in attr.items()))
        assert t.value == (t.curve[-1][1] if t.pruned else frozen[t.number].values[0])
    assert any(t.pruned for t in shown) and any(not t.pruned for t in shown)


def test_best_so_far_follows_the_mode() -> None:
    values = [0.3, 0.1, 0.2, 0.05, 0.4]
    assert best_so_far(values, mode="min") == [0.3, 0.1, 0.1, 0.05, 0.05]
    assert best_so_far(values, mode="max") == [0.3, 0.3, 0.3, 0.3, 0.4]
    assert best_so_far([], mode="min") == []


def test_log_and_categorical_axes_are_spread_over_their_scale() -> None:
    dists = {"train.lr": FloatDistribution(1e-4, 1e-2, log=True),
             "model.layout": CategoricalDistribution(LAYOUTS)}
    study = _study([create_trial(value=v, params={"train.lr": lr, "model.layout": layout},
                                 distributions=dists)
                    for v, lr, layout in ((0.1, 1e-4, "CCTT"), (0.2, 1e-3, "CCTT"),
                                          (0.3, 1e-2, "CCCC"))])
    shown = figure_trials(study, metric=METRIC)
    lr = figures._param_axis("train.lr", shown)
    assert lr.label == "train.lr (log)"
    assert lr.positions == pytest.approx((0.0, 0.5, 1.0))  # linear would put 1e-3 at 0.09
    layout = figures._param_axis("model.layout", shown)
    assert layout.positions == (0.0, 0.0, 1.0)  # every choice gets a place: CCTT, CCCT, CCCC
    assert [label for _, label in layout.ticks] == LAYOUTS


# ---------------------------------------------------------------------------- the figures
def test_twenty_trials_write_four_readable_pngs(tmp_path: Path) -> None:
    study = _study(_trials(20), storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    out = write_figures(study, tmp_path / "figures" / "new", metric=METRIC, mode="max")
    assert out.skipped == ()
    assert out.importance_evaluator == "FanovaImportanceEvaluator"
    assert [p.name for p in out.paths] == list(FIGURE_FILES.values())
    for path in out.paths:
        _check_png(path)
    assert sorted(p.name for p in (tmp_path / "figures" / "new").iterdir()) == \
        sorted(FIGURE_FILES.values())  # no temporary file left behind


def test_five_hundred_trials_and_importance_on_the_200_most_recent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study(_trials(500, seed=1))
    seen: dict[str, Any] = {}
    real = optuna.importance.get_param_importances

    def spy(study: optuna.Study, **kwargs: Any) -> dict[str, float]:
        seen["numbers"] = len(study.trials)
        seen["params"] = kwargs.get("params")
        return real(study, **kwargs)

    monkeypatch.setattr(optuna.importance, "get_param_importances", spy)
    start = time.perf_counter()
    out = write_figures(study, tmp_path, metric=METRIC, mode="max", top_k=3)
    elapsed = time.perf_counter() - start
    assert out.skipped == () and len(out.paths) == 4
    for path in out.paths:
        _check_png(path)
    assert seen["numbers"] == figures.IMPORTANCE_MAX_TRIALS
    # channels are narrowed per trial (different distributions): still assessed; head_dim is
    # conditional (not in every trial) and left out, as fANOVA needs every value
    assert "model.channels.s1" in seen["params"] and "model.head_dim" not in seen["params"]
    assert elapsed < 20, f"write_figures took {elapsed:.1f} s for 500 trials"


def test_multi_objective_study_draws_learning_curves(tmp_path: Path) -> None:
    out = write_figures(_study(_trials(16, multi=True), multi=True), tmp_path, metric=METRIC,
                        mode="max")
    assert out.skipped == ()
    assert tmp_path / FIGURE_FILES["learning_curves"] in out.paths
    _check_png(tmp_path / FIGURE_FILES["learning_curves"])


def test_too_few_trials_skip_the_importance_with_a_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    made = _trials(3)  # trial 0 is pruned, 1 and 2 complete: keep 0 and 1
    assert [t.state for t in made] == [TrialState.PRUNED, TrialState.COMPLETE,
                                       TrialState.COMPLETE]
    study = _study(made[:2])
    with caplog.at_level(logging.INFO, logger="coatnet.search"):
        out = write_figures(study, tmp_path, metric=METRIC, mode="max")
    assert out.skipped == ("param_importance: fewer than 2 completed trials (1)",)
    assert out.importance_evaluator is None
    assert len(out.paths) == 3 and not (tmp_path / FIGURE_FILES["param_importance"]).exists()
    assert any("param_importance" in r.getMessage() for r in caplog.records)


def test_constant_params_or_values_skip_the_importance(tmp_path: Path) -> None:
    dists = {"train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    same_params = [create_trial(value=v, params={"train.lr": 1e-3}, distributions=dists)
                   for v in (0.1, 0.2, 0.3)]
    out = write_figures(_study(same_params), tmp_path / "a", metric=METRIC, mode="max")
    assert out.skipped == (
        "param_importance: no parameter varies across the 3 completed trials",
        f"learning_curves: no trial has per-epoch values of {METRIC}")
    same_value = [create_trial(value=0.5, params={"train.lr": lr}, distributions=dists)
                  for lr in (1e-4, 1e-3, 1e-2)]
    out = write_figures(_study(same_value), tmp_path / "b", metric=METRIC, mode="min")
    assert out.skipped[0] == f"param_importance: all 3 completed trials have the same {METRIC}"


def test_empty_study_skips_every_figure(tmp_path: Path) -> None:
    out = write_figures(_study([]), tmp_path / "made", metric=METRIC, mode="max")
    assert out.paths == () and out.importance_evaluator is None
    assert [s.split(":")[0] for s in out.skipped] == list(FIGURE_FILES)
    assert (tmp_path / "made").is_dir() and not any((tmp_path / "made").iterdir())


def test_writing_again_replaces_the_files_and_removes_stale_ones(tmp_path: Path) -> None:
    write_figures(_study(_trials(12, seed=2)), tmp_path, metric=METRIC, mode="max")
    before = {n: (tmp_path / n).read_bytes() for n in FIGURE_FILES.values()}
    out = write_figures(_study(_trials(24, seed=3)), tmp_path, metric=METRIC, mode="max")
    assert len(out.paths) == 4
    assert all((tmp_path / n).read_bytes() != before[n] for n in FIGURE_FILES.values())
    out = write_figures(_study([]), tmp_path, metric=METRIC, mode="max")  # all skipped now
    assert not any((tmp_path / n).exists() for n in FIGURE_FILES.values())


def test_mode_min_draws_and_a_bad_mode_is_refused(tmp_path: Path) -> None:
    out = write_figures(_study(_trials(10)), tmp_path, metric="val_loss", mode="min")
    assert out.skipped == ()
    with pytest.raises(ValueError, match="mode"):
        write_figures(_study([]), tmp_path, metric=METRIC, mode="maximize")


def test_a_bad_study_or_a_failing_figure_never_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        study_name = "broken"

        @property
        def user_attrs(self) -> dict[str, Any]:
            return {}

        def get_trials(self, **_: Any) -> list[Any]:
            raise RuntimeError("database is locked")

    out = write_figures(Broken(), tmp_path / "broken", metric=METRIC,  # type: ignore[arg-type]
                        mode="max")
    assert out.paths == () and len(out.skipped) == 4
    assert all("database is locked" in s for s in out.skipped)

    def fails(*_: Any, **__: Any) -> None:
        raise RuntimeError("no room for the labels")

    monkeypatch.setattr(figures, "_parallel", fails)
    out = write_figures(_study(_trials(8)), tmp_path / "one", metric=METRIC, mode="max")
    assert out.skipped == ("parallel_coordinates: RuntimeError: no room for the labels",)
    assert len(out.paths) == 3


def test_leaves_the_process_backend_and_pyplot_alone(tmp_path: Path) -> None:
    """No pyplot, no matplotlib.use: a process that chose a backend keeps it."""
    tree = ast.parse((REPO / "coatnet/search/figures.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
         for a in n.names}
    assert not [m for m in imported if "pyplot" in m or m.startswith(("ray", "mlflow"))]
    calls = [n.func.attr for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert "use" not in calls and "switch_backend" not in calls
    backend = matplotlib.rcParams._get("backend")  # without resolving it
    had_pyplot = "matplotlib.pyplot" in sys.modules
    write_figures(_study(_trials(6)), tmp_path, metric=METRIC, mode="max")
    assert matplotlib.rcParams._get("backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
