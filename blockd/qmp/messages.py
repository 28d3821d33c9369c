"""QMP output: QEMU's JSON encoding and the shapes of server messages.

Encoding rules (docs/qemu-behaviour/qmp-protocol.md §1, mirroring ``qemu/qemu: qobject/qjson.c``):

* pure ASCII output: code points below 0x20 and from 0x7F up are written ``\\uXXXX`` with
  **uppercase** hex, code points beyond the BMP as a surrogate pair; the named escapes are
  ``\\"``, ``\\\\``, ``\\b``, ``\\f``, ``\\n``, ``\\r``, ``\\t``; ``/`` is not escaped; a
  lone surrogate (undecodable bytes smuggled in a ``str``) becomes U+FFFD;
* compact form ``{"a": 1, "b": [1, 2]}``, ``{}``, ``[]``; integers in decimal, floats
  as C's ``%.17g``;
* strict JSON only: a non-finite float (``inf``, which QEMU's parser makes of ``1e999`` or
  of an integer beyond the range of a double, or ``nan``) has no JSON form and is refused
  with :exc:`ValueError`, where QEMU would print ``inf`` or ``nan`` and so emit a message
  no JSON parser accepts (the callers keep such values away; see
  :meth:`blockd.qmp.connection.Connection.next_event`);
* pretty form (``--monitor pretty=on``): one member or element per line, indented by 4,
  an empty container as ``{`` newline ``}``, as QEMU's pretty monitor prints it;
* every message is followed by a newline, and every newline is sent as CRLF.

Members are written in the mapping's order; builders here put them in a fixed order
(success: ``return``, ``id``; error: ``id``, ``error``). Clients must not rely on order;
only byte-for-byte comparisons with QEMU need more (docs/qemu-behaviour/qmp-protocol.md §1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from blockd import QEMU_VERSION, __version__

__all__ = [
    "NO_ID",
    "encode",
    "error_response",
    "greeting",
    "success_response",
    "version_info",
]


class _NoId:
    """The type of :data:`NO_ID`."""

    _instance: _NoId | None = None

    def __new__(cls) -> _NoId:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"

    def __reduce__(self) -> str:
        return "NO_ID"


#: Marks a request without an ``id`` member; its reply then has no ``id`` either.
NO_ID: Final = _NoId()

_NAMED: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# everything but printable ASCII other than '"' and '\\' (spelt as the complement: a class
# that spans up to U+10FFFF takes milliseconds to compile at start-up)
_NEEDS_ESCAPE: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    cp = ord(char)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 | cp >> 10:04X}\\u{0xDC00 | cp & 0x3FF:04X}"
    return f"\\u{cp:04X}"


def _string(text: str) -> str:
    if text.isascii() and not _NEEDS_ESCAPE.search(text):
        return f'"{text}"'
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return _string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot encode {value!r} as JSON: not a finite number")
        return format(value, ".17g")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_END: Final = object()


def _write(value: Any, pretty: bool, out: list[str]) -> None:
    """Append ``value``'s JSON text to ``out``; iterative, so any nesting depth works."""
    # reference: to_json() in qobject/qjson.c; each open container is one stack entry:
    # [iterator over its items, is it an object, closing bracket, nothing written yet]
    stack: list[list[Any]] = []
    comma = "," if pretty else ", "
    while True:
        if isinstance(value, Mapping):
            out.append("{")
            stack.append([iter(value.items()), True, "}", True])
        elif isinstance(value, list | tuple):
            out.append("[")
            stack.append([iter(value), False, "]", True])
        else:
            out.append(_scalar(value))
        while stack:
            entry = stack[-1]
            items, is_object, closer, first = entry
            item: Any = next(items, _END)
            if item is _END:
                stack.pop()
                if pretty:
                    out.append("\n" + " " * (4 * len(stack)))
                out.append(closer)
                continue
            if not first:
                out.append(comma)
            entry[3] = False
            if pretty:
                out.append("\n" + " " * (4 * len(stack)))
            if is_object:
                key: Any = item[0]
                value = item[1]
                if not isinstance(key, str):
                    raise TypeError(f"cannot encode a {type(key).__name__} key as JSON")
                out.append(_string(key))
                out.append(": ")
            else:
                value = item
            break
        else:
            return


def encode(value: Any, *, pretty: bool = False) -> bytes:
    """One QMP message: ``value`` as QEMU writes it, ending in CRLF.

    Raises:
        TypeError: ``value`` holds something that is not JSON (a bug in the caller).
        ValueError: ``value`` holds a float that is infinite or NaN (no JSON form).
    """
    out: list[str] = []
    _write(value, pretty, out)
    if pretty:
        return ("".join(out) + "\n").replace("\n", "\r\n").encode("ascii")
    out.append("\r\n")
    return "".join(out).encode("ascii")


def version_info() -> dict[str, Any]:
    """The ``VersionInfo`` of the greeting and ``query-version``
    (docs/qemu-behaviour/qmp-protocol.md §2).

    ``qemu`` is :data:`blockd.QEMU_VERSION`, the release whose behaviour blockd follows;
    ``package`` names blockd itself.
    """
    major, minor, micro = QEMU_VERSION
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": f"blockd {__version__}",
    }


def greeting(version: Mapping[str, Any], capabilities: Sequence[str]) -> dict[str, Any]:
    """The greeting object sent on connect (docs/qemu-behaviour/qmp-protocol.md §2)."""
    return {"QMP": {"version": dict(version), "capabilities": list(capabilities)}}


def success_response(value: Any, id: Any = NO_ID) -> dict[str, Any]:
    """``{"return": value, "id": id}``; no ``id`` member for :data:`NO_ID`."""
    response: dict[str, Any] = {"return": value}
    if id is not NO_ID:
        response["id"] = id
    return response


def error_response(error_class: str, desc: str, id: Any = NO_ID) -> dict[str, Any]:
    """``{"id": id, "error": {"class": ..., "desc": ...}}``; no ``id`` for :data:`NO_ID`."""
    response: dict[str, Any] = {}
    if id is not NO_ID:
        response["id"] = id
    response["error"] = {"class": error_class, "desc": desc}
    return response
