"""Search-space files: strict YAML, validation messages, define-by-run sampling, variants.

Every file in ``tests/bad_spaces/`` starts with one ``# expect: <key.path>: <text>`` line per
problem it must produce; the test checks the count and that each problem line starts with
``<file>: <expected text>``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from coatnet.config import CoAtNetConfig, config_problems
from coatnet.search.space import (
    ALLOWED_LAYOUTS,
    CONSTRAINT_NAMES,
    SearchSpace,
    SpaceError,
    constraints_func,
    dataset_facts,
    load_space,
)
from coatnet.search.space.strict_yaml import StrictYAMLError, load_yaml

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
BAD = Path(__file__).resolve().parent / "bad_spaces"
BAD_FILES = sorted(BAD.glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = """\
data: {dataset: synthetic, image_size: 32}
trial: {epochs: 2}
search: {num_samples: 2}
model:
  layout: CCTT
  depth: {s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}
  channels: {s0: 16, s1: 16, s2: 32, s3: 64, s4: 64}
train: {lr: 1e-3, batch_size: 32}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def expectations(path: Path) -> list[str]:
    prefix = "# expect: "
    return [line[len(prefix):].rstrip("\n") for line in path.read_text().splitlines()
            if line.startswith(prefix)]


@pytest.fixture
def imagenet_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny ImageFolder tree (train/ and val/, 3 classes) behind $IMAGENET_DIR."""
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            (root / split / cls).mkdir(parents=True)
    monkeypatch.setenv("IMAGENET_DIR", str(root))
    return root


# ---------------------------------------------------------------------------- bad files
def test_there_are_enough_bad_spaces() -> None:
    assert len(BAD_FILES) >= 20
    for path in BAD_FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_space_is_rejected_with_exact_messages(path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    expected = expectations(path)
    with pytest.raises(SpaceError) as info:
        load_space(path.name)
    problems = info.value.problems
    assert str(info.value) == "\n".join(problems)
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(p.startswith(f"{path.name}: {want}") for p in problems), (want, problems)


def test_several_problems_are_all_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    with pytest.raises(SpaceError) as info:
        load_space("several_problems.yaml")
    paths = [p.split(": ")[1] for p in info.value.problems]
    assert paths == ["data.colour", "search.mode", "model.layout", "train.lr",
                     "train.label_smoothing"]


def test_infeasible_budget_states_the_true_minimum(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, BASE))
    min_params, min_macs = space.min_complexity()
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, BASE + "constraints: {max_params: 1e3, max_macs: 1e3}\n",
                         "tight.yaml"))
    text = str(info.value)
    assert f"the smallest candidate has {min_params:,} params" in text
    assert f"the smallest candidate has {min_macs:,} MACs" in text
    assert "constraints.max_params" in text and "constraints.max_macs" in text


def test_budget_that_only_fails_jointly_is_reported(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import coatnet.search.space.feasibility as feasibility

    fake = {"CCCC": (100, 9000), "TTTT": (9000, 100)}  # a params/MACs trade-off
    monkeypatch.setattr(feasibility, "_complexity",
                        lambda cfg: fake["".join(cfg.block_type_in_layers)])
    text = BASE.replace("layout: CCTT", "layout: {type: categorical, choices: [CCCC, TTTT]}")
    text = text.replace("s1: 16, s2: 32", "s1: 32, s2: 32")
    path = write(tmp_path, text + "constraints: {max_params: 1000, max_macs: 1000}\n")
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert info.value.problems == [
        f"{path}: constraints: no candidate meets max_params=1,000 and max_macs=1,000 "
        "together: the fewest params are 100 (with 9,000 MACs), the fewest MACs are 100 "
        "(with 9,000 params)"]
    assert load_space(write(tmp_path, text, "free.yaml")).min_complexity() == (100, 100)


def test_missing_file_is_a_space_error(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="cannot read"):
        load_space(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------- strict YAML
def test_strict_yaml_reads_exponents_as_floats() -> None:
    doc = load_yaml("a: 1e-3\nb: 1E+5\nc: 5e-4\nd: 1.5e3\ne: 12\nf: '1e-3'\ng: 0.5\n")
    assert doc == {"a": 1e-3, "b": 1e5, "c": 5e-4, "d": 1500.0, "e": 12, "f": "1e-3", "g": 0.5}
    assert all(isinstance(doc[k], float) for k in "abcdg") and isinstance(doc["e"], int)


def test_strict_yaml_booleans_are_only_true_and_false() -> None:
    assert load_yaml("a: true\nb: False\nc: yes\nd: on\n") == {
        "a": True, "b": False, "c": "yes", "d": "on"}


def test_strict_yaml_rejects_duplicate_keys_with_key_and_line() -> None:
    with pytest.raises(StrictYAMLError) as info:
        load_yaml("a:\n  b: 1\n  c: 2\n  b: 3\n")
    assert info.value.line == 4
    assert "duplicate key 'b' (first defined at line 2)" in str(info.value)


@pytest.mark.parametrize("text", ["a: !!python/object/apply:os.system [ls]\n", "a: !mine 1\n",
                                  "a: !!str 1\n", "a: !!map {b: 1}\n"])
def test_strict_yaml_rejects_tags(text: str) -> None:
    with pytest.raises(StrictYAMLError, match="is not allowed"):
        load_yaml(text)


def test_strict_yaml_does_not_change_pyyaml_safe_loader() -> None:
    load_yaml("a: 1e-3\n")
    assert yaml.safe_load("a: 1e-3\nb: yes\n") == {"a": "1e-3", "b": True}


def test_exponent_numbers_in_a_space(tmp_path: Path) -> None:
    text = BASE.replace("train: {lr: 1e-3, batch_size: 32}",
                        "train: {lr: 1e-3, batch_size: 32, weight_decay: 5E-2}")
    space = load_space(write(tmp_path, text + "constraints: {max_params: 5e6, max_macs: 1E+9}\n"))
    assert space.train.lr == pytest.approx(1e-3) and isinstance(space.train.lr, float)
    assert space.train.weight_decay == pytest.approx(0.05)
    assert space.constraints.max_params == 5_000_000
    assert isinstance(space.constraints.max_params, int)
    assert space.constraints.max_macs == 1_000_000_000


# ---------------------------------------------------------------------------- shipped spaces
@pytest.mark.parametrize("name", ["coatnet_small", "coatnet_cifar10", "coatnet_imagenet"])
def test_shipped_spaces_load(name: str, imagenet_dir: Path) -> None:
    space = load_space(SPACES / f"{name}.yaml")
    assert isinstance(space, SearchSpace)
    data = space.data.model_dump()
    assert {"dataset", "image_size", "val_fraction", "data_dir", "path", "download", "subset",
            "num_classes", "image_channel", "num_samples", "augment"} <= set(data)
    assert {"epochs", "num_workers", "use_gpu", "cpus_per_worker", "max_failures",
            "num_data_workers", "compile", "keep_checkpoints"} <= set(space.trial.model_dump())
    search = space.search.model_dump()
    assert {"metric", "mode", "num_samples", "max_concurrent_trials", "seed", "searcher",
            "n_startup_trials", "asha"} <= set(search)
    assert set(search["asha"]) == {"grace_period", "reduction_factor", "brackets"}
    assert set(space.constraints.model_dump()) == {"max_params", "max_macs"}
    yaml.safe_dump(space.model.model_dump())  # plain data all the way down
    yaml.safe_dump(space.train.model_dump())
    params, macs = space.min_complexity()
    assert params > 0 and macs > 0
    if space.constraints.max_params is not None:
        assert params <= space.constraints.max_params


def test_small_space_is_the_quick_cpu_default() -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    assert space.data.dataset == "mnist5k" and space.data.image_size == 32
    assert space.data.val_fraction * 5000 >= 1000  # one error is not a tie-breaker
    assert space.data.test_fraction > 0  # the winner is reported on held-out images
    assert space.search.enqueue == [{"model.layout": "CCTT"}]
    assert (space.num_classes, space.image_channel) == (10, 1)
    assert space.trial.use_gpu is False and space.trial.num_workers == 1
    assert space.search.max_concurrent_trials == 2
    assert space.search.asha.grace_period <= space.trial.epochs


def test_imagenet_space_reads_path_from_environment(imagenet_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    space = load_space(SPACES / "coatnet_imagenet.yaml")
    assert space.data.path == str(imagenet_dir)
    assert (space.num_classes, space.image_channel) == (3, 3)
    monkeypatch.delenv("IMAGENET_DIR")
    with pytest.raises(SpaceError, match=r"data\.path: environment variable IMAGENET_DIR"):
        load_space(SPACES / "coatnet_imagenet.yaml")


def test_space_import_does_not_import_ray() -> None:
    code = ("import sys\n"
            "from coatnet.search.space import load_space\n"
            f"space = load_space({str(SPACES / 'coatnet_small.yaml')!r})\n"
            "space.min_complexity()\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------- facts
def test_dataset_facts(tmp_path: Path) -> None:
    assert dataset_facts({"dataset": "digits"}) == (10, 1)
    assert dataset_facts({"dataset": "cifar10"}) == (10, 3)
    assert dataset_facts({"dataset": "cifar100"}) == (100, 3)
    assert dataset_facts({"dataset": "synthetic", "num_classes": 7, "image_channel": 2}) == (7, 2)
    flat = tmp_path / "flat"
    for cls in ("a", "b", "c", "d"):
        (flat / cls).mkdir(parents=True)
    (flat / ".hidden").mkdir()
    assert dataset_facts({"dataset": "imagefolder", "path": str(flat)}) == (4, 3)
    split = tmp_path / "split"
    for part in ("train", "val"):
        for cls in ("a", "b"):
            (split / part / cls).mkdir(parents=True)
    assert dataset_facts({"dataset": "imagefolder", "path": str(split)}) == (2, 3)


# ---------------------------------------------------------------------------- sampling
def _check_candidate(space: SearchSpace, trial: optuna.trial.FrozenTrial | optuna.Trial,
                     candidate: dict) -> None:
    assert set(candidate) == {"model", "hparams", "params", "macs", "infeasible_reason"}
    assert set(candidate["hparams"]) == {"lr", "weight_decay", "label_smoothing", "batch_size",
                                         "warmup_epochs"}
    hp = candidate["hparams"]
    assert isinstance(hp["lr"], float) and isinstance(hp["batch_size"], int)
    assert isinstance(hp["warmup_epochs"], int)
    values = trial.user_attrs["constraint"]
    assert len(values) == len(CONSTRAINT_NAMES)
    if candidate["model"] is None:
        assert candidate["infeasible_reason"] and values[2] > 0
        return
    config = CoAtNetConfig.from_dict(candidate["model"])
    assert config_problems(config) == []
    assert "".join(config.block_type_in_layers) in ALLOWED_LAYOUTS
    channels = config.num_channels_in_layers
    assert list(channels) == sorted(channels)
    assert config.image_height == config.image_width == space.data.image_size
    assert (config.num_classes, config.image_channel) == (space.num_classes, space.image_channel)
    assert isinstance(candidate["params"], int) and isinstance(candidate["macs"], int)
    limits = space.constraints
    fits = (limits.max_params is None or candidate["params"] <= limits.max_params) and \
        (limits.max_macs is None or candidate["macs"] <= limits.max_macs)
    assert fits == (candidate["infeasible_reason"] is None)
    assert fits == all(v <= 0 for v in values)
    min_params, min_macs = space.min_complexity()
    assert candidate["params"] >= min_params and candidate["macs"] >= min_macs


def test_define_by_run_yields_valid_candidates() -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    feasible = 0
    layouts = set()
    for _ in range(50):
        trial = study.ask()
        out = space.define_by_run(trial)
        assert set(out) == {"candidate"}
        candidate = out["candidate"]
        _check_candidate(space, trial, candidate)
        assert all("/" not in name for name in trial.params)
        assert space.candidate_from_params(trial.params).to_dict() == candidate
        feasible += candidate["infeasible_reason"] is None
        if candidate["model"] is not None:
            layouts.add("".join(candidate["model"]["block_type_in_layers"]))
        study.tell(trial, 0.0)
    assert feasible >= 25
    assert layouts == {"CCCC", "CCCT", "CCTT"}


def test_conditional_parameters_follow_the_layout(tmp_path: Path) -> None:
    text = BASE.replace("layout: CCTT", "layout: {type: categorical, choices: [CCCC, CCTT]}")
    text = text.replace("  channels:", "  head_dim: {type: categorical, choices: [16, 32]}\n"
                        "  attention_dropout: {type: float, low: 0.0, high: 0.2}\n  channels:")
    space = load_space(write(tmp_path, text))
    for layout, has_t in (("CCCC", False), ("CCTT", True)):
        study = optuna.create_study()
        study.enqueue_trial({"model.layout": layout})
        trial = study.ask()
        space.define_by_run(trial)
        assert ("model.head_dim" in trial.params) == has_t
        assert ("model.attention_dropout" in trial.params) == has_t


def test_t_stage_widths_are_sampled_on_the_head_dim_grid(tmp_path: Path) -> None:
    text = BASE.replace("s3: 64, s4: 64}", "s3: {type: int, low: 40, high: 136, step: 8}, "
                        "s4: {type: int, low: 64, high: 160, step: 8}}")
    text = text.replace("  channels:", "  head_dim: {type: categorical, choices: [16, 32]}\n"
                        "  channels:")
    space = load_space(write(tmp_path, text))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        candidate = space.define_by_run(trial)["candidate"]
        assert candidate["infeasible_reason"] is None, candidate
        model = candidate["model"]
        assert model["num_channels_in_layers"][3] % model["head_dim"] == 0
        assert model["num_channels_in_layers"][4] % model["head_dim"] == 0
        study.tell(trial, 0.0)


def test_categorical_channels_can_give_an_invalid_candidate(tmp_path: Path) -> None:
    text = BASE.replace("s3: 64, s4: 64}", "s3: 64, s4: {type: categorical, choices: [48, 96]}}")
    space = load_space(write(tmp_path, text))
    study = optuna.create_study()
    study.enqueue_trial({"model.channels.s4": 48})
    trial = study.ask()
    candidate = space.define_by_run(trial)["candidate"]
    assert candidate["model"] is None and candidate["params"] is None
    assert "model.channels.s4=48" in candidate["infeasible_reason"]
    assert trial.user_attrs["constraint"] == [0.0, 0.0, 1.0]
    assert constraints_func(study.trials[-1]) == [0.0, 0.0, 1.0]


def test_candidate_from_params_needs_every_sampled_param() -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    with pytest.raises(ValueError, match="model.layout"):
        space.candidate_from_params({})


def test_tpe_with_constraints_func_runs() -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # constraints_func is deprecated in 5.0
        sampler = optuna.samplers.TPESampler(constraints_func=constraints_func,
                                             n_startup_trials=4, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    pickle.dumps(constraints_func)
    for _ in range(12):
        trial = study.ask()
        candidate = space.define_by_run(trial)["candidate"]
        _check_candidate(space, trial, candidate)
        score = 0.0 if candidate["infeasible_reason"] else candidate["hparams"]["lr"]
        study.tell(trial, score)
    finished = study.trials
    assert len(finished) == 12
    for frozen in finished:
        assert list(frozen.constraints.values()) == frozen.user_attrs["constraint"]


def test_set_constraints_uses_optuna5_trial_constraints() -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(n_startup_trials=2, seed=0))
    for _ in range(4):
        trial = study.ask()
        space.define_by_run(trial, set_constraints=True)
        study.tell(trial, 0.0)
    for frozen in study.trials:
        assert set(frozen.constraints) == set(CONSTRAINT_NAMES)
        assert list(frozen.constraints.values()) == frozen.user_attrs["constraint"]


def test_constraint_reaches_the_real_trial_through_rays_captor() -> None:
    optuna_search = pytest.importorskip("ray.tune.search.optuna.optuna_search")
    space = load_space(SPACES / "coatnet_small.yaml")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    captor = optuna_search._OptunaTrialSuggestCaptor(trial)
    candidate = space.define_by_run(captor)["candidate"]
    assert trial.user_attrs["constraint"] == study.trials[0].user_attrs["constraint"]
    assert captor.captured_values == trial.params
    assert space.candidate_from_params(captor.captured_values).to_dict() == candidate


def test_space_pickles_with_its_sampler() -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    space.min_complexity()
    clone = pickle.loads(pickle.dumps(space))
    assert clone.sha256 == space.sha256 and clone.model == space.model
    study = optuna.create_study()
    trial = study.ask()
    assert clone.define_by_run(trial)["candidate"] == \
        space.candidate_from_params(trial.params).to_dict()


# ---------------------------------------------------------------------------- variants
def test_min_complexity_of_a_fixed_space_is_its_only_candidate(tmp_path: Path) -> None:
    from coatnet.complexity import count_params_and_macs

    space = load_space(write(tmp_path, BASE))
    trial = optuna.create_study().ask()
    candidate = space.define_by_run(trial)["candidate"]
    expected = count_params_and_macs(CoAtNetConfig.from_dict(candidate["model"]))
    assert space.min_complexity() == (expected.params, expected.macs)
    assert (candidate["params"], candidate["macs"]) == (expected.params, expected.macs)


def test_smoke_test_shrinks_the_run_not_the_space() -> None:
    space = load_space(SPACES / "coatnet_cifar10.yaml")
    smoke = space.smoke_test()
    assert 1 <= smoke.search.num_samples <= 3
    assert smoke.trial.epochs <= 2 and smoke.search.asha.grace_period <= smoke.trial.epochs
    assert smoke.data.subset is not None and smoke.data.subset <= 256
    assert smoke.data.image_size <= 64
    assert smoke.search.max_concurrent_trials <= 2
    assert smoke.model == space.model
    assert smoke.train.warmup_epochs == 1  # cifar10's 1..5 capped at the 2 smoke-test epochs
    assert space.trial.epochs == 30 and space.search.num_samples == 40  # original untouched
    trial = optuna.create_study().ask()
    candidate = smoke.define_by_run(trial)["candidate"]
    assert candidate["model"] is None or candidate["model"]["image_height"] <= 64


def test_with_overrides_validates(tmp_path: Path) -> None:
    space = load_space(SPACES / "coatnet_small.yaml")
    same = space.with_overrides()
    assert same is space
    other = space.with_overrides(num_samples=3, max_concurrent_trials=1, seed=7)
    assert (other.search.num_samples, other.search.max_concurrent_trials, other.search.seed) \
        == (3, 1, 7)
    assert space.search.num_samples != 3
    assert other.sha256 == space.sha256
    with pytest.raises(SpaceError, match=r"search\.num_samples: Input should be greater"):
        space.with_overrides(num_samples=0)


def test_sha256_is_of_the_file_bytes_and_stable(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    first, second = load_space(path), load_space(path)
    assert first.sha256 == second.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first.text == BASE and first.path == path
    path.write_text("# a comment changes the file\n" + BASE)
    assert load_space(path).sha256 != first.sha256


def test_error_lines_name_file_and_key_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    pattern = re.compile(r"^[\w.]+\.yaml: [^:]+: .+")
    for path in BAD_FILES:
        with pytest.raises(SpaceError) as info:
            load_space(path.name)
        for line in info.value.problems:
            assert pattern.match(line), line


def test_objectives_set_the_metric_and_mode(tmp_path: Path) -> None:
    """A two-objective space: the first objective is the search's metric and mode, the costs
    follow in order; no objectives keeps the single metric."""
    path = tmp_path / "two.yaml"
    path.write_text("""\
data: {dataset: synthetic, image_size: 32}
trial: {epochs: 2}
search:
  num_samples: 2
  searcher: nsga2
  objectives: [{metric: val_loss, mode: min}, {metric: macs, mode: min},
               {metric: latency_ms, mode: min}]
  latency: {batch_size: 4, threads: 2}
model:
  layout: CCTT
  depth: {s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}
  channels: {s0: 16, s1: 16, s2: 32, s3: 64, s4: 64}
train: {lr: 1e-3, batch_size: 32}
""")
    search = load_space(path).search
    assert (search.metric, search.mode) == ("val_loss", "min")
    assert [(o.metric, o.mode) for o in search.objectives] == [
        ("val_loss", "min"), ("macs", "min"), ("latency_ms", "min")]
    assert (search.latency.batch_size, search.latency.threads, search.latency.repeats) == \
        (4, 2, 10)
    single = tmp_path / "one.yaml"
    single.write_text(path.read_text().replace("  objectives: [{metric: val_loss, mode: min}, "
                                               "{metric: macs, mode: min},\n"
                                               "               {metric: latency_ms, mode: min}]\n",
                                               ""))
    assert load_space(single).search.objectives == []
    assert load_space(single).search.metric == "val_accuracy"
