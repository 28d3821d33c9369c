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

if TYPE_CHECKING:
    from blockd.qmp.schema import Node, Schema

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
        self.names: dict[int, str] = {}
        self.keep: list[Any] = []
        self.arrays: set[str] = set()
        self.empty: str | None = None
        self.counter = 0

    def run(self) -> list[dict[str, Any]]:
        schema = self.schema
        for kind in ("commands", "events"):
            for name, entry in schema._entries[kind].items():
                resolver = schema._registry.resolver(entry.uri)
                info: dict[str, Any] = {"name": name, "meta-type": kind[:-1]}
                info["arg-type"] = self.type_name(entry.contents, resolver, root=True)
                if kind == "commands":
                    returns = entry.contents.get("x-qmp-returns")
                    info["ret-type"] = (
                        self.empty_type() if returns is None else self.type_name(returns, resolver)
                    )
                    if entry.contents.get("x-qmp-allow-oob"):
                        info["allow-oob"] = True
                self.features(info, entry.contents)
                self.entities.append(info)
        return self.entities

    @staticmethod
    def features(info: dict[str, Any], node: Any) -> None:
        features = node.get("x-qmp-features") if isinstance(node, dict) else None
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

    def type_name(self, node: Any, resolver: Any, *, root: bool = False) -> str:
        named = isinstance(node, dict) and "$ref" in node
        node, resolver = self.schema._deref(node, resolver)
        kind = self.schema._kind_of(node)
        if kind in _BUILTIN_OF_TYPE and "enum" not in node:
            return _BUILTIN_OF_TYPE[kind]
        if kind == "any":
            return "any"
        if kind == "array":
            element = self.type_name(node.get("items", {}), resolver)
            name = f"[{element}]"
            if name not in self.arrays:
                self.arrays.add(name)
                self.entities.append({"name": name, "meta-type": "array", "element-type": element})
            return name
        if id(node) in self.names:
            return self.names[id(node)]
        if (
            kind == "object"
            and not self.schema._members(node, resolver, None)
            and ("x-qmp-union" not in node)
        ):
            return self.empty_type()
        name = self.names[id(node)] = self.masked()
        self.keep.append(node)
        info: dict[str, Any] = {"name": name, "meta-type": kind}
        self.entities.append(info)
        if kind == "string":  # an enum
            info["meta-type"] = "enum"
            value_features = node.get("x-qmp-value-features", {})
            info["members"] = []
            for value in node["enum"]:
                member: dict[str, Any] = {"name": value}
                if value_features.get(value):
                    member["features"] = list(value_features[value])
                info["members"].append(member)
            info["values"] = list(node["enum"])
        elif kind == "alternate":
            info["members"] = [
                {"type": self.type_name(branch, resolver)} for branch in node["oneOf"]
            ]
        else:
            self.object_info(info, node, resolver)
        if named or not root:
            self.features(info, node)
        return name

    def object_info(self, info: dict[str, Any], node: Node, resolver: Any) -> None:
        members = []
        required: set[str] = set()
        self.collect_required(node, resolver, required)
        for name, sub, sub_resolver in self.schema._members(node, resolver, None):
            member: dict[str, Any] = {"name": name, "type": self.type_name(sub, sub_resolver)}
            if name not in required:
                member["default"] = None
            self.features(member, sub)
            members.append(member)
        info["members"] = members
        tag = node.get("x-qmp-union")
        if tag is not None:
            info["tag"] = tag
            branches = {
                self.schema._case_of(branch, tag): branch.get("then", {})
                for branch in node.get("allOf", ())
                if "if" in branch
            }
            # Every tag value is a case; one without a branch has the empty type (QAPI's
            # implicit empty variant), as QEMU's introspection shows.
            tag_type, _ = self.schema._deref(node["properties"][tag], resolver)
            cases = list(tag_type.get("enum", ())) if isinstance(tag_type, dict) else []
            cases += [case for case in branches if case not in cases]
            info["variants"] = [
                {
                    "case": case,
                    "type": self.type_name(branches[case], resolver)
                    if case in branches
                    else self.empty_type(),
                }
                for case in cases
            ]

    def collect_required(self, node: Any, resolver: Any, out: set[str]) -> None:
        node, resolver = self.schema._deref(node, resolver)
        if not isinstance(node, dict):
            return
        out.update(node.get("required", ()))
        for sub in node.get("allOf", ()):
            if "if" not in sub:
                self.collect_required(sub, resolver, out)


def introspect(schema: Schema) -> list[dict[str, Any]]:
    """The ``query-qmp-schema`` return value for ``schema``."""
    return _Introspector(schema).run()
