"""A blocking QMP client for one-shot commands: connect, negotiate, execute, close.

The same sans-IO core as the trio client (:mod:`blockd.client.wire`) over a plain
blocking socket, for callers that run a few commands and never wait for events:
``blockctl jobs``, ``nodes``, ``pause``... Importing it costs no event loop, which is most
of a short command's run time. Events that arrive between replies are dropped. For events
(following a job) use :mod:`blockd.client.connection`.

Usage::

    with connect_blocking("/run/blockd/qmp.sock") as qmp:
        jobs = qmp.execute("query-jobs")
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from blockd.client.errors import (
    ClientError,
    CommandError,
    ConnectError,
    ConnectionLost,
    describe_connect_error,
    no_greeting,
    unusable_monitor,
)
from blockd.client.wire import Decoder, Greeting, ProtocolError, Reply, classify, encode_command

__all__ = ["BlockingClient", "Executor", "connect_blocking"]


class Executor(Protocol):
    """Anything that runs one QMP command and returns its ``return`` value."""

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any: ...


class BlockingClient:
    """One negotiated QMP connection on a blocking socket. Create it with
    :func:`connect_blocking`."""

    def __init__(self, sock: socket.socket, name: str = "blockctl") -> None:
        self._sock = sock
        self._decoder = Decoder()
        self._inbox: list[Any] = []
        self._ids = itertools.count()
        self._name = name
        self.greeting: Greeting | None = None

    def _next_message(self) -> Any:
        while not self._inbox:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as exc:
                raise ConnectionLost(f"connection lost: {exc}") from exc
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._inbox.extend(self._decoder.feed(data))  # ProtocolError: not QMP
        return classify(self._inbox.pop(0))

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost("the daemon closed the connection") from exc

    def handshake(self) -> None:
        """Read the greeting and leave capabilities negotiation.

        Raises:
            ProtocolError: the peer does not speak QMP.
            ClientError: the connection ended.
            TimeoutError: the socket's timeout passed.
        """
        msg = self._next_message()
        if not isinstance(msg, Greeting):
            raise ProtocolError("the first message was not a QMP greeting")
        self.greeting = msg
        self._send(encode_command("qmp_capabilities", {}, "negotiate"))
        msg = self._next_message()
        while not isinstance(msg, Reply):  # no events before negotiation, but be lenient
            msg = self._next_message()
        if msg.error is not None:
            raise ProtocolError(f"capabilities negotiation failed: {msg}")

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; waits as long as it takes.

        Raises:
            CommandError: the server replied with an error.
            ConnectionLost: the connection ended before the reply.
        """
        msg_id = f"{self._name}-{next(self._ids)}"
        self._send(encode_command(command, arguments or {}, msg_id))
        try:
            msg = self._next_message()
            while not (isinstance(msg, Reply) and str(msg.id) == msg_id):
                msg = self._next_message()  # events, a second greeting: not ours
        except ProtocolError as exc:
            raise ConnectionLost(f"connection lost: {exc}") from exc
        if msg.error is not None:
            raise CommandError(command, msg.error["class"], msg.error["desc"])
        return msg.value


@contextmanager
def connect_blocking(
    path: str, *, timeout: float, name: str = "blockctl"
) -> Iterator[BlockingClient]:
    """Connect to the QMP monitor on UNIX socket ``path`` and negotiate capabilities.

    ``timeout`` bounds the connection and the handshake; commands then wait as long as
    the daemon takes, as the trio client's do.

    Raises:
        ConnectError: the socket cannot be opened, or no QMP greeting arrives within
            ``timeout`` seconds; the texts are the trio client's.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError as exc:
            raise no_greeting(path, timeout) from exc
        except OSError as exc:
            raise ConnectError(describe_connect_error(path, exc)) from exc
        client = BlockingClient(sock, name)
        try:
            client.handshake()
        except TimeoutError as exc:
            raise no_greeting(path, timeout) from exc
        except (ClientError, ProtocolError) as exc:
            raise unusable_monitor(path, exc) from exc
        sock.settimeout(None)
        yield client
