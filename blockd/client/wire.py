"""The client side of QMP framing, without I/O (docs/qemu-behaviour/qmp-protocol.md §1, §7;
docs/clients.md §1).

Servers send one JSON object per line ending in CRLF (QEMU, blockd) or LF; pretty-printed
monitors (``pretty=on``) spread one object over several lines, so the decoder does not
rely on lines: it feeds bytes to :class:`json.JSONDecoder.raw_decode` and yields every
complete object, keeping the unfinished tail for the next call.

Each decoded object is classified once by :func:`classify` into a :class:`Greeting`,
:class:`Reply` or :class:`Event`; anything else is a :class:`ProtocolError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

#: Refuse a single message larger than this (qemu.qmp uses the same 10 MiB limit).
MAX_MESSAGE: Final = 10 * 1024 * 1024

_WHITESPACE: Final = " \t\r\n"


class ProtocolError(Exception):
    """The server sent something that is not a QMP message."""


@dataclass(frozen=True)
class Greeting:
    """The server's ``{"QMP": {...}}`` greeting (qmp-spec 2.2)."""

    version: Mapping[str, Any]
    capabilities: tuple[str, ...]

    @property
    def version_text(self) -> str:
        """``M.m.u`` from ``version.qemu``, or ``?`` when missing."""
        qemu = self.version.get("qemu", {})
        try:
            return f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
        except (KeyError, TypeError):
            return "?"

    @property
    def package(self) -> str:
        return str(self.version.get("package", "")).strip()


@dataclass(frozen=True)
class Reply:
    """A command's reply: exactly one of ``value`` (on success) or ``error`` is set."""

    id: Any
    value: Any = None
    error: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Event:
    """An asynchronous event; ``data`` is ``{}`` when the server sent none."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


Message = Greeting | Reply | Event


def classify(obj: Any) -> Message:
    """Turn one decoded JSON value into a message.

    Raises:
        ProtocolError: ``obj`` is not a greeting, a reply or an event.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    if "event" in obj:
        stamp = obj.get("timestamp") or {}
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        data = obj.get("data")
        return Event(str(obj["event"]), data if isinstance(data, dict) else {}, seconds)
    if "QMP" in obj:
        qmp = obj["QMP"]
        if not isinstance(qmp, dict) or not isinstance(qmp.get("version"), dict):
            raise ProtocolError("greeting without a version object")
        caps = qmp.get("capabilities")
        if not isinstance(caps, list):
            raise ProtocolError("greeting without a capabilities list")
        return Greeting(qmp["version"], tuple(str(c) for c in caps))
    if "return" in obj:
        return Reply(obj.get("id"), value=obj["return"])
    if "error" in obj:
        err = obj["error"]
        if not isinstance(err, dict) or not all(
            isinstance(err.get(k), str) for k in ("class", "desc")
        ):
            raise ProtocolError("error reply without string 'class' and 'desc'")
        return Reply(obj.get("id"), error={"class": err["class"], "desc": err["desc"]})
    raise ProtocolError(f"unrecognised message with keys {sorted(obj)}")


class Decoder:
    """Incremental decoder: bytes in, JSON values out (see the module docstring)."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = ""
        self._pending = b""
        self._max = max_message
        self._json = json.JSONDecoder()

    def feed(self, data: bytes) -> Iterator[Any]:
        """Add ``data`` and yield each JSON value completed by it, in order.

        Raises:
            ProtocolError: the bytes are not JSON, or a message exceeds the size limit.
        """
        raw = self._pending + data
        # Keep an incomplete UTF-8 sequence at the end for the next chunk.
        try:
            text = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as exc:
            if exc.start < len(raw) - 3:
                raise ProtocolError("server sent invalid UTF-8") from exc
            text = raw[: exc.start].decode("utf-8")
            self._pending = raw[exc.start :]
        self._buf += text
        while True:
            start = len(self._buf) - len(self._buf.lstrip(_WHITESPACE))
            if start == len(self._buf):
                self._buf = ""
                return
            try:
                value, end = self._json.raw_decode(self._buf, start)
            except json.JSONDecodeError as exc:
                if exc.pos >= len(self._buf) or _truncated(self._buf, exc):
                    self._buf = self._buf[start:]
                    if len(self._buf) > self._max:
                        raise ProtocolError("message too large") from exc
                    return
                raise ProtocolError(f"invalid JSON from server: {exc.msg}") from exc
            self._buf = self._buf[end:]
            yield value


def _truncated(buf: str, exc: json.JSONDecodeError) -> bool:
    # An object cut short fails with "Unterminated string" / "Expecting ..." at its end.
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(buf.rstrip(_WHITESPACE))


def encode_command(name: str, arguments: Mapping[str, Any] | None, id: Any = None) -> bytes:
    """One QMP command as compact JSON plus CRLF; ``id`` is left out when ``None``."""
    msg: dict[str, Any] = {"execute": name}
    if arguments is not None:
        msg["arguments"] = dict(arguments)
    if id is not None:
        msg["id"] = id
    return json.dumps(msg, separators=(",", ":")).encode() + b"\r\n"
