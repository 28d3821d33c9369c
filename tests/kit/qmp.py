"""QMP from the tests' side: clients that talk to a daemon over its UNIX socket, the
events they collect, and the byte splits the protocol core is fed.

Clients: :class:`SyncClient` (blocking, line framed, keeps a transcript of what it
received; for daemon subprocesses, blockd's and QEMU's alike), :class:`RawClient` (trio,
sees the raw CRLF-framed lines; for in-process servers), and qemu.qmp's own synchronous
client through :func:`legacy_client`. Events: :class:`Recorder` (from an
:class:`~blockd.events.EventBus`), :func:`short_names`, the ``JSC(status)`` view of an
event sequence, and that view of a job that completes (:data:`COMPLETED_JOB`). Framing:
:func:`feed` and :func:`split`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import trio
from qemu.qmp.legacy import QEMUMonitorProtocol

from blockd.events import EventBus
from blockd.qmp.framing import JSONStream, Message, ParseError

#: seconds any single wait for the peer may take
IO_TIMEOUT = 10.0
Reply = dict[str, Any]

# --- events --------------------------------------------------------------------------------


def short_name(event: str, data: Mapping[str, Any] | None) -> str:
    """``JSC(status)`` for a ``JOB_STATUS_CHANGE``, else the event's name."""
    if event == "JOB_STATUS_CHANGE" and data is not None:
        return f"JSC({data['status']})"
    return event


#: what a job sends once its work is done (auto-finalize, auto-dismiss), in short names
DONE = ["JSC(waiting)", "JSC(pending)", "BLOCK_JOB_COMPLETED", "JSC(concluded)", "JSC(null)"]
#: what a job that completes on its own sends, from its creation
COMPLETED_JOB = ["JSC(created)", "JSC(running)", *DONE]


def short_names(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """:func:`short_name` of each event message (``{"event": ..., "data": ...}``)."""
    return [short_name(e["event"], e.get("data")) for e in events]


class Recorder:
    """Collects ``(event, data)`` pairs from a bus, plus markers the test inserts."""

    def __init__(self, bus: EventBus) -> None:
        self.items: list[tuple[str, Any]] = []
        self.bus = bus
        bus.subscribe(lambda ev: self.items.append((ev["event"], ev.get("data"))))

    def mark(self, label: str) -> None:
        """Insert a marker (e.g. a command's reply) into the sequence."""
        self.items.append(("--", label))

    def names(self, job_id: str | None = None) -> list[str]:
        """Compact view: ``JSC(status)``, event names, ``--label`` markers."""
        out = []
        for name, data in self.items:
            if name == "--":
                out.append(f"--{data}")
            elif name == "JOB_STATUS_CHANGE":
                if job_id is None or data["id"] == job_id:
                    out.append(short_name(name, data))
            elif job_id is None or job_id in (data.get("device"), data.get("id")):
                out.append(name)
        return out

    def data(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.items if n == name]

    def clear(self) -> None:
        self.items.clear()


# --- a blocking client ---------------------------------------------------------------------


class SyncClient:
    """A blocking QMP client on a UNIX socket: line framed (every line must end in CRLF),
    every wait bounded by ``timeout``.

    ``transcript`` keeps what came in, in order: ``("event", name, data)`` for every event
    and ``("reply", command, reply)`` for every recorded reply.

    Args:
        negotiate: send ``qmp_capabilities`` (unrecorded) after reading the greeting.
    """

    def __init__(self, path: Path | str, *, timeout: float = IO_TIMEOUT,
                 negotiate: bool = True) -> None:  # fmt: skip
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.transcript: list[Any] = []
        self.greeting = self.recv()
        if negotiate:
            self.execute("qmp_capabilities", record=False)

    def _line(self, deadline: float) -> bytes | None:
        """The next line, or None at EOF."""
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            assert ready, "no answer from the daemon"
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def _message(self, line: bytes) -> dict[str, Any]:
        assert line.endswith(b"\r\n"), line
        message = json.loads(line)
        assert isinstance(message, dict)
        if "event" in message:
            self.transcript.append(("event", message["event"], message.get("data")))
        return message

    def recv(self) -> dict[str, Any]:
        """The next message (an event, a reply or the greeting); fails on EOF."""
        line = self._line(time.monotonic() + self.timeout)
        assert line is not None, "the daemon closed the connection"
        return self._message(line)

    def send(self, command: str, arguments: Mapping[str, Any] | None = None,
             **extra: Any) -> None:  # fmt: skip
        """Send ``{"execute": command, "arguments": arguments or {}, **extra}``."""
        request = {"execute": command, "arguments": dict(arguments or {}), **extra}
        self.sock.sendall(json.dumps(request).encode())

    def request(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                record: bool = True, **extra: Any) -> Reply:  # fmt: skip
        """Send ``command`` and return its reply (events before it are collected)."""
        self.send(command, arguments, **extra)
        while "event" in (reply := self.recv()):
            pass
        if record:
            self.transcript.append(("reply", command, reply))
        return reply

    def call(self, command: str, record: bool = True, **arguments: Any) -> Any:
        """:meth:`request` with keyword ``arguments``; the ``return`` value (None for an
        error, which the transcript keeps)."""
        return self.request(command, arguments, record=record).get("return")

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                record: bool = True) -> Any:  # fmt: skip
        """:meth:`request`, which must succeed; its ``return`` value."""
        reply = self.request(command, arguments, record=record)
        assert "return" in reply, reply
        return reply["return"]

    def wait(self, condition: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Poll ``query-block-jobs`` (unrecorded) until ``condition`` holds for its answer."""
        deadline = time.monotonic() + self.timeout
        while not condition(self.call("query-block-jobs", record=False)):
            assert time.monotonic() < deadline, "timed out waiting for a job state"
            time.sleep(0.02)

    def read_to_eof(self) -> None:
        """Collect every message until the daemon closes the connection (after ``quit``)."""
        deadline = time.monotonic() + self.timeout
        while (line := self._line(deadline)) is not None:
            self._message(line)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def sync_client(path: Path | str, **options: Any) -> Iterator[SyncClient]:
    """A :class:`SyncClient` for the ``with`` block; see its options."""
    client = SyncClient(path, **options)
    try:
        yield client
    finally:
        client.close()


# --- qemu.qmp's synchronous client ---------------------------------------------------------


def close_legacy_loop() -> None:
    """Close the thread's default asyncio loop.

    qemu.qmp's synchronous client (``qemu.qmp.legacy``, also used by the examples) leaves
    it open; garbage-collected later, it would raise an unclosed-loop ``ResourceWarning``
    inside whatever test runs then.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # set to None already (asyncio.run does that)
            return
    if not loop.is_running():
        loop.close()
        asyncio.set_event_loop(None)


@contextlib.contextmanager
def legacy_client(path: Path | str) -> Iterator[QEMUMonitorProtocol]:
    """qemu.qmp's ``QEMUMonitorProtocol``, connected and negotiated, for the ``with``
    block; the asyncio loop it made is closed at the end (:func:`close_legacy_loop`)."""
    qmp = QEMUMonitorProtocol(str(path))
    try:
        qmp.connect(negotiate=True)
        yield qmp
    finally:
        close_legacy_loop()


def legacy_events_until(
    qmp: QEMUMonitorProtocol, name: str, status: str | None = None, timeout: float = 30
) -> list[dict[str, Any]]:
    """Events pulled from ``qmp`` up to and including the first ``name`` (with ``status``
    in its data, if given); each wait is bounded by ``timeout``."""
    seen: list[dict[str, Any]] = []
    while True:
        event = qmp.pull_event(wait=timeout)
        assert event is not None
        seen.append(event)
        data = event.get("data", {})
        if event["event"] == name and (status is None or data.get("status") == status):
            return seen


def legacy_quit(qmp: QEMUMonitorProtocol) -> None:
    """``quit`` succeeds, and the client closes on the daemon's EOF."""
    assert qmp.cmd_raw("quit") == {"return": {}}
    with contextlib.suppress(EOFError):  # qemu.qmp re-raises the server's EOF (QSD too)
        qmp.close()


# --- a trio client that sees the bytes -----------------------------------------------------


class RawClient:
    """A QMP client that sees the bytes: CRLF-framed lines, parsed one at a time.

    Every client is closed by :meth:`close_all` (an autouse fixture calls it after each
    test).
    """

    opened: ClassVar[list[RawClient]] = []

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.lines: list[bytes] = []
        RawClient.opened.append(self)

    @classmethod
    async def connect(cls, path: Path | str) -> RawClient:
        with trio.fail_after(IO_TIMEOUT):
            return cls(await trio.open_unix_socket(str(path)))

    @classmethod
    def close_all(cls) -> None:
        """Close every client still open (sync and outside trio: the bare descriptors)."""
        while cls.opened:
            fd = cls.opened.pop().stream.socket.detach()
            if fd >= 0:  # -1: the test closed it already
                os.close(fd)

    async def send(self, data: bytes | str) -> None:
        with trio.fail_after(IO_TIMEOUT):
            await self.stream.send_all(data.encode() if isinstance(data, str) else data)

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                      **extra: Any) -> None:  # fmt: skip
        message: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        await self.send(json.dumps(message))

    async def line(self) -> bytes:
        """The next raw line, CRLF included; fails on EOF."""
        with trio.fail_after(IO_TIMEOUT):
            while b"\n" not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"connection closed; pending {self.buffer!r}")
                self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.lines.append(line + b"\n")
        return line + b"\n"

    async def recv(self) -> dict[str, Any]:
        raw = await self.line()
        assert raw.endswith(b"\r\n"), raw
        value = json.loads(raw)
        assert isinstance(value, dict)
        return value

    async def negotiate(self) -> dict[str, Any]:
        greeting = await self.recv()
        await self.execute("qmp_capabilities")
        assert await self.recv() == {"return": {}}
        return greeting

    async def at_eof(self) -> bool:
        """Read until EOF (True) or until data arrives (False)."""
        with trio.fail_after(IO_TIMEOUT):
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
        self.buffer += data
        return not data

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- framing -------------------------------------------------------------------------------


def feed(chunks: Iterable[bytes], stream: JSONStream | None = None) -> list[Message | ParseError]:
    """Feed ``chunks`` one by one into ``stream`` (default: a fresh one); all items, in
    order."""
    stream = stream or JSONStream()
    items: list[Message | ParseError] = []
    for chunk in chunks:
        stream.feed(chunk)
        while (item := stream.next()) is not None:
            items.append(item)
    return items


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the (sorted, deduplicated) offsets ``cuts``."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
