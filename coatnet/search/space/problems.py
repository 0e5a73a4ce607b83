"""Collecting the problems of a space file and turning them into one :class:`SpaceError`.

Every check adds ``(key.path, why)`` pairs to a ``_Problems``; pydantic's errors are
translated into the same form (``from_pydantic``). ``error()`` formats them as
``<file>: <key.path>: <why>`` lines, so all problems are reported at once.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from coatnet.search.errors import SpaceError


class _Problems:
    """Collects ``(key.path, why)`` pairs; formats them with the file name."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, why: str) -> None:
        self.items.append((path, why))

    def __len__(self) -> int:
        return len(self.items)

    def from_pydantic(self, err: ValidationError, *, prefix: str,
                      model: type[BaseModel]) -> None:
        for item in err.errors():
            loc = item["loc"]
            path = _join(prefix, *loc)
            kind = item["type"]
            if kind == "extra_forbidden":
                keys = _fields_at(model, loc[:-1])
                why = "unknown key; allowed keys: " + ", ".join(keys)
            elif kind == "missing":
                why = "required key is missing"
            elif kind in ("model_type", "model_attributes_type", "dict_type"):
                why = f"must be a mapping of keys (got {item['input']!r})"
            else:
                why = f"{item['msg']} (got {item['input']!r})"
                if kind == "bool_type":
                    why += "; write true or false"
            self.add(path, why)

    def error(self) -> SpaceError:
        return SpaceError([f"{self.file}: {path}: {why}" for path, why in self.items])


def _join(*parts: Any) -> str:
    out = ""
    for part in parts:
        if part in ("", None):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) pydantic model reached by ``loc``."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        # an optional section (``AshaSection | None``): the model inside it
        options = [annotation, *typing.get_args(annotation)]
        nested = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            model = nested[0]
        else:
            break
    return sorted(model.model_fields)
