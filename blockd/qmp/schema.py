"""The QMP contract in ``schema/``: loading, argument validation, introspection.

Theory of operation
-------------------
Every command, event and named type is one JSON Schema (draft 2020-12) file, written with
the few constructions ``schema/README.md`` allows. :meth:`Schema.load` reads the files and
turns them into QAPI's view of them, the values of :mod:`blockd.qmp.model`: each file of
``types/`` becomes one named type, each inline schema an anonymous one, a base is merged
into its object (base members first) and a flat union keeps its tag and its variants.
Reading a file is checking it: a keyword, a shape or a ``$ref`` outside the README's rules
stops the load with a :class:`SchemaError` that names the file and the JSON pointer, so a
broken file fails at start-up rather than at a client. Reading and checking the shipped
schema takes about 2 ms, so the daemon does both at every start.

**Validation** (:meth:`Schema.validate_arguments`) is :func:`blockd.qmp.validate.first_error`:
a walk of the arguments along the model in the order of QEMU's QAPI input visitor
(``qemu/qemu: qapi/qobject-input-visitor.c``), which stops at the first error with QEMU's
text (docs/qemu-behaviour/qmp-protocol.md §6). The rules keep the files and the model
equivalent: blockd accepts exactly what a draft 2020-12 validator accepts for the files
(``integer`` being a JSON integer within int64, or within the range its ``x-qmp-int``
names). The test
suite holds it to that with jsonschema as the oracle, and checks the files against the
metaschema; the daemon imports no JSON Schema library.

**Introspection** (:meth:`Schema.introspect`, built by :mod:`blockd.qmp.introspect` from
:meth:`Schema.command` and :meth:`Schema.event`) is the ``query-qmp-schema`` answer in
QEMU's ``SchemaInfo`` format (docs/qemu-behaviour/qmp-protocol.md §9).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import replace
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, Final

from blockd.errors import BlockdError, RequestError
from blockd.qmp.model import (
    ANY,
    Alternate,
    Array,
    Command,
    Enum,
    Event,
    Member,
    Object,
    Ref,
    Resolved,
    Scalar,
    Type,
    qtype_of_type,
    resolve,
)
from blockd.qmp.validate import TOO_DEEP, first_error

__all__ = ["TOO_DEEP", "Schema", "SchemaError", "shipped"]

_KINDS: Final = ("commands", "events", "types")
Node = Mapping[str, Any]

#: Keywords that only annotate (``x-...`` keys annotate too, but for the ``x-qmp-*`` ones
#: with a meaning, below).
_ANNOTATIONS: Final = frozenset(
    {"$schema", "$comment", "description", "title", "examples", "default"}
)
#: The validation keywords the README allows.
_KEYWORDS: Final = frozenset(
    {
        "$ref",
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
#: The annotations that change what a schema means.
_MEANINGFUL: Final = frozenset({"x-qmp-union", "x-qmp-alternate", "x-qmp-int"})
#: What may not stand beside ``$ref``.
_NOT_BESIDE_REF: Final = (_KEYWORDS | _MEANINGFUL) - {"$ref"}
#: The ``type`` each keyword needs.
_NEEDS_TYPE: Final = {
    "properties": "object",
    "required": "object",
    "additionalProperties": "object",
    "unevaluatedProperties": "object",
    "allOf": "object",
    "x-qmp-union": "object",
    "items": "array",
    "enum": "string",
    "x-qmp-int": "integer",
}
_CLOSERS: Final = ("additionalProperties", "unevaluatedProperties")
_JSON_TYPES: Final = ("object", "array", "string", "integer", "number", "boolean", "null")
_INT_TYPES: Final = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size"}
)
#: What a schema is used as, for the README's rules on closing objects.
_VALUE: Final = "value"  # a member, list element, alternate branch, command or event
_PART: Final = "part"  # a base or a union variant: merged into a closed object
_FILE: Final = "file"  # a types/ file: its uses decide


class SchemaError(BlockdError):
    """A schema file is missing, malformed or breaks the ``schema/README.md`` rules."""


def shipped() -> Traversable:
    """The schema directory installed with the package (``blockd._schema``).

    It is ``schema/`` at the top of the repository, which the build maps into the package
    (``pyproject.toml``); an editable install resolves it to that folder.
    """
    return files("blockd._schema")


class Schema:
    """The loaded ``schema/`` directory. Build it with :meth:`load`.

    Args:
        files: kind (``commands``, ``events``, ``types``) -> name -> parsed file contents;
            a missing kind has no files.

    Raises:
        SchemaError: a file breaks the README's rules (the message names the file and the
            JSON pointer inside it).

    Attributes:
        commands: the command names.
        events: the event names.
    """

    def __init__(self, files: Mapping[str, Mapping[str, Node]]) -> None:
        self._files = {kind: dict(files.get(kind, {})) for kind in _KINDS}
        reader = _Reader(self._files)
        self._commands, self._events = reader.read()
        self.commands: frozenset[str] = frozenset(self._commands)
        self.events: frozenset[str] = frozenset(self._events)
        self._introspection: list[dict[str, Any]] | None = None

    @classmethod
    def load(cls, directory: Traversable | None = None) -> Schema:
        """Read ``commands/``, ``events/`` and ``types/`` under ``directory``.

        Args:
            directory: the schema directory (a :class:`~pathlib.Path` or any
                :class:`~importlib.resources.abc.Traversable`); default: the one the
                package ships (:func:`shipped`).

        Raises:
            SchemaError: the directory is missing, or a file is not a JSON object, has a
                ``$ref`` that does not resolve or breaks the README's rules.
        """
        if directory is None:
            directory = shipped()
        if not directory.is_dir():
            raise SchemaError(f"schema directory {directory} not found")
        found: dict[str, dict[str, Node]] = {}
        for kind in _KINDS:
            found[kind] = {}
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
                found[kind][entry.name.removesuffix(".json")] = contents
        return cls(found)

    # --- the model ---------------------------------------------------------------------------
    def command(self, name: str) -> Command:
        """The command ``name``.

        Raises:
            KeyError: ``name`` is not in the schema.
        """
        return self._commands[name]

    def event(self, name: str) -> Event:
        """The event ``name``.

        Raises:
            KeyError: ``name`` is not in the schema.
        """
        return self._events[name]

    def allow_oob(self, command: str) -> bool:
        """True when ``command`` may be run with ``exec-oob`` (``x-qmp-allow-oob``)."""
        return self._commands[command].allow_oob

    def members(self, command: str) -> list[str]:
        """The top-level argument names of ``command`` in schema order (base members of a
        boxed union only)."""
        arguments = resolve(self._commands[command].arguments)
        assert isinstance(arguments, Object)
        return [member.name for member in arguments.members]

    def describe(self, kind: str, name: str) -> Node:
        """The raw contents of ``<kind>/<name>.json`` (kind: commands, events, types)."""
        return self._files[kind][name]

    # --- validation --------------------------------------------------------------------------
    def validate_arguments(self, command: str, arguments: Mapping[str, Any]) -> None:
        """Check a command's ``arguments`` object; return quietly when it is valid.

        Raises:
            KeyError: ``command`` is not in the schema.
            RequestError: the first error QEMU would report, with its text
                (docs/qemu-behaviour/qmp-protocol.md §6).
        """
        desc = first_error(self._commands[command].arguments, arguments)
        if desc is not None:
            raise RequestError(desc)

    def validate_event(self, event: str, data: Mapping[str, Any]) -> None:
        """Check an event's ``data`` (for tests: blockd's own events must conform).

        Raises:
            KeyError: unknown event. ValueError: ``data`` does not match the schema.
        """
        desc = first_error(self._events[event].data, data)
        if desc is not None:
            raise ValueError(desc)

    def validate_return(self, command: str, value: Any) -> None:
        """Check a command's return value against its ``x-qmp-returns`` (``{}`` if none).

        Raises:
            KeyError: unknown command. ValueError: ``value`` does not match.
        """
        returns = self._commands[command].returns
        if returns is None:
            if value != {}:
                raise ValueError(f"{command} returns {{}}, not {value!r}")
            return
        desc = first_error(returns, value)
        if desc is not None:
            raise ValueError(desc)

    # --- introspection -----------------------------------------------------------------------
    def introspect(self) -> list[dict[str, Any]]:
        """The ``query-qmp-schema`` return value (docs/qemu-behaviour/qmp-protocol.md §9);
        computed once, then cached.

        The list is a fresh copy each time, so callers may modify it.
        """
        if self._introspection is None:
            from blockd.qmp.introspect import introspect

            self._introspection = introspect(self)
        return json.loads(json.dumps(self._introspection))  # type: ignore[no-any-return]


class _Reader:
    """Turns the parsed files into the model, checking the README's rules on the way.

    Each ``types/`` file is read once into :attr:`table`. A member, list element or
    alternate branch that names a file becomes a :class:`Ref` into the table; a base or a
    variant is read on the spot (they cannot be cyclic), and so is a union's tag type. The
    rules that need a named type read in full (a value's object must be closed, alternate
    branches need distinct QTypes) are checked once every file is read.
    """

    def __init__(self, files: Mapping[str, Mapping[str, Node]]) -> None:
        self.files = files
        self.table: dict[str, Type] = {}
        self.reading: set[str] = set()
        self.uses: list[tuple[str, Ref]] = []  # (where, ref) of the refs used as values
        self.alternates: dict[str, str] = {}  # name -> where
        self.alternate_uses: list[tuple[str, Alternate]] = []

    def read(self) -> tuple[dict[str, Command], dict[str, Event]]:
        for name in sorted(self.files["types"]):
            self.named(f"types/{name}")
        commands = {
            name: self.command(name, contents)
            for name, contents in sorted(self.files["commands"].items())
        }
        events = {
            name: self.event(name, contents)
            for name, contents in sorted(self.files["events"].items())
        }
        for where, ref in self.uses:
            target = self.resolved(where, ref)
            if isinstance(target, Object) and not target.closed:
                raise SchemaError(
                    f"{where}: {ref.key}.json is open, which is only for a base or a union"
                    " variant; close it (README)"
                )
        for where, alternate in self.alternate_uses:
            qtypes = [qtype_of_type(self.resolved(where, branch)) for branch in alternate.branches]
            if None in qtypes or len(set(qtypes)) < len(qtypes):
                raise SchemaError(
                    f"{where}: alternate branches need distinct JSON types (integer and"
                    " number count as one; no alternate or {} branch)"
                )
        return commands, events

    # --- files -------------------------------------------------------------------------------
    def named(self, key: str) -> Type:
        """The type of the file ``key`` (``types/<Name>``), read on first use."""
        if key in self.table:
            return self.table[key]
        if key in self.reading:
            raise SchemaError(f"{key}.json: it is its own base or union variant")
        self.reading.add(key)
        contents = self.files["types"][key.removeprefix("types/")]
        self.check_file(f"{key}.json", contents)
        self.table[key] = self.type(f"{key}.json", "", contents, _FILE)
        self.reading.discard(key)
        return self.table[key]

    def resolved(self, where: str, kind: Type) -> Resolved:
        """``kind`` with its refs followed, reading the files they name."""
        seen: set[str] = set()
        while isinstance(kind, Ref):
            if kind.key in seen:
                raise SchemaError(f"{where}: a cycle of $refs through {kind.key}.json")
            seen.add(kind.key)
            kind = self.named(kind.key)
        return kind

    @staticmethod
    def check_file(where: str, contents: Node) -> None:
        if "$id" in contents:
            raise SchemaError(f"{where}: do not write $id")

    def command(self, name: str, contents: Node) -> Command:
        where = f"commands/{name}.json"
        arguments = self.root(where, contents)
        returns = None
        if "x-qmp-returns" in contents:
            returns = self.type(where, "/x-qmp-returns", contents["x-qmp-returns"], _VALUE)
        allow_oob = contents.get("x-qmp-allow-oob", False)
        if not isinstance(allow_oob, bool):
            raise SchemaError(f"{where}: x-qmp-allow-oob must be true or false")
        return Command(name, arguments, returns, allow_oob, self.features(where, contents))

    def event(self, name: str, contents: Node) -> Event:
        where = f"events/{name}.json"
        return Event(name, self.root(where, contents), self.features(where, contents))

    def root(self, where: str, contents: Node) -> Type:
        """The type of a command's arguments or an event's data: an object."""
        self.check_file(where, contents)
        kind = self.type(where, "", contents, _VALUE)
        if not isinstance(self.resolved(where, kind), Object):
            raise SchemaError(f"{where}: must describe an object")
        if isinstance(kind, Object):
            # the file's features are the command's or event's, not its arguments'
            kind = replace(kind, features=())
        return kind

    # --- schemas -----------------------------------------------------------------------------
    def type(self, where: str, pointer: str, node: Any, use: str) -> Type:
        """The type of the schema ``node`` at ``pointer`` in the file ``where``."""
        at = where + pointer
        if node is True and use != _PART:  # true: anything, as {}
            return ANY
        if not isinstance(node, dict):
            raise SchemaError(f"{at}: a schema must be an object")
        for key in node:
            if key not in _KEYWORDS and key not in _ANNOTATIONS and not key.startswith("x-"):
                raise SchemaError(f"{at}: unsupported keyword {key!r}")
        for key in _CLOSERS:
            if key in node and node[key] is not False:
                raise SchemaError(f"{at}: {key} must be false")
        for key in ("const", "if", "then"):
            if key in node:
                raise SchemaError(f"{at}: {key!r} belongs in a union branch (README)")
        if "x-qmp-int" in node and (
            node["x-qmp-int"] not in _INT_TYPES or node.get("type") != "integer"
        ):
            raise SchemaError(f"{at}: x-qmp-int needs type integer and one of {sorted(_INT_TYPES)}")
        features = self.features(at, node)
        if "$ref" in node:
            return self.reference(where, pointer, node, use)
        if "x-qmp-alternate" in node or "oneOf" in node:
            return self.alternate(where, pointer, node, use, features)
        json_type = node.get("type")
        if json_type is not None and json_type not in _JSON_TYPES:
            raise SchemaError(f"{at}: type {json_type!r} is not one of {list(_JSON_TYPES)}")
        for key, needed in _NEEDS_TYPE.items():
            if key in node and json_type != needed and not (key == "enum" and json_type is None):
                raise SchemaError(f'{at}: {key} needs "type": "{needed}"')
        if use == _PART and json_type != "object":
            raise SchemaError(f"{at}: a base or union variant must be an object")
        if json_type == "object":
            return self.object(where, pointer, node, use, features)
        if json_type == "array":
            if "items" not in node:
                return Array(ANY)
            return Array(self.type(where, f"{pointer}/items", node["items"], _VALUE))
        if "enum" in node:
            return self.enum(at, node, features)
        if json_type is None:
            return ANY
        return Scalar(json_type, node.get("x-qmp-int"))

    def reference(self, where: str, pointer: str, node: Node, use: str) -> Type:
        at = where + pointer
        beside = [key for key in node if key in _NOT_BESIDE_REF]
        if beside:
            raise SchemaError(f"{at}: only annotations may stand beside $ref, not {beside[0]!r}")
        target = node["$ref"]
        key = None
        if isinstance(target, str) and "#" not in target and ":" not in target:
            path = posixpath.normpath(posixpath.join(posixpath.dirname(where), target))
            folder, _, name = path.partition("/")
            if folder == "types" and name.endswith(".json") and name[:-5] in self.files["types"]:
                key = path[:-5]
        if key is None:
            raise SchemaError(f"{at}: cannot resolve {target!r} (a $ref names a types/ file)")
        ref = Ref(key, self.table)
        if use == _PART:
            part = self.resolved(at, ref)
            if not isinstance(part, Object) or part.tag is not None or part.closed:
                raise SchemaError(
                    f"{at}: a base or union variant is an open object, not a union (README)"
                )
            return part
        if use == _VALUE:  # (a types/ file that is only a $ref: its own uses decide)
            self.uses.append((at, ref))
        return ref

    def alternate(
        self, where: str, pointer: str, node: Node, use: str, features: tuple[str, ...]
    ) -> Alternate:
        at = where + pointer
        name, branches = node.get("x-qmp-alternate"), node.get("oneOf")
        if not isinstance(name, str) or not isinstance(branches, list) or not branches:
            raise SchemaError(f"{at}: an alternate has both x-qmp-alternate (its name) and oneOf")
        beside = [key for key in node if key in _NOT_BESIDE_REF]
        beside = [key for key in beside if key not in ("oneOf", "x-qmp-alternate")]
        if beside:
            raise SchemaError(f"{at}: an alternate has only oneOf, not {beside[0]!r}")
        if use == _PART:
            raise SchemaError(f"{at}: a base or union variant must be an object")
        if name in self.alternates:
            raise SchemaError(f"{at}: another alternate is named {name!r}")
        self.alternates[name] = at
        alternate = Alternate(
            name,
            tuple(
                self.type(where, f"{pointer}/oneOf/{i}", branch, _VALUE)
                for i, branch in enumerate(branches)
            ),
            features,
        )
        self.alternate_uses.append((at, alternate))
        return alternate

    @staticmethod
    def enum(at: str, node: Node, features: tuple[str, ...]) -> Enum:
        values = node["enum"]
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(value, str) for value in values)
            or len(set(values)) < len(values)
        ):
            raise SchemaError(f"{at}: enum values must be distinct strings")
        value_features = node.get("x-qmp-value-features", {})
        if not isinstance(value_features, dict):
            raise SchemaError(f"{at}: x-qmp-value-features maps values to feature lists")
        return Enum(
            tuple(values),
            {
                value: _Reader.features(f"{at}/x-qmp-value-features", {"x-qmp-features": names})
                for value, names in value_features.items()
                if names
            },
            features,
        )

    def object(
        self, where: str, pointer: str, node: Node, use: str, features: tuple[str, ...]
    ) -> Object:
        at = where + pointer
        properties = node.get("properties", {})
        required = node.get("required", [])
        parts = node.get("allOf", [])
        if not isinstance(properties, dict):
            raise SchemaError(f"{at}: properties must be an object")
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise SchemaError(f"{at}: required must list member names")
        if not isinstance(parts, list):
            raise SchemaError(f"{at}: allOf must be a list")
        members: list[Member] = []
        branches: list[tuple[str, Node]] = []
        for i, part in enumerate(parts):
            if isinstance(part, dict) and ("if" in part or "then" in part):
                branches.append((f"{pointer}/allOf/{i}", part))
                continue
            base = self.type(where, f"{pointer}/allOf/{i}", part, _PART)
            assert isinstance(base, Object)
            members += base.members
        for name, sub in properties.items():
            sub_at = f"{at}/properties/{name}"
            kind = self.type(where, f"{pointer}/properties/{name}", sub, _VALUE)
            members.append(Member(name, kind, False, self.features(sub_at, sub)))
        names = [member.name for member in members]
        for name in required:
            if name not in names:
                raise SchemaError(f"{at}: required {name!r} is not a member")
        members = [
            replace(member, required=True)
            if member.name in required and not member.required
            else member
            for member in members
        ]
        self.no_clash(at, names)
        tag = node.get("x-qmp-union")
        variants: dict[str, Object] = {}
        if tag is not None:
            if tag not in properties or tag not in required:
                raise SchemaError(f"{at}: union tag {tag!r} must be a required member")
            tag_type = self.resolved(at, members[names.index(tag)].type)
            if not isinstance(tag_type, Enum):
                raise SchemaError(f"{at}: union tag {tag!r} must be an enum")
            for branch_pointer, branch in branches:
                case = self.case(where + branch_pointer, branch, tag)
                if case not in tag_type.values:
                    raise SchemaError(f"{where}{branch_pointer}: {case!r} is no value of {tag!r}")
                if case in variants:
                    raise SchemaError(f"{where}{branch_pointer}: a second branch for {case!r}")
                variant = self.type(where, f"{branch_pointer}/then", branch["then"], _PART)
                assert isinstance(variant, Object)
                self.no_clash(where + branch_pointer, names + [m.name for m in variant.members])
                variants[case] = variant
        elif branches:
            raise SchemaError(f"{where}{branches[0][0]}: if/then only make union branches")
        closed_by = [key for key in _CLOSERS if key in node]
        if closed_by == ["additionalProperties"] and (len(branches) < len(parts) or tag):
            raise SchemaError(
                f"{at}: an object with a base or union branches is closed by"
                " unevaluatedProperties (README)"
            )
        if len(closed_by) > 1:
            raise SchemaError(f"{at}: close with additionalProperties or unevaluatedProperties")
        if use == _VALUE and not closed_by:
            raise SchemaError(f'{at}: close the object with "additionalProperties": false')
        if use == _PART and (closed_by or tag is not None):
            raise SchemaError(f"{at}: a base or union variant is an open object, not a union")
        return Object(tuple(members), bool(closed_by), features, tag, variants)

    @staticmethod
    def case(at: str, branch: Node, tag: str) -> str:
        """The tag value a union branch tests (README: ``if`` with ``const``, ``then``)."""
        condition: Any = branch.get("if")
        try:
            test = condition["properties"][tag]
            value = test["const"]
            ok = (
                set(condition) == {"properties", "required"}
                and condition["required"] == [tag]
                and list(condition["properties"]) == [tag]
                and list(test) == ["const"]
                and isinstance(value, str)
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise SchemaError(f"{at}: branch must test {tag!r} with const (README)")
        if "then" not in branch or any(
            key not in ("if", "then") and key not in _ANNOTATIONS for key in branch
        ):
            raise SchemaError(f"{at}: a union branch is an if and a then (README)")
        return str(value)

    @staticmethod
    def no_clash(at: str, names: list[str]) -> None:
        for i, name in enumerate(names):
            if name in names[:i]:
                raise SchemaError(f"{at}: member {name!r} is declared twice")

    @staticmethod
    def features(at: str, node: Any) -> tuple[str, ...]:
        found = node.get("x-qmp-features", []) if isinstance(node, dict) else []
        if not isinstance(found, list) or not all(isinstance(name, str) for name in found):
            raise SchemaError(f"{at}: x-qmp-features must be a list of names")
        return tuple(found)
