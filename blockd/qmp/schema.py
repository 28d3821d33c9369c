"""The QMP contract in ``schema/``: loading, argument validation, introspection.

Theory of operation
-------------------
Every command, event and named type is one JSON Schema (draft 2020-12) file; the
conventions are in ``schema/README.md``. :meth:`Schema.load` reads them into a
``referencing`` registry (each file gets a URI under :data:`BASE_URI`, so relative
``$ref``\\ s between files resolve) and checks that every file sticks to the constructions
the README allows, so a broken file fails loudly at start-up rather than at a client.

**Validation** is jsonschema's (a draft 2020-12 validator whose ``integer`` is a JSON
integer within int64/uint64, never ``1.0`` or ``true``). Its errors are then mapped to
QEMU's texts (qemu-behaviour.md §1.6) and the one QEMU would report is chosen by
simulating the order of QEMU's input visitor (``qemu/qemu: qapi/qobject-input-visitor.c``):
members are visited in schema order (bases first, then own members, then the members of
the selected union variant), an error inside a member comes before the next member, and
unknown keys of an object are reported only after all its declared members. An alternate
picks its branch by the value's JSON type, as QEMU does, and a value of no branch's type is
``Invalid parameter type for '<name>', expected: <AlternateName>``. The validators run
on an equivalent form of the files in which ``unevaluatedProperties: false`` is spelled
out as ``propertyNames`` lists (:meth:`Schema._closed`): jsonschema evaluates the former by
re-validating every branch at every level, exponential in the nesting of ``blockdev-add``.

**Introspection** (:meth:`Schema.introspect`, built by :mod:`blockd.qmp.introspect`) is
the ``query-qmp-schema`` answer in QEMU's ``SchemaInfo`` format (§1.9).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, Final

import jsonschema  # type: ignore[import-untyped]
import referencing
import referencing.jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped]

from blockd.errors import BlockdError, RequestError
from blockd.qmp.qdict import first_leftover

__all__ = ["BASE_URI", "Schema", "SchemaError", "shipped"]

#: The error for arguments nested too deeply for the validator (blockd's own text: QEMU
#: has no such limit below the parser's nesting limit of 1024).
TOO_DEEP: Final = "Parameters are nested too deeply"
#: The URI the schema directory is mounted at inside the registry.
BASE_URI: Final = "https://blockd.invalid/schema/"
_KINDS: Final = ("commands", "events", "types")
_BIG: Final = 1 << 30

_SCHEMA_KEYWORDS: Final = frozenset(
    {
        "$schema",
        "$comment",
        "$ref",
        "description",
        "title",
        "examples",
        "default",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "unevaluatedProperties",
        "items",
        "enum",
        "const",
        "allOf",
        "oneOf",
        "if",
        "then",
    }
)
_JSON_TYPES: Final = ("object", "array", "string", "integer", "number", "boolean", "null")
Node = Mapping[str, Any]

#: File contents (canonical JSON) already found to be valid draft 2020-12 schemas.
_WELL_FORMED: set[str] = set()

#: ``x-qmp-int`` values with a narrower range than int64, and that range.
_INT_RANGES: Final = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
}
#: ``x-qmp-int`` values whose visitor reads a uint64 (a wrong type gives "expects ...").
_UNSIGNED_WIDE: Final = {
    "uint8": "uint64",
    "uint16": "uint64",
    "uint32": "uint64",
    "uint64": "uint64",
    "size": "uint64",  # the input visitor reads a size as a uint64
}
_INT_TYPES: Final = frozenset({*_INT_RANGES, "int64", "uint64", "size"})


class SchemaError(BlockdError):
    """A schema file is missing, malformed or breaks the ``schema/README.md`` rules."""


def shipped() -> Traversable:
    """The schema directory installed with the package (``blockd._schema``).

    It is ``schema/`` at the top of the repository, which the build maps into the package
    (``pyproject.toml``); an editable install resolves it to that folder.
    """
    return files("blockd._schema")


def _is_integer(checker: Any, instance: object) -> bool:
    return type(instance) is int and -(1 << 63) <= instance < (1 << 64)


_Validator: Final = jsonschema.validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "integer"
    return "number"


def _path_name(path: Iterable[str | int]) -> str:
    # reference: full_name_nth() in qapi/qobject-input-visitor.c
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name = f"{name}.{part}" if name else part
    return name


def _own_name(path: list[str | int]) -> str:
    # enum and alternate errors use the member's own name; list elements have none
    return path[-1] if path and isinstance(path[-1], str) else "null"


def _walk_instance(instance: Any, path: list[str | int]) -> Any:
    for part in path:
        instance = instance[part]
    return instance


@dataclass(frozen=True)
class _Entry:
    uri: str
    contents: Node
    validator: Any


@dataclass(frozen=True)
class _Candidate:
    key: tuple[int, ...]
    desc: str


class Schema:
    """The loaded ``schema/`` directory. Build it with :meth:`load`.

    Attributes:
        commands: the command names.
        events: the event names.
    """

    def __init__(
        self, files: Mapping[str, Mapping[str, Node]], *, check_metaschema: bool = True
    ) -> None:
        self._check_metaschema = check_metaschema
        self._registry = self._make_registry(files)
        self._alternates: dict[str, list[str]] = {}
        for kind in _KINDS:
            for name, contents in files.get(kind, {}).items():
                uri = f"{BASE_URI}{kind}/{name}.json"
                self._check(f"{kind}/{name}.json", uri, contents)
        # The validators see an equivalent, faster form of the files (see _closed).
        closed = {
            kind: {
                name: self._closed(
                    contents, self._registry.resolver(f"{BASE_URI}{kind}/{name}.json")
                )
                for name, contents in files.get(kind, {}).items()
            }
            for kind in _KINDS
        }
        self._validation_registry = self._make_registry(closed)
        self._entries: dict[str, dict[str, _Entry]] = {}
        for kind in _KINDS:
            table: dict[str, _Entry] = {}
            for name, contents in sorted(files.get(kind, {}).items()):
                uri = f"{BASE_URI}{kind}/{name}.json"
                validator = _Validator({"$ref": uri}, registry=self._validation_registry)
                table[name] = _Entry(uri, contents, validator)
            self._entries[kind] = table
        self.commands: frozenset[str] = frozenset(self._entries["commands"])
        self.events: frozenset[str] = frozenset(self._entries["events"])
        self._introspection: list[dict[str, Any]] | None = None

    @staticmethod
    def _make_registry(files: Mapping[str, Mapping[str, Node]]) -> referencing.Registry[Any]:
        resources = []
        for kind in _KINDS:
            for name, contents in files.get(kind, {}).items():
                resource = referencing.jsonschema.DRAFT202012.create_resource(contents)
                resources.append((f"{BASE_URI}{kind}/{name}.json", resource))
        return referencing.Registry().with_resources(resources)

    def _closed(self, node: Any, resolver: Any) -> Any:
        """A copy of ``node`` with ``unevaluatedProperties: false`` replaced by explicit
        ``propertyNames`` lists.

        The two are equivalent for the README's constructions, but jsonschema evaluates
        ``unevaluatedProperties`` by validating every branch again, at every level, which
        makes nested ``blockdev-add`` options exponentially slow. Here each union branch
        (and each object with a base) lists the member names it allows.
        """
        if isinstance(node, list):
            return [self._closed(item, resolver) for item in node]
        if not isinstance(node, dict):
            return node
        copy = {key: self._closed(value, resolver) for key, value in node.items()}
        if node.get("x-qmp-int") in _INT_RANGES:
            copy["minimum"], copy["maximum"] = _INT_RANGES[node["x-qmp-int"]]
        if copy.get("unevaluatedProperties") is not False:
            return copy
        del copy["unevaluatedProperties"]
        tag = node.get("x-qmp-union")

        def names(instance: Any) -> dict[str, Any]:
            return {"enum": [name for name, _, _ in self._members(node, resolver, instance)]}

        if tag is None:
            copy["propertyNames"] = names(None)
            return copy
        branches = []
        cases = []
        for branch in copy.get("allOf", ()):
            if "if" in branch:
                case = self._case_of(branch, tag)
                cases.append(case)
                then = {"allOf": [branch.get("then", {})], "propertyNames": names({tag: case})}
                branch = {**branch, "then": then}
            branches.append(branch)
        tag_type, _ = self._deref(node["properties"][tag], resolver)
        rest = [value for value in tag_type.get("enum", ()) if value not in cases]
        if rest:
            branches.append(
                {
                    "if": {"properties": {tag: {"enum": rest}}, "required": [tag]},
                    "then": {"propertyNames": names(None)},
                }
            )
        copy["allOf"] = branches
        return copy

    @classmethod
    def load(cls, directory: Traversable | None = None, *, check_metaschema: bool = True) -> Schema:
        """Read ``commands/``, ``events/`` and ``types/`` under ``directory``.

        Args:
            directory: the schema directory (a :class:`~pathlib.Path` or any
                :class:`~importlib.resources.abc.Traversable`); default: the one the
                package ships (:func:`shipped`).
            check_metaschema: also check every file against the draft 2020-12
                metaschema (most of the load time). The daemon skips it for the schema
                it ships, which the test suite checks; the README's rules and every
                ``$ref`` are checked either way.

        Raises:
            SchemaError: a file is not valid JSON, not a valid draft 2020-12 schema, has a
                ``$ref`` that does not resolve, or breaks the README's rules.
        """
        if directory is None:
            directory = shipped()
        if not directory.is_dir():
            raise SchemaError(f"schema directory {directory} not found")
        files: dict[str, dict[str, Node]] = {}
        for kind in _KINDS:
            files[kind] = {}
            if not (directory / kind).is_dir():  # a schema may lack events/, say
                continue
            entries = sorted((e for e in (directory / kind).iterdir()), key=lambda e: e.name)
            for entry in entries:
                if not entry.name.endswith(".json"):
                    continue
                try:
                    contents = json.loads(entry.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise SchemaError(f"{kind}/{entry.name}: {exc}") from exc
                if not isinstance(contents, dict):
                    raise SchemaError(f"{kind}/{entry.name}: not a JSON object")
                files[kind][entry.name.removesuffix(".json")] = contents
        return cls(files, check_metaschema=check_metaschema)

    # --- checks at load time ---------------------------------------------------------------
    def _check(self, where: str, uri: str, contents: Node) -> None:
        text = json.dumps(contents, sort_keys=True)
        if self._check_metaschema and text not in _WELL_FORMED:  # slow: once per content
            try:
                Draft202012Validator.check_schema(contents)
            except jsonschema.SchemaError as exc:
                raise SchemaError(f"{where}: {exc.message}") from exc
            _WELL_FORMED.add(text)
        if "$id" in contents:
            raise SchemaError(f"{where}: do not write $id")
        resolver = self._registry.resolver(uri)
        self._walk(where, "", contents, resolver)
        returns = contents.get("x-qmp-returns")
        if returns is not None:
            self._walk(where, "/x-qmp-returns", returns, resolver)
        if not where.startswith("types/"):
            node, _ = self._deref(contents, resolver)
            if self._kind_of(node) != "object":
                raise SchemaError(f"{where}: must describe an object")

    def _walk(self, where: str, pointer: str, node: Any, resolver: Any) -> None:
        if not isinstance(node, dict):
            if node is True or node == {}:
                return
            raise SchemaError(f"{where}{pointer}: a schema must be an object")
        for key in node:
            if key not in _SCHEMA_KEYWORDS and not key.startswith("x-"):
                raise SchemaError(f"{where}{pointer}: unsupported keyword {key!r}")
        for key in ("additionalProperties", "unevaluatedProperties"):
            if key in node and node[key] is not False:
                raise SchemaError(f"{where}{pointer}: {key} must be false")
        if "x-qmp-int" in node and (
            node["x-qmp-int"] not in _INT_TYPES or node.get("type") != "integer"
        ):
            raise SchemaError(
                f"{where}{pointer}: x-qmp-int needs type integer and one of {sorted(_INT_TYPES)}"
            )
        if "$ref" in node:
            try:
                resolver.lookup(node["$ref"])
            except referencing.exceptions.Unresolvable as exc:
                raise SchemaError(f"{where}{pointer}: cannot resolve {node['$ref']!r}") from exc
        if "x-qmp-alternate" in node:
            name, kinds = node["x-qmp-alternate"], self._branch_types(where, node, resolver)
            if self._alternates.setdefault(name, kinds) != kinds:
                raise SchemaError(f"{where}{pointer}: another alternate is named {name!r}")
        if "x-qmp-union" in node:
            self._check_union(where + pointer, node)
        for name, sub in node.get("properties", {}).items():
            self._walk(where, f"{pointer}/properties/{name}", sub, resolver)
        for key in ("allOf", "oneOf"):
            for i, sub in enumerate(node.get(key, ())):
                self._walk(where, f"{pointer}/{key}/{i}", sub, resolver)
        for key in ("items", "then"):
            if key in node:
                self._walk(where, f"{pointer}/{key}", node[key], resolver)

    def _check_union(self, where: str, node: Node) -> None:
        tag = node["x-qmp-union"]
        if tag not in node.get("properties", {}) or tag not in node.get("required", ()):
            raise SchemaError(f"{where}: union tag {tag!r} must be a required member")
        for branch in node.get("allOf", ()):
            if "if" in branch and self._case_of(branch, tag) is None:
                raise SchemaError(f"{where}: branch must test {tag!r} with const (README)")

    @staticmethod
    def _case_of(branch: Node, tag: str) -> str | None:
        try:
            value = branch["if"]["properties"][tag]["const"]
        except (KeyError, TypeError):
            return None
        return value if isinstance(value, str) else None

    def _branch_types(self, where: str, node: Node, resolver: Any) -> list[str]:
        kinds = []
        for branch in node.get("oneOf", ()):
            resolved, _ = self._deref(branch, resolver)
            kind = self._kind_of(resolved)
            if kind == "alternate" or kind in kinds:
                raise SchemaError(f"{where}: alternate branches need distinct JSON types")
            kinds.append(kind)
        return kinds

    # --- structure helpers -----------------------------------------------------------------
    @staticmethod
    def _deref(node: Any, resolver: Any) -> tuple[Any, Any]:
        while isinstance(node, dict) and "$ref" in node:
            resolved = resolver.lookup(node["$ref"])
            node, resolver = resolved.contents, resolved.resolver
        return node, resolver

    @staticmethod
    def _kind_of(node: Any) -> str:
        """The JSON type a (dereferenced) schema accepts, or ``alternate``/``any``."""
        if not isinstance(node, dict):
            return "any"
        if "x-qmp-alternate" in node:
            return "alternate"
        kind = node.get("type")
        if isinstance(kind, str):
            return kind
        if "enum" in node:
            return "string"
        if "properties" in node or "allOf" in node or "x-qmp-union" in node:
            return "object"
        return "any"

    def _members(self, node: Any, resolver: Any, instance: Any) -> list[tuple[str, Any, Any]]:
        """The declared members of an object schema in QEMU's visiting order."""
        node, resolver = self._deref(node, resolver)
        members: list[tuple[str, Any, Any]] = []
        if not isinstance(node, dict):
            return members
        for sub in node.get("allOf", ()):
            if "if" not in sub:
                members += self._members(sub, resolver, instance)
        for name, sub in node.get("properties", {}).items():
            members.append((name, sub, resolver))
        tag = node.get("x-qmp-union")
        if tag is not None and isinstance(instance, dict) and tag in instance:
            for branch in node.get("allOf", ()):
                if "if" in branch and self._case_of(branch, tag) == instance[tag]:
                    members += self._members(branch.get("then", {}), resolver, instance)
        return members

    def _select(self, node: Any, resolver: Any, instance: Any) -> tuple[Any, Any]:
        """Dereference ``node``; for an alternate, the branch ``instance`` selects."""
        node, resolver = self._deref(node, resolver)
        if isinstance(node, dict) and "x-qmp-alternate" in node:
            index = self._branch_index(node["x-qmp-alternate"], instance)
            if index is not None:
                return self._deref(node["oneOf"][index], resolver)
        return node, resolver

    def _branch_index(self, alternate: str, instance: Any) -> int | None:
        kinds = self._alternates.get(alternate, [])
        kind = _json_type(instance)
        for wanted in (kind, "number" if kind == "integer" else None, "any"):
            if wanted in kinds:
                return kinds.index(wanted)
        return None

    # --- validation ------------------------------------------------------------------------
    def validate_arguments(self, command: str, arguments: Mapping[str, Any]) -> None:
        """Check a command's ``arguments`` object; return quietly when it is valid.

        Raises:
            KeyError: ``command`` is not in the schema.
            RequestError: the first error QEMU would report, with its text (§1.6).
        """
        self._validate(self._entries["commands"][command], arguments, RequestError)

    def validate_event(self, event: str, data: Mapping[str, Any]) -> None:
        """Check an event's ``data`` (for tests: blockd's own events must conform).

        Raises:
            KeyError: unknown event. ValueError: ``data`` does not match the schema.
        """
        self._validate(self._entries["events"][event], data, ValueError)

    def validate_return(self, command: str, value: Any) -> None:
        """Check a command's return value against its ``x-qmp-returns`` (``{}`` if none).

        Raises:
            KeyError: unknown command. ValueError: ``value`` does not match.
        """
        entry = self._entries["commands"][command]
        if "x-qmp-returns" not in entry.contents:
            if value != {}:
                raise ValueError(f"{command} returns {{}}, not {value!r}")
            return
        schema = {"$ref": f"{entry.uri}#/x-qmp-returns"}
        validator = _Validator(schema, registry=self._validation_registry)
        returns = _Entry(entry.uri, schema, validator)
        self._validate(returns, value, ValueError)

    def _validate(self, entry: _Entry, instance: Any, error: type[Exception]) -> None:
        try:
            errors = list(entry.validator.iter_errors(instance))
        except RecursionError:
            # jsonschema recurses per level; only absurdly deep inline options get here
            raise error(TOO_DEEP) from None
        if not errors:
            return
        first = errors[0]
        root, resolver = self._deref(entry.contents, self._registry.resolver(entry.uri))
        candidates: list[_Candidate] = []
        for exc in errors:
            self._candidates(exc, root, resolver, instance, candidates)
        if not candidates:  # an error kind the README does not allow; keep jsonschema's
            raise error(first.message)
        raise error(min(candidates, key=lambda c: c.key).desc)

    def _candidates(
        self, exc: ValidationError, root: Any, resolver: Any, instance: Any, out: list[_Candidate]
    ) -> None:
        path = list(exc.absolute_path)
        keyword = exc.validator
        value = exc.instance
        if keyword == "oneOf" and isinstance(exc.schema, dict):
            alternate = exc.schema.get("x-qmp-alternate")
            if alternate is not None:
                index = self._branch_index(alternate, value)
                if index is None:
                    desc = f"Invalid parameter type for '{_own_name(path)}', expected: {alternate}"
                    out.append(_Candidate(self._key(root, resolver, instance, path, 0), desc))
                else:
                    for sub in exc.context or ():
                        if sub.relative_schema_path and sub.relative_schema_path[0] == index:
                            self._candidates(sub, root, resolver, instance, out)
                return
        int_type = exc.schema.get("x-qmp-int") if isinstance(exc.schema, dict) else None
        if keyword == "type" and int_type in _UNSIGNED_WIDE:
            # reference: qobject_input_type_uint64() and _size(): "Parameter '%s' expects %s"
            desc = f"Parameter '{_path_name(path)}' expects {_UNSIGNED_WIDE[int_type]}"
            out.append(_Candidate(self._key(root, resolver, instance, path, 0), desc))
        elif keyword == "type":
            expected = exc.validator_value
            if isinstance(expected, list):
                expected = expected[0]
            desc = f"Invalid parameter type for '{_path_name(path)}', expected: {expected}"
            out.append(_Candidate(self._key(root, resolver, instance, path, 0), desc))
        elif keyword in ("minimum", "maximum") and int_type in _INT_RANGES:
            # reference: visit_type_intN()/visit_type_uintN() in qapi/qapi-visit-core.c
            desc = f"Parameter '{_own_name(path)}' expects {int_type}_t"
            out.append(_Candidate(self._key(root, resolver, instance, path, 0), desc))
        elif keyword == "enum" and "propertyNames" in exc.relative_schema_path:
            # an unknown key (the closed form of unevaluatedProperties, see _closed)
            where, node, node_resolver = self._locate(root, resolver, instance, path)
            container = _walk_instance(instance, path)
            self._unexpected(where, path, node, node_resolver, container, out)
        elif keyword in ("enum", "const"):
            if isinstance(value, str):
                desc = f"Parameter '{_own_name(path)}' does not accept value '{value}'"
            else:
                desc = f"Invalid parameter type for '{_path_name(path)}', expected: string"
            out.append(_Candidate(self._key(root, resolver, instance, path, 1), desc))
        elif keyword == "required" and isinstance(value, dict):
            for name in exc.validator_value:
                if name not in value:
                    full = [*path, name]
                    desc = f"Parameter '{_path_name(full)}' is missing"
                    out.append(_Candidate(self._key(root, resolver, instance, full, 0), desc))
        elif keyword in ("additionalProperties", "unevaluatedProperties"):
            if not isinstance(value, dict):
                return
            where, node, node_resolver = self._locate(root, resolver, instance, path)
            self._unexpected(where, path, node, node_resolver, value, out)

    def _unexpected(
        self,
        where: list[int],
        path: list[str | int],
        node: Any,
        resolver: Any,
        value: Any,
        out: list[_Candidate],
    ) -> None:
        """The unknown key QEMU reports for the object ``value`` at ``path``."""
        if not isinstance(value, dict):
            return
        declared = [name for name, _, _ in self._members(node, resolver, value)]
        visited = [name for name in declared if name in value]
        name = first_leftover(list(value), visited)
        if name is not None:
            desc = f"Parameter '{_path_name([*path, name])}' is unexpected"
            out.append(_Candidate((*where, _BIG), desc))

    def _locate(
        self, root: Any, resolver: Any, instance: Any, path: list[str | int]
    ) -> tuple[list[int], Any, Any]:
        """Walk ``path`` as QEMU's visitor would: the member positions level by level, and
        the schema (alternates resolved) that applies at the end."""
        key: list[int] = []
        node, resolver = self._select(root, resolver, instance)
        for part in path:
            sub: Any = {}
            if isinstance(part, int):
                key.append(part)
                if isinstance(node, dict):
                    sub = node.get("items", {})
            else:
                members = self._members(node, resolver, instance)
                names = [name for name, _, _ in members]
                if part in names:
                    index = names.index(part)
                    key.append(index)
                    sub, resolver = members[index][1], members[index][2]
                else:
                    key.append(_BIG - 1)
            try:
                instance = instance[part]
            except (KeyError, IndexError, TypeError):
                instance = None
            node, resolver = self._select(sub, resolver, instance)
        return key, node, resolver

    def _key(
        self, root: Any, resolver: Any, instance: Any, path: list[str | int], rank: int
    ) -> tuple[int, ...]:
        return (*self._locate(root, resolver, instance, path)[0], rank)

    def allow_oob(self, command: str) -> bool:
        """True when ``command`` may be run with ``exec-oob`` (``x-qmp-allow-oob``)."""
        return bool(self._entries["commands"][command].contents.get("x-qmp-allow-oob", False))

    def members(self, command: str) -> list[str]:
        """The top-level argument names of ``command`` in schema order (base members of a
        boxed union only)."""
        entry = self._entries["commands"][command]
        resolver = self._registry.resolver(entry.uri)
        return [name for name, _, _ in self._members(entry.contents, resolver, {})]

    def describe(self, kind: str, name: str) -> Mapping[str, Any]:
        """The raw contents of ``<kind>/<name>.json`` (kind: commands, events, types)."""
        return self._entries[kind][name].contents

    # --- introspection ---------------------------------------------------------------------
    def introspect(self) -> list[dict[str, Any]]:
        """The ``query-qmp-schema`` return value (§1.9); computed once, then cached.

        The list is a fresh copy each time, so callers may modify it.
        """
        if self._introspection is None:
            from blockd.qmp.introspect import introspect

            self._introspection = introspect(self)
        return json.loads(json.dumps(self._introspection))  # type: ignore[no-any-return]
