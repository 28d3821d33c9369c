"""Argument validation as QEMU's QAPI input visitor does it, with QEMU's error texts.

:func:`first_error` walks a value along its :mod:`~blockd.qmp.model` type in the order of
the visitor (``qemu/qemu: qapi/qobject-input-visitor.c``, driven by the generated
``visit_type_*()`` functions) and stops at the first error, so the text it returns is the
one QEMU reports (docs/qemu-behaviour/qmp-protocol.md §6):

* an object's members are visited in schema order (base members first, then its own, then
  those of the union variant its tag selects); a missing mandatory member, a wrong type or
  an error inside a member ends the walk there;
* unknown keys are looked for only once all members are visited, and the one reported is
  the first left in the visitor's hash table (:func:`blockd.qdict.first_leftover`);
* an alternate takes the branch for the value's QType (any number is one QType); a value
  of no branch's QType is an error naming the alternate;
* an integer is checked as wide as the visitor reads it first, then as narrow as its type:
  a plain ``integer`` is QAPI's ``int`` (int64) and ``x-qmp-int`` names any other width.
  A float is never an integer (not even ``1.0``). Outside int64 a signed member gets
  ``expected: integer``, outside uint64 (negative int64 values wrap) an unsigned one
  ``expects uint64``, and a value past a narrower range ``expects int32_t`` and the like.

Nothing is visited below an ``any``. A value whose objects and lists nest more than
:data:`MAX_DEPTH` levels gets blockd's own :data:`TOO_DEEP`, which keeps the walk's
recursion bounded.
"""

from __future__ import annotations

from typing import Any, Final

from blockd.qdict import first_leftover
from blockd.qmp.model import (
    Alternate,
    AnyType,
    Array,
    Enum,
    Object,
    Ref,
    Scalar,
    Type,
    qtype_of_type,
    qtype_of_value,
)

__all__ = ["MAX_DEPTH", "TOO_DEEP", "first_error"]

#: How many levels of objects and lists a value may nest, itself the first (blockd's own
#: limit: QEMU has none below its parser's nesting limit of 1024).
MAX_DEPTH: Final = 64
#: The error for values nested deeper than :data:`MAX_DEPTH` levels.
TOO_DEEP: Final = "Parameters are nested too deeply"

#: ``x-qmp-int`` values narrower than 64 bits, and their range.
_INT_RANGES: Final = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
}
#: ``x-qmp-int`` values read by the visitor's uint64 method.
_UNSIGNED: Final = frozenset({"uint8", "uint16", "uint32", "uint64", "size"})
#: What the visitor's int64 method takes: a QNum that fits int64 (QAPI's ``int``).
_INT64: Final = (-(1 << 63), (1 << 63) - 1)
#: What its uint64 method takes: a QNum that fits uint64, or a negative int64, which
#: wraps ("Need to accept negative values for backward compatibility").
_UINT64: Final = (-(1 << 63), (1 << 64) - 1)
#: What the type errors of each JSON type name as expected.
_SCALAR_CHECKS: Final = {
    "string": lambda value: isinstance(value, str),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
}


class _Stop(Exception):
    """The walk's first error; ``args[0]`` is its text."""


def first_error(kind: Type, value: Any) -> str | None:
    """The error QEMU's input visitor would report for ``value`` of type ``kind``.

    Args:
        kind: the type (for a command's arguments, an object).
        value: the JSON value, as parsed (``dict``, ``list``, ``str``, ``int``, ``float``,
            ``bool`` or ``None``).

    Returns:
        The error text, or None when ``value`` is valid.
    """
    try:
        _visit(kind, value, [], 0)
    except _Stop as stop:
        return str(stop.args[0])
    return None


def _full_name(path: list[str | int]) -> str:
    # reference: full_name_nth() in qapi/qobject-input-visitor.c
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name = f"{name}.{part}" if name else part
    return name


def _own_name(path: list[str | int]) -> str:
    # enum, alternate and integer-range errors name the member alone, and a list element,
    # which has no name, as null (reference: input_type_enum() and visit_type_intN() in
    # qapi/qapi-visit-core.c, gen_visit_alternate() in scripts/qapi/visit.py)
    return path[-1] if path and isinstance(path[-1], str) else "null"


def _wrong_type(path: list[str | int], expected: str) -> _Stop:
    # reference: QERR_INVALID_PARAMETER_TYPE as qobject_input_type_str() and its siblings
    # raise it
    return _Stop(f"Invalid parameter type for '{_full_name(path)}', expected: {expected}")


def _visit(kind: Type, value: Any, path: list[str | int], depth: int) -> None:
    while isinstance(kind, Ref):
        kind = kind.target
    if isinstance(kind, Scalar):
        _scalar(kind, value, path)
    elif isinstance(kind, Object):
        _object(kind, value, path, depth)
    elif isinstance(kind, Enum):
        # reference: input_type_enum() in qapi/qapi-visit-core.c
        if not isinstance(value, str):
            raise _wrong_type(path, "string")
        if value not in kind.values:
            raise _Stop(f"Parameter '{_own_name(path)}' does not accept value '{value}'")
    elif isinstance(kind, Array):
        # reference: qobject_input_start_list() and qobject_input_next_list()
        if not isinstance(value, list):
            raise _wrong_type(path, "array")
        if depth >= MAX_DEPTH:
            raise _Stop(TOO_DEEP)
        for index, item in enumerate(value):
            path.append(index)
            _visit(kind.items, item, path, depth + 1)
            path.pop()
    elif isinstance(kind, Alternate):
        _visit(_branch(kind, value, path), value, path, depth)
    else:
        assert isinstance(kind, AnyType)  # reference: qobject_input_type_any(): anything


def _scalar(kind: Scalar, value: Any, path: list[str | int]) -> None:
    if kind.json_type != "integer":
        if not _SCALAR_CHECKS[kind.json_type](value):
            raise _wrong_type(path, kind.json_type)
        return
    # A float never passes, whatever its value (1.0, 1e2, -0.0): QEMU's parser makes a
    # double QNum of it, and qnum_get_try_int()/qnum_get_try_uint() refuse doubles.
    unsigned = kind.int_kind in _UNSIGNED
    low, high = _UINT64 if unsigned else _INT64
    if type(value) is not int or not low <= value <= high:
        if unsigned:
            # reference: qobject_input_type_uint64(), which visit_type_size() also uses
            raise _Stop(f"Parameter '{_full_name(path)}' expects uint64")
        # reference: qobject_input_type_int64()
        raise _wrong_type(path, "integer")
    bounds = _INT_RANGES.get(kind.int_kind or "")
    # (a negative value given to an unsigned type wraps to 2^63 or more, out of range too)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        # reference: visit_type_intN() and visit_type_uintN() in qapi/qapi-visit-core.c
        raise _Stop(f"Parameter '{_own_name(path)}' expects {kind.int_kind}_t")


def _object(kind: Object, value: Any, path: list[str | int], depth: int) -> None:
    # reference: gen_visit_object() in scripts/qapi/visit.py: qobject_input_start_struct(),
    # the members (base members, own members, then the variant's), then
    # qobject_input_check_struct()
    if not isinstance(value, dict):
        raise _wrong_type(path, "object")
    if depth >= MAX_DEPTH:
        raise _Stop(TOO_DEEP)
    visited: list[str] = []
    _members(kind, value, path, depth, visited)
    if kind.tag is not None:
        variant = kind.variants.get(value[kind.tag])
        if variant is not None:
            _members(variant, value, path, depth, visited)
    if kind.closed and len(visited) < len(value):
        name = first_leftover(list(value), visited)
        if name is not None:
            raise _Stop(f"Parameter '{_full_name([*path, name])}' is unexpected")


def _members(
    kind: Object, value: dict[str, Any], path: list[str | int], depth: int, visited: list[str]
) -> None:
    for member in kind.members:
        name = member.name
        if name not in value:
            if member.required:
                # reference: qobject_input_get_object() and QERR_MISSING_PARAMETER
                raise _Stop(f"Parameter '{_full_name([*path, name])}' is missing")
            continue  # reference: qobject_input_optional()
        visited.append(name)
        path.append(name)
        _visit(member.type, value[name], path, depth + 1)
        path.pop()


def _branch(kind: Alternate, value: Any, path: list[str | int]) -> Type:
    # reference: gen_visit_alternate() in scripts/qapi/visit.py: a case per QType, and the
    # error of its default case
    qtype = qtype_of_value(value)
    for branch in kind.branches:
        if qtype_of_type(branch) == qtype:
            return branch
    raise _Stop(f"Invalid parameter type for '{_own_name(path)}', expected: {kind.name}")
