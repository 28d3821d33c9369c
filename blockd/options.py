"""Command-line option strings in QEMU's syntaxes, parsed without I/O.

Two syntaxes are understood, as ``qemu-storage-daemon`` understands them:

* **keyval**: ``key=value,key.sub=value,...``. Dotted keys build nested objects, numeric
  fragments build arrays (``a.0=x,a.1=y``), ``,,`` inside a value stands for one comma,
  the last of several values for one key wins, and an optional *implied key* lets the
  first pair omit ``key=`` (``socket,id=c0`` is ``backend=socket,id=c0``). Every leaf is a
  string; :func:`coerce_scalars` turns strings into the integers and booleans a schema
  asks for, as QEMU's keyval input visitor does.
* **JSON**: an option that starts with ``{`` is one JSON object (``--blockdev``).

Errors are :class:`OptionError` with QEMU's wording; the caller prefixes the option and
its value (``blockd: --blockdev x: message``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = [
    "OptionError",
    "coerce_scalars",
    "parse_bool",
    "parse_json_or_keyval",
    "parse_keyval",
]

_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_INDEX: Final = re.compile(r"[0-9]+")
_MAX_FRAGMENT: Final = 127

TRUE_WORDS: Final = frozenset({"on", "yes", "true", "y"})
FALSE_WORDS: Final = frozenset({"off", "no", "false", "n"})


class OptionError(ValueError):
    """An option string is malformed; ``str(exc)`` is the message for the user."""


def parse_bool(name: str, value: str) -> bool:
    """Parse an on/off value as QEMU does (``on``/``yes``/``true`` and their opposites).

    Raises:
        OptionError: ``value`` is none of those words.
    """
    word = value.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")


def _split_pairs(text: str) -> list[tuple[str | None, str]]:
    """Split ``text`` into (key, value) pairs; key is None for a key-less first value."""
    pairs: list[tuple[str | None, str]] = []
    pos = 0
    first = True
    while pos < len(text):
        key_end = pos
        while key_end < len(text) and text[key_end] not in "=,":
            key_end += 1
        key: str | None
        if key_end < len(text) and text[key_end] == "=":
            key = text[pos:key_end]
            pos = key_end + 1
        elif first and key_end > pos:
            key = None  # the implied key's value starts right here
        else:
            raise OptionError(f"Expected '=' after parameter '{text[pos:key_end]}'")
        value: list[str] = []
        while pos < len(text):
            char = text[pos]
            if char == ",":
                if text[pos + 1 : pos + 2] == ",":
                    value.append(",")
                    pos += 2
                    continue
                pos += 1
                break
            value.append(char)
            pos += 1
        pairs.append((key, "".join(value)))
        first = False
    return pairs


def _fragments(key: str) -> list[str]:
    parts = key.split(".")
    for i, part in enumerate(parts):
        ok = _NAME.fullmatch(part) or (i > 0 and _INDEX.fullmatch(part))
        if not ok:
            raise OptionError(f"Invalid parameter '{key}'")
        if len(part) > _MAX_FRAGMENT:
            fragment = " fragment" if len(parts) > 1 else ""
            raise OptionError(f"Parameter{fragment} '{part}' is too long")
    return parts


def _put(root: dict[str, Any], parts: list[str], value: str) -> None:
    node = root
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise OptionError(f"Parameters '{'.'.join(parts[: depth + 1])}.*' used inconsistently")
        node = child
    old = node.get(parts[-1])
    if isinstance(old, dict):
        raise OptionError(f"Parameters '{'.'.join(parts)}.*' used inconsistently")
    node[parts[-1]] = value


def _listify(node: dict[str, Any], prefix: str) -> dict[str, Any] | list[Any]:
    for key, child in list(node.items()):
        if isinstance(child, dict):
            node[key] = _listify(child, f"{prefix}{key}.")
    indexes = [key for key in node if _INDEX.fullmatch(key)]
    if not indexes:
        return node
    if len(indexes) != len(node):
        raise OptionError(f"Parameters '{prefix}*' used inconsistently")
    by_index = {int(key): value for key, value in node.items()}
    for i in range(len(by_index)):
        if i not in by_index:
            raise OptionError(f"Parameter '{prefix}{i}' missing")
    return [by_index[i] for i in range(len(by_index))]


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse ``key=value,...`` into a tree of dicts, lists and strings.

    Args:
        text: the option value.
        implied_key: the key of a first value given without ``key=``, if allowed.

    Raises:
        OptionError: the text does not follow the syntax (QEMU's messages).
    """
    root: dict[str, Any] = {}
    for key, value in _split_pairs(text):
        if key is None:
            if implied_key is None or "=" in value:
                raise OptionError(f"Expected '=' after parameter '{value}'")
            parts = [implied_key]
        else:
            parts = _fragments(key)
        _put(root, parts, value)
    tree = _listify(root, "")
    assert isinstance(tree, dict)  # the root's keys are names, never indexes
    return tree


def parse_json_or_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse a JSON object (text starting with ``{``) or else keyval syntax.

    A JSON object keeps its JSON types; keyval leaves are strings (see
    :func:`coerce_scalars`).

    Raises:
        OptionError: bad JSON, JSON that is not an object, or bad keyval syntax.
    """
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionError(f"JSON parse error: {exc.msg}") from exc
        if not isinstance(value, dict):
            raise OptionError("JSON option must be an object")
        return value
    return parse_keyval(text, implied_key)


# strtoll(text, &end, 0) with nothing after the number: C white space, a sign, then hex,
# octal (a leading 0) or decimal digits
_INT: Final = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_INT_BASES: Final = {"0x": 16, "0X": 16}
_TYPE_ERROR: Final = re.compile(r"Invalid parameter type for '([^']*)', expected: (\w+)")


def _to_integer(path: str, text: str) -> int:
    # reference: qobject_input_type_int64_keyval() and qemu_strtoi64(): base 0, int64
    # (ERANGE is the same error), no size suffixes and no fraction (only ``size``
    # members take those, and blockd has none)
    match = _INT.fullmatch(text)
    if match:
        sign, digits = match.groups()
        base = _INT_BASES.get(digits[:2], 8 if digits.startswith("0") else 10)
        value = int(sign + digits[2:] if base == 16 else sign + digits, base)
        if -(1 << 63) <= value < (1 << 63):
            return value
    raise OptionError(f"Parameter '{path}' expects integer")


def _to_number(path: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"Parameter '{path}' expects number") from None


def _lookup(tree: Any, path: str) -> tuple[Any, Any] | None:
    """The (container, key) that ``path`` (``a.b.0``) names in ``tree``, if it exists."""
    parts = path.replace("[", ".").replace("]", "").split(".")
    node = tree
    for part in parts[:-1]:
        node = _child(node, part)
        if node is None:
            return None
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        return node, last
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        return node, int(last)
    return None


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def coerce_scalars(
    tree: dict[str, Any], first_type_error: Callable[[Mapping[str, Any]], str | None]
) -> dict[str, Any]:
    """Turn keyval strings into the integers, numbers and booleans a schema expects.

    QEMU's keyval input visitor converts each string leaf to the type the schema wants at
    that place. This does the same by asking the validator: while it reports
    ``Invalid parameter type for 'PATH', expected: integer|boolean|number`` for a string
    leaf, that leaf is converted and validation runs again. Strings the schema accepts as
    strings (alternates such as ``BlockdevRef``) stay strings.

    Args:
        tree: the output of :func:`parse_keyval`; changed in place and returned.
        first_type_error: validates a tree and returns the ``desc`` of its first error,
            or None when it is valid.

    Raises:
        OptionError: a leaf cannot be converted (``Parameter 'x' expects integer``, or
            ``... expects 'on' or 'off'``).
    """
    seen: set[str] = set()
    while True:
        desc = first_type_error(tree)
        match = _TYPE_ERROR.fullmatch(desc) if desc else None
        if match is None:
            return tree
        path, expected = match.groups()
        place = _lookup(tree, path)
        if place is None or path in seen:
            return tree
        container, key = place
        value = container[key]
        if not isinstance(value, str):
            return tree
        seen.add(path)
        if expected == "integer":
            container[key] = _to_integer(path, value)
        elif expected == "boolean":
            container[key] = parse_bool(path, value)
        elif expected == "number":
            container[key] = _to_number(path, value)
        else:
            return tree
