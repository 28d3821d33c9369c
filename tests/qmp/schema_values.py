"""Hypothesis strategies for values of the types in ``schema/``, read from the files alone.

:class:`Values` walks the raw JSON Schema files (not blockd's model of them), so what it
makes is independent of the validator under test. With ``faults`` it plants mistakes at
random places: a value of the wrong JSON type, an enum value or union tag that does not
exist, an integer out of its range (int64 or its ``x-qmp-int``), a float or a bool
for an integer, a required member left out, an unknown or another variant's member added.
Inline ``blockdev-add`` options nest up to ``max_depth`` objects deep.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any, Final

from hypothesis import strategies as st

from .oracle import INT_RANGES

_STRINGS: Final = st.sampled_from(["", "x", "node0", "file", "qcow2", "report", "\u00e9"])
_JUNK: Final = [None, True, False, 0, -1, 1.0, 1.5, "", "nope", [], [1], {}, {"x": 1},
                1 << 64, -(1 << 63) - 1]  # fmt: skip
_SMALL_JSON: Final = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | _STRINGS,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(_STRINGS, inner, max_size=2),
    max_leaves=4,
)
Node = Any


class Values:
    """Strategies for the commands and events of the parsed files ``files``.

    Args:
        files: kind (``commands``, ``events``, ``types``) -> name -> file contents.
        faults: plant mistakes (about one node in ``1/fault_rate``).
        max_depth: objects nested deeper get only their required members, and alternates
            take a branch that is not an object when they have one.
    """

    def __init__(
        self,
        files: Mapping[str, Mapping[str, Any]],
        *,
        faults: bool = True,
        fault_rate: int = 12,
        max_depth: int = 3,
    ) -> None:
        self.files = files
        self.faults = faults
        self.fault_rate = fault_rate
        self.max_depth = max_depth
        names: set[str] = set()
        for table in files.values():
            for contents in table.values():
                _collect_names(contents, names)
        self.names = [*sorted(names), "zz-unknown", "a", "Driver"]

    def arguments(self, command: str) -> st.SearchStrategy[dict[str, Any]]:
        """Argument objects of ``command`` (always JSON objects)."""
        return self._root("commands", command)

    def event_data(self, event: str) -> st.SearchStrategy[dict[str, Any]]:
        """``data`` objects of ``event``."""
        return self._root("events", event)

    def _root(self, kind: str, name: str) -> st.SearchStrategy[dict[str, Any]]:
        node = self.files[kind][name]
        where = f"{kind}/{name}.json"

        @st.composite
        def draw_root(draw: st.DrawFn) -> dict[str, Any]:
            value = self._value(draw, node, where, 0)
            return value if isinstance(value, dict) else {}

        return draw_root()

    # --- the schema, read as jsonschema reads it -------------------------------------------
    def _deref(self, node: Node, where: str) -> tuple[Node, str]:
        while isinstance(node, dict) and "$ref" in node:
            where = posixpath.normpath(posixpath.join(posixpath.dirname(where), node["$ref"]))
            kind, name = where.split("/")
            node = self.files[kind][name.removesuffix(".json")]
        return node, where

    def _members(self, node: Node, where: str) -> list[tuple[str, Node, str, bool]]:
        """(name, schema, its file, required) of an object and its bases, bases first."""
        node, where = self._deref(node, where)
        found: list[tuple[str, Node, str, bool]] = []
        for sub in node.get("allOf", ()):
            if "if" not in sub:
                found += self._members(sub, where)
        required = set(node.get("required", ()))
        for name, sub in node.get("properties", {}).items():
            found.append((name, sub, where, name in required))
        return found

    # --- drawing ---------------------------------------------------------------------------
    def _value(self, draw: st.DrawFn, node: Node, where: str, depth: int) -> Any:
        node, where = self._deref(node, where)
        if self.faults and draw(st.integers(0, self.fault_rate - 1)) == 0:
            return self._fault(draw, node, where, depth)
        if node is True or not isinstance(node, dict):
            return draw(_SMALL_JSON)
        if "x-qmp-alternate" in node:
            branches = node["oneOf"]
            if depth >= self.max_depth:
                flat = [b for b in branches if self._kind(b, where) != "object"]
                branches = flat or branches
            branch = draw(st.sampled_from(branches))
            return self._value(draw, branch, where, depth)
        kind = self._kind(node, where)
        if kind == "object":
            return self._object(draw, node, where, depth)
        if kind == "array":
            size = draw(st.integers(0, 2 if depth < self.max_depth else 1))
            return [self._value(draw, node.get("items", {}), where, depth + 1) for _ in range(size)]
        if "enum" in node:
            return draw(st.sampled_from(node["enum"]))
        if kind == "string":
            return draw(_STRINGS)
        if kind == "integer":
            low, high = INT_RANGES[node.get("x-qmp-int", "int64")]
            return draw(st.sampled_from([low, high, 0, 1]) | st.integers(low, high))
        if kind == "number":
            return draw(st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False))
        if kind == "boolean":
            return draw(st.booleans())
        if kind == "null":
            return None
        return draw(_SMALL_JSON)

    def _kind(self, node: Node, where: str) -> str:
        node, _ = self._deref(node, where)
        if not isinstance(node, dict):
            return "any"
        if "x-qmp-alternate" in node:
            return "alternate"
        if "type" in node:
            return str(node["type"])
        return "string" if "enum" in node else "any"

    def _object(self, draw: st.DrawFn, node: Node, where: str, depth: int) -> dict[str, Any]:
        members = self._members(node, where)
        tag = node.get("x-qmp-union")
        if tag is not None:
            tag_type, _ = self._deref(node["properties"][tag], where)
            case = draw(st.sampled_from(tag_type["enum"]))
            for branch in node.get("allOf", ()):
                if "if" in branch and branch["if"]["properties"][tag]["const"] == case:
                    members += self._members(branch["then"], where)
        value: dict[str, Any] = {}
        for name, sub, sub_where, required in members:
            if name == tag:
                value[name] = case
            elif required or (depth < self.max_depth and draw(st.integers(0, 3)) == 0):
                value[name] = self._value(draw, sub, sub_where, depth + 1)
        order = draw(st.permutations(list(value)))
        return {key: value[key] for key in order}

    def _fault(self, draw: st.DrawFn, node: Node, where: str, depth: int) -> Any:
        """A value that is likely wrong for ``node``."""
        kind = self._kind(node, where)
        if kind == "object" and isinstance(node, dict) and draw(st.booleans()):
            value = self._object(draw, node, where, self.max_depth)
            roll = draw(st.integers(0, 2))
            if roll == 0 and value:
                del value[draw(st.sampled_from(sorted(value)))]
            elif roll == 1:
                value[draw(st.sampled_from(self.names))] = draw(_SMALL_JSON)
            elif "x-qmp-union" in node:
                value[node["x-qmp-union"]] = draw(st.sampled_from(["nope", 1, None]))
            return value
        if isinstance(node, dict) and "enum" in node and draw(st.booleans()):
            return draw(st.sampled_from(["nope", node["enum"][0].upper() + "!"]))
        if kind == "integer" and draw(st.booleans()):
            low, high = INT_RANGES[node.get("x-qmp-int", "int64")]
            return draw(st.sampled_from([low - 1, high + 1, 1.0, True, -(1 << 63) - 1, 1 << 64]))
        if kind == "array" and draw(st.booleans()):
            return [draw(st.sampled_from(_JUNK))]
        return draw(st.sampled_from(_JUNK))


def _collect_names(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        out.update(node.get("properties", {}))
        for value in node.values():
            _collect_names(value, out)
    elif isinstance(node, list):
        for item in node:
            _collect_names(item, out)
