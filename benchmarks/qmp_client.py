"""A small blocking QMP client on a raw UNIX socket, built to measure daemons.

The benchmark must time the daemon, not the client, so this client does as little as it
can per message: one ``sendall`` per command, ``recv`` into a byte buffer, and
``json.JSONDecoder.raw_decode`` to cut messages out of the stream (QMP output is a stream
of JSON objects; QEMU ends each with CR LF, but nothing here relies on it). Events that
arrive while waiting for a reply are queued in ``events`` in arrival order, each stamped
with its arrival time under ``RECEIVED``.

It is independent of blockd (and of qemu.qmp) on purpose: the same bytes go to both
daemons. Protocol reference: QEMU's docs/interop/qmp-spec.rst (greeting, capabilities
negotiation, ``id`` echo, ``return``/``error`` replies, asynchronous events).
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from typing import Any

JSONObject = dict[str, Any]

RECEIVED = "_received"  # key added to each queued event: time.perf_counter() on arrival
_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\r\n"


class QMPError(Exception):
    """The daemon answered a command with ``{"error": ...}``.

    Attributes:
        command: the command name sent.
        error_class: the reply's ``class`` (e.g. ``GenericError``).
        desc: the reply's ``desc``.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPProtocolError(Exception):
    """The peer sent something that is not QMP (bad JSON, a reply to no request, EOF)."""


class QMPClient:
    """One QMP connection over a UNIX socket; blocking, single-threaded.

    Args:
        path: the monitor socket.
        timeout: seconds any single socket operation may block.
        negotiate: run ``qmp_capabilities`` after the greeting.
        sock: a socket already connected to ``path`` to speak over instead of connecting
            anew (the client owns it from then on, and closes it if the greeting fails).

    Raises:
        OSError: the socket cannot be connected.
        QMPProtocolError: the greeting is missing or malformed.
    """

    def __init__(
        self,
        path: str,
        *,
        timeout: float = 30.0,
        negotiate: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        self._timeout = timeout
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
        else:
            sock.settimeout(timeout)
        self._sock = sock
        self._buf = ""
        self._raw = bytearray()
        self._next_id = 0
        self.events: deque[JSONObject] = deque()
        try:
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QMPProtocolError(f"expected a QMP greeting, got {greeting!r}")
        except BaseException:
            sock.close()
            raise
        self.greeting: JSONObject = greeting
        if negotiate:
            self.execute("qmp_capabilities")

    # -- reading ---------------------------------------------------------------------------

    def _pop_buffered(self) -> JSONObject | None:
        buf = self._buf.lstrip(_WHITESPACE)
        if not buf:
            self._buf = ""
            return None
        try:
            obj, end = _DECODER.raw_decode(buf)
        except json.JSONDecodeError:
            self._buf = buf
            return None  # incomplete; the caller reads more
        self._buf = buf[end:]
        if not isinstance(obj, dict):
            raise QMPProtocolError(f"expected a JSON object, got {obj!r}")
        return obj

    def _read_message(self) -> JSONObject:
        while True:
            msg = self._pop_buffered()
            if msg is not None:
                return msg
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise QMPProtocolError(f"connection closed (pending input {self._buf[:200]!r})")
            self._raw += chunk
            try:
                text = self._raw.decode()
            except UnicodeDecodeError:
                if len(self._raw) > 1 << 20:
                    raise QMPProtocolError("undecodable input") from None
                continue  # a multi-byte character split across reads
            self._raw.clear()
            self._buf += text
            if len(self._buf) > 64 << 20:
                raise QMPProtocolError("unterminated message over 64 MiB")

    def _read_reply(self, req_id: object) -> JSONObject:
        while True:
            msg = self._read_message()
            if "event" in msg:
                self._queue_event(msg)
                continue
            if msg.get("id") != req_id:
                raise QMPProtocolError(f"reply to an unknown request: {msg!r}")
            return msg

    # -- commands --------------------------------------------------------------------------

    def execute(self, command: str, arguments: JSONObject | None = None) -> Any:
        """Send one command and wait for its reply; events seen meanwhile are queued.

        Returns:
            The reply's ``return`` value.

        Raises:
            QMPError: the daemon replied with an error.
            QMPProtocolError: the reply was malformed or the connection closed.
            TimeoutError: the socket timed out.
        """
        self._next_id += 1
        req_id = self._next_id
        req: JSONObject = {"execute": command, "id": req_id}
        if arguments is not None:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\r\n")
        reply = self._read_reply(req_id)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, str(err.get("class")), str(err.get("desc")))
        if "return" not in reply:
            raise QMPProtocolError(f"reply without return or error: {reply!r}")
        return reply["return"]

    def roundtrip(self, request: bytes, req_id: object) -> JSONObject:
        """Send pre-encoded request bytes and return the whole reply (the latency loop).

        The caller encodes the request once; this does one ``sendall`` and reads until the
        reply with ``req_id``. Errors are returned, not raised.
        """
        self._sock.sendall(request)
        return self._read_reply(req_id)

    # -- events ----------------------------------------------------------------------------

    def _queue_event(self, msg: JSONObject) -> None:
        msg[RECEIVED] = time.perf_counter()
        self.events.append(msg)

    def wait_event(
        self, name: str | tuple[str, ...], *, device: str | None = None, timeout: float = 60.0
    ) -> JSONObject:
        """Return the first queued or incoming event ``name`` (or any of the names in a
        tuple) for ``device``, if given.

        Events that do not match stay queued, in order.

        Raises:
            TimeoutError: nothing matched within ``timeout`` seconds.
        """
        names = (name,) if isinstance(name, str) else name
        deadline = time.monotonic() + timeout
        scanned = 0
        try:
            while True:
                for i in range(scanned, len(self.events)):
                    ev = self.events[i]
                    if ev.get("event") in names and (
                        device is None or ev.get("data", {}).get("device") == device
                    ):
                        del self.events[i]
                        return ev
                scanned = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {name} event within {timeout} s")
                self._sock.settimeout(left)
                try:
                    msg = self._read_message()
                except TimeoutError:
                    raise TimeoutError(f"no {name} event within {timeout} s") from None
                if "event" not in msg:
                    raise QMPProtocolError(f"unexpected reply while waiting: {msg!r}")
                self._queue_event(msg)
        finally:
            self._sock.settimeout(self._timeout)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_retry(path: str, *, deadline: float, timeout: float = 30.0) -> QMPClient:
    """Connect to ``path``, retrying until ``deadline`` (``time.monotonic()``) while the
    daemon is still starting (socket missing or refusing).

    Raises:
        TimeoutError: not connected by the deadline (chained to the last OSError).
    """
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return QMPClient(path, timeout=timeout)
        except (OSError, QMPProtocolError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            last = exc
            time.sleep(0.01)
    raise TimeoutError(f"could not connect to {path}: {last}") from last
