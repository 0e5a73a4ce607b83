"""Search-space files: strict loading, validation and define-by-run sampling.

A space file (``search_spaces/*.yaml``, every key documented in ``search_spaces/README.md``)
has the sections ``data``, ``trial``, ``search``, ``constraints`` (fixed settings, pydantic
models) and ``model``, ``train`` (what is searched: each entry a fixed value or a
distribution). :func:`load_space` checks everything before anything runs and reports every
problem at once in a :class:`SpaceError`. One job per module, each importing only those above
it:

* ``strict_yaml``: the YAML loader (no duplicate keys, no tags, ``1e-3`` floats);
* ``schema``: the pydantic section models and the rules of each ``model``/``train`` entry;
* ``problems``: collecting problems and formatting them as a :class:`SpaceError`;
* ``feasibility``: smallest candidates, buildability and budget checks, params/MACs counting;
* ``sampling``: define-by-run sampling of a ``Candidate`` and the constraint values;
* ``cost_start``: the cost-spread start of an accuracy-versus-cost TPE search;
* ``searchspace``: the :class:`SearchSpace` a loaded file becomes;
* ``loading``: :func:`load_space` (the file, the schema, cross-section and data checks).

No module of this package imports Ray (directly or through its imports), so that validating a
file stays fast.
"""

from __future__ import annotations

from coatnet.search.errors import SpaceError
from coatnet.search.space.loading import dataset_facts, load_space
from coatnet.search.space.sampling import CONSTRAINT_NAMES, constraints_func
from coatnet.search.space.schema import (
    ALLOWED_LAYOUTS,
    AshaSection,
    CategoricalDist,
    ConstraintSection,
    DataSection,
    FloatDist,
    IntDist,
    ModelSpace,
    SearchSection,
    TrainSpace,
    TrialSection,
)
from coatnet.search.space.searchspace import SearchSpace

__all__ = [
    "ALLOWED_LAYOUTS",
    "CONSTRAINT_NAMES",
    "AshaSection",
    "CategoricalDist",
    "ConstraintSection",
    "DataSection",
    "FloatDist",
    "IntDist",
    "ModelSpace",
    "SearchSection",
    "SearchSpace",
    "SpaceError",
    "TrainSpace",
    "TrialSection",
    "constraints_func",
    "dataset_facts",
    "load_space",
]
