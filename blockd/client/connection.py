"""A small trio QMP client: connect, negotiate, execute, listen for events.

This is the I/O edge over :mod:`blockd.client.wire`. One background task reads the socket
and routes every message: replies go to the caller waiting on that ``id``, events go to
every listener whose name filter matches. Listeners have unbounded buffers, so a slow
consumer never stalls replies.

Usage::

    async with connect("/run/blockd/qmp.sock") as qmp:
        with qmp.listen("JOB_STATUS_CHANGE") as events:
            await qmp.execute("block-stream", {"job-id": "j0", "device": "top"})
            async for ev in events: ...
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from blockd.client.errors import (
    ClientError,
    CommandError,
    ConnectError,
    ConnectionLost,
    describe_connect_error,
    no_greeting,
    unusable_monitor,
)
from blockd.client.wire import (
    Decoder,
    Event,
    Greeting,
    ProtocolError,
    Reply,
    classify,
    encode_command,
)

#: Seconds to wait for the greeting and for the capabilities negotiation.
HANDSHAKE_TIMEOUT = 5.0

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "Client",
    "ClientError",
    "CommandError",
    "ConnectError",
    "ConnectionLost",
    "connect",
    "describe_connect_error",
    "single",
]


class Client:
    """One negotiated QMP connection. Create it with :func:`connect`."""

    def __init__(self, stream: trio.abc.Stream, name: str = "blockctl") -> None:
        self._stream = stream
        self._decoder = Decoder()
        self._inbox: list[Any] = []
        self._ids = itertools.count()
        self._name = name
        self._write_lock = trio.Lock()
        self._waiting: dict[str, trio.MemorySendChannel[Reply]] = {}
        self._listeners: list[tuple[frozenset[str], trio.MemorySendChannel[Event]]] = []
        self._closed: ClientError | None = None
        self.greeting: Greeting | None = None

    async def _next_message(self) -> Any:
        while not self._inbox:
            data = await self._stream.receive_some(65536)
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._inbox.extend(self._decoder.feed(bytes(data)))
        return classify(self._inbox.pop(0))

    async def _handshake(self) -> None:
        msg = await self._next_message()
        if not isinstance(msg, Greeting):
            raise ProtocolError("the first message was not a QMP greeting")
        self.greeting = msg
        await self._send(encode_command("qmp_capabilities", {}, "negotiate"))
        msg = await self._next_message()
        if not isinstance(msg, Reply) or msg.error is not None:
            raise ProtocolError(f"capabilities negotiation failed: {msg}")

    async def _send(self, data: bytes) -> None:
        async with self._write_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost("the daemon closed the connection") from exc

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self._next_message()
                if isinstance(msg, Event):
                    for names, send in self._listeners:
                        if not names or msg.name in names:
                            send.send_nowait(msg)
                elif isinstance(msg, Reply):
                    waiter = self._waiting.pop(str(msg.id), None)
                    if waiter is not None:
                        waiter.send_nowait(msg)
                # A second greeting is ignored.
        except (ClientError, ProtocolError, trio.BrokenResourceError, OSError) as exc:
            self._closed = (
                exc
                if isinstance(exc, ConnectionLost)
                else ConnectionLost(f"connection lost: {exc}")
            )
        finally:
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()
            for _, listener in self._listeners:
                listener.close()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value.

        Raises:
            CommandError: the server replied with an error.
            ConnectionLost: the connection ended before the reply.
        """
        if self._closed is not None:
            raise self._closed
        msg_id = f"{self._name}-{next(self._ids)}"
        send, receive = trio.open_memory_channel[Reply](1)
        self._waiting[msg_id] = send
        await self._send(encode_command(command, arguments or {}, msg_id))
        try:
            reply = await receive.receive()
        except trio.EndOfChannel:
            raise self._closed or ConnectionLost("connection closed") from None
        if reply.error is not None:
            raise CommandError(command, reply.error["class"], reply.error["desc"])
        return reply.value

    @contextmanager
    def listen(self, *names: str) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """Receive the events named ``names`` (all events when none) while inside the block.

        Events arriving before a command's reply are delivered before that reply returns
        from :meth:`execute`, so subscribe first, then execute.
        """
        send, receive = trio.open_memory_channel[Event](math.inf)
        entry = (frozenset(names), send)
        if self._closed is not None:
            send.close()
        self._listeners.append(entry)
        try:
            yield receive
        finally:
            self._listeners.remove(entry)
            send.close()


@asynccontextmanager
async def connect(
    path: str, *, timeout: float = HANDSHAKE_TIMEOUT, name: str = "blockctl"
) -> AsyncIterator[Client]:
    """Connect to the QMP monitor on UNIX socket ``path`` and negotiate capabilities.

    Raises:
        ConnectError: the socket cannot be opened, or no QMP greeting arrives within
            ``timeout`` seconds (a monitor serves one client at a time in QEMU).
    """
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise ConnectError(describe_connect_error(path, exc)) from exc
    async with stream:
        client = Client(stream, name)
        try:
            with trio.fail_after(timeout):
                await client._handshake()
        except trio.TooSlowError as exc:
            raise no_greeting(path, timeout) from exc
        except (ClientError, ProtocolError) as exc:
            raise unusable_monitor(path, exc) from exc
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never fails (it records errors), so a group holds the caller's
            # one exception: give it back unwrapped, as if there were no nursery.
            raise single(group) from None


def single(
    group: BaseExceptionGroup[BaseException],
) -> BaseException | BaseExceptionGroup[BaseException]:
    """The only exception in ``group`` (recursively), or ``group`` itself."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group
