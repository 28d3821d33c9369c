"""``query-qmp-schema``: the introspection of ``schema/`` in QEMU's ``SchemaInfo`` format.

Rules (docs/qemu-behaviour/qmp-protocol.md §9, mirroring ``qemu/qemu: scripts/qapi/introspect.py``'s
output): builtins keep their names and carry ``json-type``; every other type gets a
decimal name in first-use order; every integer type is ``int``; arrays are ``[T]`` with
``element-type``; optional members carry ``"default": null``; enums list ``members`` and
the older ``values``; a flat union is an object with ``tag`` and one variant per tag value
(values without a branch get the shared empty object, QAPI's implicit empty variant);
commands have ``arg-type``/``ret-type`` (the shared empty object when there are no
arguments or no return value) and ``allow-oob`` only when true; ``features`` appear only
when non-empty. Only types reachable from a command or event are listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from blockd.qmp.model import Alternate, AnyType, Array, Enum, Object, Ref, Scalar, Type, resolve

if TYPE_CHECKING:
    from blockd.qmp.schema import Schema

__all__ = ["introspect"]

_BUILTINS: Final = (
    ("str", "string"),
    ("int", "int"),
    ("number", "number"),
    ("bool", "boolean"),
    ("null", "null"),
    ("any", "value"),
)
_BUILTIN_OF_TYPE: Final = {
    "string": "str",
    "integer": "int",
    "number": "number",
    "boolean": "bool",
    "null": "null",
}


class _Introspector:
    """Builds the SchemaInfo list; see :meth:`Schema.introspect`."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.entities: list[dict[str, Any]] = [
            {"name": name, "meta-type": "builtin", "json-type": json_type}
            for name, json_type in _BUILTINS
        ]
        self.names: dict[int, str] = {}  # id() of a model type -> its masked name
        self.arrays: set[str] = set()
        self.empty: str | None = None
        self.counter = 0

    def run(self) -> list[dict[str, Any]]:
        schema = self.schema
        for name in sorted(schema.commands):
            command = schema.command(name)
            info: dict[str, Any] = {"name": name, "meta-type": "command"}
            info["arg-type"] = self.type_name(command.arguments, root=True)
            info["ret-type"] = (
                self.empty_type() if command.returns is None else self.type_name(command.returns)
            )
            if command.allow_oob:
                info["allow-oob"] = True
            self.features(info, command.features)
            self.entities.append(info)
        for name in sorted(schema.events):
            event = schema.event(name)
            info = {"name": name, "meta-type": "event"}
            info["arg-type"] = self.type_name(event.data, root=True)
            self.features(info, event.features)
            self.entities.append(info)
        return self.entities

    @staticmethod
    def features(info: dict[str, Any], features: tuple[str, ...]) -> None:
        if features:
            info["features"] = list(features)

    def masked(self) -> str:
        name = str(self.counter)
        self.counter += 1
        return name

    def empty_type(self) -> str:
        if self.empty is None:
            self.empty = self.masked()
            self.entities.append({"name": self.empty, "meta-type": "object", "members": []})
        return self.empty

    def type_name(self, kind: Type, *, root: bool = False) -> str:
        named = isinstance(kind, Ref)
        kind = resolve(kind)
        if isinstance(kind, Scalar):
            return _BUILTIN_OF_TYPE[kind.json_type]
        if isinstance(kind, AnyType):
            return "any"
        if isinstance(kind, Array):
            element = self.type_name(kind.items)
            name = f"[{element}]"
            if name not in self.arrays:
                self.arrays.add(name)
                self.entities.append({"name": name, "meta-type": "array", "element-type": element})
            return name
        if id(kind) in self.names:
            return self.names[id(kind)]
        if isinstance(kind, Object) and not kind.members and kind.tag is None:
            return self.empty_type()
        name = self.names[id(kind)] = self.masked()
        info: dict[str, Any] = {"name": name}
        self.entities.append(info)
        if isinstance(kind, Enum):
            info["meta-type"] = "enum"
            info["members"] = []
            for value in kind.values:
                member: dict[str, Any] = {"name": value}
                self.features(member, kind.value_features.get(value, ()))
                info["members"].append(member)
            info["values"] = list(kind.values)
        elif isinstance(kind, Alternate):
            info["meta-type"] = "alternate"
            info["members"] = [{"type": self.type_name(branch)} for branch in kind.branches]
        else:
            info["meta-type"] = "object"
            self.object_info(info, kind)
        if named or not root:
            # a command's or event's own features are on its entity, not its arguments'
            self.features(info, kind.features)
        return name

    def object_info(self, info: dict[str, Any], kind: Object) -> None:
        members = []
        for member in kind.members:
            entry: dict[str, Any] = {"name": member.name, "type": self.type_name(member.type)}
            if not member.required:
                entry["default"] = None
            self.features(entry, member.features)
            members.append(entry)
        info["members"] = members
        if kind.tag is not None:
            info["tag"] = kind.tag
            # Every tag value is a case; one without a variant has the empty type (QAPI's
            # implicit empty variant), as QEMU's introspection shows.
            tag = next(member for member in kind.members if member.name == kind.tag)
            cases = resolve(tag.type)
            assert isinstance(cases, Enum)
            info["variants"] = [
                {
                    "case": case,
                    "type": self.type_name(kind.variants[case])
                    if case in kind.variants
                    else self.empty_type(),
                }
                for case in cases.values
            ]


def introspect(schema: Schema) -> list[dict[str, Any]]:
    """The ``query-qmp-schema`` return value for ``schema``."""
    return _Introspector(schema).run()
