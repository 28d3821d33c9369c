"""The types that ``schema/`` describes, as QAPI sees them.

:class:`~blockd.qmp.schema.Schema` reads the JSON Schema files into these values once, at
load time; validation (:mod:`blockd.qmp.validate`) and introspection
(:mod:`blockd.qmp.introspect`) walk them instead of the files. Each file of ``types/`` is
one value, shared by every place that names it, and each inline schema is its own value:
the identity of a value is the identity of the QAPI type.

Named types may refer to each other in cycles (``BlockdevOptions`` -> ``BlockdevRef`` ->
``BlockdevOptions``), so a member, list element or alternate branch that names a file is
a :class:`Ref`, looked up in the schema's table when it is visited. Bases and union
variants are never cyclic and are merged into their object when it is read: an
:class:`Object` lists its members base members first, as QEMU visits them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

__all__ = [
    "ANY",
    "Alternate",
    "AnyType",
    "Array",
    "Command",
    "Enum",
    "Event",
    "Member",
    "Object",
    "Ref",
    "Resolved",
    "Scalar",
    "Type",
    "qtype_of_type",
    "qtype_of_value",
    "resolve",
]


@dataclass(frozen=True, eq=False)
class AnyType:
    """QAPI's ``any``: every JSON value (the schema ``{}``)."""


#: The one :class:`AnyType`.
ANY: Final = AnyType()


@dataclass(frozen=True, eq=False)
class Scalar:
    """A built-in type other than ``any``.

    Attributes:
        json_type: ``string``, ``integer``, ``number``, ``boolean`` or ``null``.
        int_kind: for an integer, its ``x-qmp-int`` (``int8`` ... ``size``), or None for
            a plain ``int`` (QAPI's ``int``: int64).
    """

    json_type: str
    int_kind: str | None = None


@dataclass(frozen=True, eq=False)
class Enum:
    """An enumeration of strings.

    Attributes:
        values: the values, in schema order.
        value_features: the features of each value that has some (``x-qmp-value-features``).
        features: the type's features.
    """

    values: tuple[str, ...]
    value_features: Mapping[str, tuple[str, ...]]
    features: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Array:
    """A list whose elements are all of type ``items``."""

    items: Type


@dataclass(frozen=True, eq=False)
class Member:
    """A member of an object.

    Attributes:
        name: the key.
        type: its type.
        required: whether the member is mandatory.
        features: the member's features.
    """

    name: str
    type: Type
    required: bool
    features: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Object:
    """A struct, or a flat union when ``tag`` is set.

    Attributes:
        members: the members in visiting order: base members first, then its own.
        closed: unknown keys are errors. False only for objects that serve as a base or
            union variant; the object they are merged into is closed.
        features: the type's features.
        tag: the union's discriminator (one of ``members``, its type an :class:`Enum`),
            or None for a struct.
        variants: the members each tag value adds, for the values that add some.
    """

    members: tuple[Member, ...]
    closed: bool
    features: tuple[str, ...]
    tag: str | None = None
    variants: Mapping[str, Object] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Alternate:
    """A value of one of several types, told apart by the JSON type of the value.

    Attributes:
        name: the QAPI name, which error texts quote.
        branches: the types; no two accept the same JSON type.
        features: the type's features.
    """

    name: str
    branches: tuple[Type, ...]
    features: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Ref:
    """A named type (a ``types/`` file) looked up when it is needed.

    Attributes:
        key: ``types/<Name>``.
        table: the schema's named types; filled while the schema loads.
    """

    key: str
    table: Mapping[str, Type] = field(repr=False)

    @property
    def target(self) -> Type:
        """The named type (itself a :class:`Ref` when the file is only a ``$ref``)."""
        return self.table[self.key]


#: Any type.
Type: TypeAlias = AnyType | Scalar | Enum | Array | Object | Alternate | Ref
#: A type that is not a :class:`Ref`.
Resolved: TypeAlias = AnyType | Scalar | Enum | Array | Object | Alternate


def resolve(kind: Type) -> Resolved:
    """``kind`` with every :class:`Ref` followed (the loader rejects cycles of them)."""
    while isinstance(kind, Ref):
        kind = kind.target
    return kind


@dataclass(frozen=True, eq=False)
class Command:
    """A command.

    Attributes:
        name: the command name.
        arguments: the type of ``arguments`` (it resolves to an :class:`Object`).
        returns: the type of ``return``, or None when the command returns ``{}``.
        allow_oob: it may run with ``exec-oob``.
        features: the command's features.
    """

    name: str
    arguments: Type
    returns: Type | None
    allow_oob: bool
    features: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Event:
    """An event: its name, the type of its ``data`` (an :class:`Object`), its features."""

    name: str
    data: Type
    features: tuple[str, ...]


def qtype_of_value(value: object) -> str:
    """The QAPI QType of a JSON value: ``number`` for every integer and float."""
    # reference: qobject_type() in include/qobject/qobject.h: one QNum for all numbers
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
    return "number"


def qtype_of_type(kind: Type) -> str | None:
    """The QType an alternate branch of type ``kind`` takes, or None if it has none."""
    # reference: alternate_qtype() in scripts/qapi/schema.py
    kind = resolve(kind)
    if isinstance(kind, Scalar):
        return "number" if kind.json_type == "integer" else kind.json_type
    if isinstance(kind, Enum):
        return "string"
    if isinstance(kind, Array):
        return "array"
    if isinstance(kind, Object):
        return "object"
    return None
