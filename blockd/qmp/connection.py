"""One QMP monitor session, sans-IO (in the style of h11).

Theory of operation
-------------------
A :class:`Connection` is the whole protocol state of one client connection and does no
I/O. The I/O layer sends :meth:`Connection.greeting`, feeds received bytes to
:meth:`Connection.receive_data` and calls :meth:`Connection.next_event` until it returns
:data:`NEED_DATA`. Each event is one of:

* :class:`Output` -- bytes the core produced itself; send them, in order. This covers
  JSON parse errors (no ``id``), the envelope checks of
  docs/qemu-behaviour/qmp-protocol.md §5 (``id`` echoed whenever the input was an object),
  negotiation (``qmp_capabilities`` is handled here entirely, §3), unknown commands,
  ``exec-oob`` rules (§4) and argument validation errors (§6); and, first of all,
  :data:`UNECHOABLE_ID` without ``id`` for an ``id`` holding a number beyond the range of
  a double (``1e999``, a 400-digit integer): QEMU echoes it as ``inf``, which is no JSON
  (docs/qemu-behaviour/qmp-protocol.md §1);
* :class:`Request` -- a valid request for a known command with validated arguments
  (``{}`` when the client sent none). Run it and send :meth:`Connection.reply` or
  :meth:`Connection.error`.

Requests are handled in arrival order. With OOB enabled QEMU runs an ``exec-oob``
request in its I/O thread as soon as it is parsed, so its reply may overtake replies to
in-band requests received earlier, depending on thread timing; in-order handling is one
of the orders QEMU can produce. A :class:`Request` with ``oob=True`` may be run at once by
the I/O layer.

Events go out through :meth:`Connection.event`, which returns None while the session is
still negotiating: QEMU drops, not queues, events for such a monitor.

The order of the envelope checks follows QEMU (``qemu/qemu: qapi/qmp-dispatch.c``,
``qmp_dispatch_check_obj``): members are examined in QEMU's QDict iteration order (the hash order of
docs/qemu-behaviour/qmp-protocol.md §1), the first failing one wins, and the missing-``execute``
check comes last. Then come the command lookup, the OOB check and argument validation. While
negotiating, every CommandNotFound desc becomes ``Expecting capabilities negotiation with
'qmp_capabilities'`` (``monitor/qmp.c``, ``monitor_qmp_dispatch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from blockd.errors import CommandNotFound, QMPError, RequestError
from blockd.qdict import qdict_order
from blockd.qmp.framing import JSONStream, Message, ParseError
from blockd.qmp.messages import NO_ID, encode, error_response, greeting, success_response
from blockd.qmp.schema import Schema

__all__ = ["NEED_DATA", "NO_ID", "UNECHOABLE_ID", "Connection", "Output", "Request"]


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Connection.next_event` when all input so far has been handled.
NEED_DATA: Final = _NeedData()

_NEGOTIATION_DESC: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"


@dataclass(frozen=True)
class Request:
    """A command the core could not answer itself; its arguments are validated.

    Attributes:
        command: the command name (wire spelling).
        arguments: the ``arguments`` object, ``{}`` when it was left out.
        id: the request's ``id`` (any JSON value), or :data:`NO_ID` when absent.
        oob: sent with ``exec-oob`` (only for ``x-qmp-allow-oob`` commands, OOB enabled).
    """

    command: str
    arguments: dict[str, Any] = field(hash=False)
    id: Any = field(default=NO_ID, hash=False)
    oob: bool = False


@dataclass(frozen=True)
class Output:
    """Bytes the core produced itself (a reply or an error); send them in order."""

    data: bytes


#: The error for an ``id`` that cannot be echoed as JSON (sent without ``id``).
UNECHOABLE_ID: Final = "QMP input member 'id' contains a number too large to echo"


def _qdict_ordered(value: Any) -> Any:
    """``value`` with every object's members in QDict order, as QEMU echoes an ``id``.

    Iterative: an ``id`` may be nested as deeply as the parser allows (1024).

    Raises:
        _EnvelopeError: ``value`` holds a number that became infinite when parsed.
    """
    holder = [value]
    stack: list[tuple[Any, Any]] = [(holder, 0)]
    while stack:
        container, slot = stack.pop()
        item = container[slot]
        if isinstance(item, float) and not math.isfinite(item):
            # QEMU echoes it as "inf", which no JSON parser accepts; nothing else can
            # stand for it, so the request is refused before it runs, without an id.
            raise _EnvelopeError(RequestError(UNECHOABLE_ID), NO_ID)
        if isinstance(item, dict):
            ordered = {key: item[key] for key in qdict_order(item)}
            container[slot] = ordered
            stack.extend((ordered, key) for key in ordered)
        elif isinstance(item, list):
            copy = list(item)
            container[slot] = copy
            stack.extend((copy, index) for index in range(len(copy)))
    return holder[0]


class _EnvelopeError(Exception):
    def __init__(self, error: QMPError, id: Any) -> None:
        super().__init__(error.desc)
        self.error = error
        self.id = id


class Connection:
    """The protocol state of one QMP session; see the module docstring.

    Args:
        schema: the command schemas (validation, OOB permission, known commands).
        version: the ``VersionInfo`` shown in the greeting.
        capabilities: the capabilities offered (QEMU offers ``oob`` on socket monitors).
        pretty: pretty-print every message (``--monitor pretty=on``).
    """

    def __init__(
        self,
        schema: Schema,
        *,
        version: Mapping[str, Any],
        capabilities: Sequence[str] = ("oob",),
        pretty: bool = False,
    ) -> None:
        self._schema = schema
        self._version = dict(version)
        self._offered = tuple(capabilities)
        self._pretty = pretty
        self._stream = JSONStream()
        self._negotiated = False
        self._enabled: frozenset[str] = frozenset()

    @property
    def negotiated(self) -> bool:
        """True once ``qmp_capabilities`` succeeded (command mode)."""
        return self._negotiated

    @property
    def enabled_capabilities(self) -> frozenset[str]:
        """The capabilities the client enabled with ``qmp_capabilities``."""
        return self._enabled

    def greeting(self) -> bytes:
        """The greeting to send as soon as the client connects
        (docs/qemu-behaviour/qmp-protocol.md §2)."""
        return encode(greeting(self._version, self._offered), pretty=self._pretty)

    def receive_data(self, data: bytes) -> None:
        """Add received bytes (``b""`` at end of input changes nothing)."""
        self._stream.feed(data)

    def next_event(self) -> Request | Output | _NeedData:
        """The next thing to do: a :class:`Request` to run, :class:`Output` to send, or
        :data:`NEED_DATA` when all input so far has been handled."""
        item = self._stream.next()
        if item is None:
            return NEED_DATA
        if isinstance(item, ParseError):
            return Output(self._encode(error_response("GenericError", item.desc)))
        try:
            return self._dispatch(item)
        except _EnvelopeError as exc:
            error = exc.error
            desc = error.desc
            if not self._negotiated and isinstance(error, CommandNotFound):
                desc = _NEGOTIATION_DESC
            return Output(self._encode(error_response(error.error_class, desc, exc.id)))

    def reply(self, request: Request, value: Any) -> bytes:
        """The success reply to ``request`` (``{"return": value, "id": ...}``)."""
        return self._encode(success_response(value, request.id))

    def error(self, request: Request, exc: QMPError) -> bytes:
        """The error reply to ``request`` carrying ``exc``'s class and desc."""
        return self._encode(error_response(exc.error_class, exc.desc, request.id))

    def event(self, event: Mapping[str, Any]) -> bytes | None:
        """The bytes of an event envelope, or None while negotiating (events dropped)."""
        if not self._negotiated:
            return None
        return self._encode(event)

    def _encode(self, message: Mapping[str, Any]) -> bytes:
        return encode(message, pretty=self._pretty)

    def _dispatch(self, message: Message) -> Request | Output:
        # reference: qmp_dispatch() in qapi/qmp-dispatch.c
        request = message.value
        if type(request) is not dict:
            raise _EnvelopeError(RequestError("QMP input must be a JSON object"), NO_ID)
        id = _qdict_ordered(request.get("id", NO_ID))
        allow_oob = "oob" in self._enabled
        exec_key: str | None = None
        for key in qdict_order(request):
            member = request[key]
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if type(member) is not str:
                    raise _EnvelopeError(
                        RequestError(f"QMP input member '{key}' must be a string"), id
                    )
                if exec_key is not None:
                    raise _EnvelopeError(
                        RequestError(f"QMP input member '{key}' clashes with '{exec_key}'"), id
                    )
                exec_key = key
            elif key == "arguments":
                if type(member) is not dict:
                    raise _EnvelopeError(
                        RequestError("QMP input member 'arguments' must be an object"), id
                    )
            elif key != "id":
                raise _EnvelopeError(RequestError(f"QMP input member '{key}' is unexpected"), id)
        if exec_key is None:
            raise _EnvelopeError(RequestError("QMP input lacks member 'execute'"), id)
        command: str = request[exec_key]
        oob = exec_key == "exec-oob"
        # negotiation mode has a command table of its own: qmp_capabilities alone
        if self._negotiated:
            known = command in self._schema.commands
        else:
            known = command == "qmp_capabilities"
        if not known:
            raise _EnvelopeError(CommandNotFound(f"The command {command} has not been found"), id)
        if oob and not self._schema.allow_oob(command):
            raise _EnvelopeError(RequestError(f"The command {command} does not support OOB"), id)
        arguments: dict[str, Any] = request.get("arguments", {})
        try:
            if command in self._schema.commands:
                self._schema.validate_arguments(command, arguments)
            if command == "qmp_capabilities":
                reply = self._capabilities(arguments)
                return Output(self._encode(success_response(reply, id)))
        except QMPError as exc:
            raise _EnvelopeError(exc, id) from None
        return Request(command, arguments, id, oob)

    def _capabilities(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        # reference: qmp_qmp_capabilities() and qmp_caps_accept() in monitor/qmp-cmds-control.c
        if self._negotiated:
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        enable = list(arguments.get("enable", []))
        refused = [name for name in enable if name not in self._offered]
        if refused:
            raise RequestError(f"Capability {', '.join(refused)} not available")
        self._enabled = frozenset(enable)
        self._negotiated = True
        return {}
