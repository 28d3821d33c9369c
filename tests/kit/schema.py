"""The files of ``schema/`` judged from outside blockd: jsonschema as the oracle for
blockd's own validator, hypothesis values made from the files alone, and libvirt's
schema probe.

The oracle: blockd validates with a walk of its own (``blockd.qmp.validate``); the files in
``schema/`` stay standard draft 2020-12 JSON Schema, and here jsonschema judges them as such:
the metaschema check of every file (:func:`metaschema_errors`), and what a value of a
command, event or return type must be (:class:`Oracle`, :func:`schema_errors`). Two
readings of the README are spelled out for jsonschema: ``"integer"`` is a JSON integer
(never ``1.0`` or ``true``: jsonschema's own ``integer`` takes ``1.0``, QEMU does not), and
its range, int64 or the one its ``x-qmp-int`` names, is a ``minimum``/``maximum`` pair. An
unsigned 64-bit type's range starts at -2^63, as QEMU wraps negative int64 values.

The values: :class:`Values` walks the raw JSON Schema files (not blockd's model of them),
so what it makes is independent of the validator under test. With ``faults`` it plants
mistakes at random places: a value of the wrong JSON type, an enum value or union tag that
does not exist, an integer out of its range (int64 or its ``x-qmp-int``), a float or a bool
for an integer, a required member left out, an unknown or another variant's member added.
Inline ``blockdev-add`` options nest up to ``max_depth`` objects deep.

The probe: :func:`probe` resolves a libvirt-style query path in a ``query-qmp-schema``
answer (docs/clients.md §2.2).
"""

from __future__ import annotations

import functools
import json
import posixpath
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from typing import Any, Final

import jsonschema
import referencing
import referencing.jsonschema
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from kit.repo import SCHEMA

#: The URI the schema directory is mounted at inside the registry.
BASE_URI: Final = "https://blockd.invalid/schema/"
KINDS: Final = ("commands", "events", "types")
#: the ranges of the ``x-qmp-int`` types (``int64`` for a plain integer), from their widths
#: (not read from ``blockd.qmp.validate``: the oracle stays independent of what it judges)
INT_RANGES: Final = {
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (-(1 << 63), (1 << 64) - 1),
    "size": (-(1 << 63), (1 << 64) - 1),
    **{f"int{bits}": (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) for bits in (8, 16, 32)},
    **{f"uint{bits}": (0, (1 << bits) - 1) for bits in (8, 16, 32)},
}
Files = Mapping[str, Mapping[str, Any]]


def read_files(directory: Traversable) -> dict[str, dict[str, Any]]:
    """The parsed ``<kind>/<name>.json`` files under ``directory``."""
    files: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        files[kind] = {}
        for entry in (directory / kind).iterdir():
            if entry.name.endswith(".json"):
                files[kind][entry.name.removesuffix(".json")] = json.loads(entry.read_text())
    return files


def metaschema_errors(files: Files) -> list[str]:
    """``<kind>/<name>.json: <message>`` for every file that is no draft 2020-12 schema."""
    errors = []
    for kind, table in files.items():
        for name, contents in sorted(table.items()):
            try:
                Draft202012Validator.check_schema(contents)
            except jsonschema.SchemaError as exc:
                errors.append(f"{kind}/{name}.json: {exc.message}")
    return errors


def _is_integer(checker: Any, instance: object) -> bool:
    return type(instance) is int


Validator: Final = jsonschema.validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def spelled_out(node: Any) -> Any:
    """A copy of ``node`` with each integer's range also written as ``minimum``/``maximum``."""
    if isinstance(node, list):
        return [spelled_out(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: spelled_out(value) for key, value in node.items()}
    if node.get("type") == "integer":
        copy["minimum"], copy["maximum"] = INT_RANGES[node.get("x-qmp-int", "int64")]
    return copy


class Oracle:
    """What jsonschema accepts for the files ``files`` (kind -> name -> contents)."""

    def __init__(self, files: Files) -> None:
        resources = [
            (
                f"{BASE_URI}{kind}/{name}.json",
                referencing.jsonschema.DRAFT202012.create_resource(spelled_out(contents)),
            )
            for kind, table in files.items()
            for name, contents in table.items()
        ]
        self.registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources)
        self._validators: dict[str, Any] = {}

    def validator(self, kind: str, name: str, pointer: str = "") -> Any:
        """The validator of ``<kind>/<name>.json`` (or of the JSON pointer in it)."""
        uri = f"{BASE_URI}{kind}/{name}.json" + (f"#{pointer}" if pointer else "")
        if uri not in self._validators:
            self._validators[uri] = Validator({"$ref": uri}, registry=self.registry)
        return self._validators[uri]

    def accepts(self, kind: str, name: str, instance: Any) -> bool:
        """Whether ``instance`` is valid for the file ``<kind>/<name>.json``."""
        return bool(self.validator(kind, name).is_valid(instance))


def schema_errors(relative: str, instance: Any) -> list[str]:
    """Messages of ``instance`` failing ``schema/<relative>`` (``"commands/x.json"``) of
    the checked-out schema, as the :class:`Oracle` judges it."""
    kind, _, name = relative.removesuffix(".json").partition("/")
    validator = _checkout_oracle().validator(kind, name)
    return [error.message for error in validator.iter_errors(instance)]


@functools.cache
def _checkout_oracle() -> Oracle:
    return Oracle(read_files(SCHEMA))


# --- values --------------------------------------------------------------------------------

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


# --- the probe -------------------------------------------------------------------


def probe(schema: list[dict[str, Any]], query: str) -> bool:
    """Whether a libvirt-style query path resolves in a ``query-qmp-schema`` answer.

    The language of libvirt's ``virQEMUQAPISchemaPathExists`` (docs/clients.md §2.2): the
    first component names a command or event; then ``arg-type``/``ret-type`` follow that member;
    a plain component names an object member (``*name``: it must be optional, i.e. have a
    ``default``), ``+case`` selects a union variant, ``^value`` tests an enum value and
    ``$feature`` a feature. Arrays are looked through to their element type.
    """
    entities = {entity["name"]: entity for entity in schema}
    parts = query.split("/")
    current = entities.get(parts[0])
    for part in parts[1:]:
        while current is not None and current["meta-type"] == "array":
            current = entities.get(current["element-type"])
        if current is None:
            return False
        if part in ("arg-type", "ret-type"):
            current = entities.get(current.get(part, ""))
        elif part.startswith("$"):
            return part[1:] in current.get("features", [])
        elif part.startswith("^"):
            return current["meta-type"] == "enum" and part[1:] in current["values"]
        elif part.startswith("+"):
            variants = {v["case"]: v["type"] for v in current.get("variants", [])}
            current = entities.get(variants.get(part[1:], ""))
        else:
            optional = part.startswith("*")
            name = part.lstrip("*")
            members = {m["name"]: m for m in current.get("members", []) if "name" in m}
            if current["meta-type"] != "object" or name not in members:
                return False
            if optional and "default" not in members[name]:
                return False
            current = entities.get(members[name]["type"])
    return current is not None
