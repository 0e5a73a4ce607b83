"""A strict YAML loader for search-space files.

PyYAML's ``safe_load`` silently keeps the last of two duplicate keys, reads ``1e-3`` as the
string ``'1e-3'`` (YAML 1.1 wants a dot) and reads ``yes``/``no``/``on``/``off`` as booleans.
All three turn typos into silently different searches, so this loader:

* rejects duplicate keys, naming the key and both lines;
* rejects every explicit tag (``!!python/object``, ``!!str``, ``!custom``): a space file is
  plain data;
* reads ``1e-3``, ``1E+5``, ``5e-4`` and ``1.5e3`` as floats;
* reads only ``true``/``false`` (any case) as booleans, so ``mode: on`` stays a string and
  fails validation loudly instead of becoming ``True``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.nodes import MappingNode

__all__ = ["StrictYAMLError", "StrictSafeLoader", "load_yaml"]

_FLOAT_WITH_EXPONENT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_BOOL_TAG = "tag:yaml.org,2002:bool"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYAMLError(yaml.YAMLError):
    """A strictness rule was broken; ``line`` is 1-based (None when unknown)."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without duplicate keys, tags or YAML 1.1 booleans, with 1e-3 floats."""

    # Own copy of the resolver table: never mutate yaml.SafeLoader's class attribute.
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, (ScalarEvent, SequenceStartEvent, MappingStartEvent)) \
                and event.tag is not None:
            tag = event.tag.replace("tag:yaml.org,2002:", "!!")
            raise StrictYAMLError(
                f"tag {tag!r} is not allowed: a space file holds plain data only "
                "(numbers, strings, true/false, null, lists and mappings)",
                line=event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: let PyYAML report it
                    continue
                if first is not None:
                    raise StrictYAMLError(
                        f"duplicate key {key!r} (first defined at line {first}); each key may "
                        "appear only once in a mapping", line=line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictSafeLoader.add_implicit_resolver(_BOOL_TAG, _BOOL, list("tTfF"))
StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITH_EXPONENT,
                                       list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse ``text`` with :class:`StrictSafeLoader` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
