"""The QMP server: the only module that touches sockets.

Theory of operation
-------------------
A :class:`Server` owns listening UNIX sockets (``--chardev socket,...,server=on``) and
outgoing client-mode connections (``server=off``). Every accepted connection is a
*session*: one :class:`blockd.qmp.connection.Connection` (the sans-IO protocol core) and
two tasks.

* The **reader** receives bytes, feeds the core and runs the requests it yields one at a
  time, in order. It does not read further input while a command runs (as QEMU,
  docs/qemu-behaviour/qmp-protocol.md §4).
* The **writer** sends whatever is in the session's :class:`_Outbox`. Replies, protocol
  output and events all go through that one queue, so they keep their order: events a
  command raises are queued at the moment they are emitted, hence before its reply.

Rules:

* Nothing a client does blocks the daemon or another client. The event sink only queues;
  if a client stops reading and its queue passes :data:`OUTBOX_LIMIT`, its connection is
  closed rather than buffered without bound.
* A client's output paces its input. The reader handles the next request (or bad input)
  only while the session's output not yet written, queued or being sent, is at most
  :data:`OUTBOX_PAUSE`; above it the reader waits, reads nothing, and the socket's
  buffers push back on the client. A client that sends requests but never reads costs
  one pause worth of replies and then nothing (QEMU 10.0 would buffer every reply
  without bound). Only events can then grow the queue to :data:`OUTBOX_LIMIT`.
* A session yields to the others after each request it handles, so a burst of requests
  that need no I/O (``query-qmp-schema`` in a loop) cannot hold the event loop.
* A command is never cancelled because its client went away: it finishes and its reply
  is dropped (a half-done ``blockdev-add`` would leave the graph inconsistent). Only
  server shutdown cancels commands, after a grace period.
* At most :data:`MAX_CONNECTIONS` sessions run at once; a connection beyond that is
  accepted and closed at once, with a warning on stderr.
* A socket file is created with mode 0600 (or stricter, per the umask), never in a
  directory everyone may write to without the sticky bit, never through a symlink (any
  non-socket at the path is refused). A stale socket
  (nobody answers a connect) is replaced; a live one makes startup fail. Sockets this
  server created are removed when it closes, if they are still the same files.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import trio

from blockd.commands.control import version_info
from blockd.commands.registry import Command
from blockd.daemon import Daemon
from blockd.errors import CommandNotFound, QMPError
from blockd.events import Event
from blockd.qmp.connection import NEED_DATA, Connection, Output, Request

__all__ = ["MAX_CONNECTIONS", "OUTBOX_LIMIT", "OUTBOX_PAUSE", "Endpoint", "EndpointError", "Server"]

log = logging.getLogger("blockd.server")

MAX_CONNECTIONS: Final = 256
#: Bytes of output queued for one client past which its connection is closed.
OUTBOX_LIMIT: Final = 16 * 1024 * 1024
#: Bytes of output not yet written past which a session stops handling its client's
#: requests until the client has read some.
OUTBOX_PAUSE: Final = 1024 * 1024
READ_SIZE: Final = 65536
LISTEN_BACKLOG: Final = 128
#: Seconds a closing server lets sessions flush their queued replies (``quit``).
CLOSE_GRACE: Final = 2.0
#: Seconds a closing session waits for its socket to close (shielded: the descriptor
#: must not leak when the session is cancelled). A UNIX socket closes at once; the bound
#: is there for a peer that never lets a TLS/transport close finish.
STREAM_CLOSE_SECONDS: Final = 1.0
#: Seconds for closing every listening socket (shielded, so that none stays bound).
LISTENER_CLOSE_SECONDS: Final = 1.0
_UNIX_PATH_MAX: Final = 107


class EndpointError(Exception):
    """A socket cannot be set up; ``str(exc)`` is the message for the user."""


@dataclass(frozen=True)
class Endpoint:
    """Where one QMP monitor is served.

    Attributes:
        path: the UNIX socket path (None with ``fd``).
        fd: an inherited listening socket (``--chardev socket,fd=N,server=on``).
        listen: True to listen (``server=on``), False to connect to ``path``.
        pretty: pretty-print output (``--monitor pretty=on``).
    """

    path: str | None
    fd: int | None = None
    listen: bool = True
    pretty: bool = False


class _Outbox:
    """The bytes waiting to be written to one client; bounded, never blocks a producer.

    :attr:`pending` counts what is queued and what the writer is sending, so the reader
    can wait for the client to have read its replies (:meth:`wait_drained`).
    """

    def __init__(self, limit: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._sending = 0
        self._limit = limit
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self.closed = False
        self.overflowed = False

    @property
    def pending(self) -> int:
        """Bytes queued or being sent: not yet accepted by the socket."""
        return self._queued + self._sending

    def put_nowait(self, data: bytes) -> bool:
        """Queue ``data``; False if the outbox is closed or would pass its limit."""
        if self.closed:
            return False
        if self.pending + len(data) > self._limit:
            self.overflowed = True
            self._chunks.clear()
            self._queued = 0
            self.close()
            return False
        self._chunks.append(data)
        self._queued += len(data)
        self._wakeup.set()
        return True

    def close(self) -> None:
        """Accept nothing more; :meth:`get` returns what is queued, then None."""
        self.closed = True
        self._wakeup.set()
        self._drained.set()

    async def get(self) -> bytes | None:
        """Everything queued so far, joined; None once closed and empty.

        The previous result counts as :attr:`pending` until this is called again: the
        writer calls it once the socket has taken all of it.
        """
        self._sending = 0
        self._drained.set()
        while not self._chunks:
            if self.closed:
                return None
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._queued = 0
        self._sending = len(data)
        return data

    async def wait_drained(self, level: int) -> None:
        """Return once at most ``level`` bytes are pending, or the outbox is closed."""
        while self.pending > level and not self.closed:
            self._drained = trio.Event()
            await self._drained.wait()


class _Session:
    """One QMP connection: a reader and a writer task around a protocol core."""

    def __init__(self, server: Server, stream: trio.abc.Stream, pretty: bool) -> None:
        self._server = server
        self._daemon = server.daemon
        self._stream = stream
        self._outbox = _Outbox(server.outbox_limit)
        self._pause = server.outbox_pause
        self._conn = Connection(
            server.daemon.schema, version=version_info(), capabilities=("oob",), pretty=pretty
        )
        self._dead = False  # the client is gone or the session is closing: stop reading
        self._recv_scope: trio.CancelScope | None = None

    def stop_reading(self) -> None:
        """Read no more requests; queued output is still written (graceful close)."""
        self._dead = True
        self._outbox.close()
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    def _send(self, data: bytes) -> None:
        if not self._outbox.put_nowait(data) and self._outbox.overflowed:
            log.warning("closing a QMP connection whose client does not read its output")
            self.stop_reading()

    def _on_event(self, event: Event) -> None:
        try:
            data = self._conn.event(event)
        except (TypeError, ValueError):  # a bug: the emitter must not fail because of it
            log.exception("event %s cannot be encoded; not sent", event.get("event"))
            return
        if data is not None:
            self._send(data)

    async def run(self) -> None:
        self._send(self._conn.greeting())
        unsubscribe = self._daemon.events.subscribe(self._on_event)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader()
                self._outbox.close()
        finally:
            unsubscribe()
            with trio.CancelScope(shield=True), trio.move_on_after(STREAM_CLOSE_SECONDS):
                await self._stream.aclose()

    async def _writer(self) -> None:
        try:
            while (data := await self._outbox.get()) is not None:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self.stop_reading()

    async def _reader(self) -> None:
        while not self._dead:
            with trio.CancelScope() as self._recv_scope:
                try:
                    data = await self._stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
            self._recv_scope = None
            if self._dead:
                return
            self._conn.receive_data(bytes(data))
            await self._process()
            if not data:
                return

    async def _process(self) -> None:
        while not self._dead:
            # Output paces input: nothing more is handled (so nothing more read) until
            # the client has taken most of what it was sent.
            await self._outbox.wait_drained(self._pause)
            if self._dead:
                return
            event = self._conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Output):
                self._send(event.data)
            elif isinstance(event, Request):
                self._send(await self._execute(event))
            # Let other sessions in between two requests of this one, whatever the
            # handler awaited (a query is answered without a checkpoint).
            await trio.lowlevel.checkpoint()

    async def _execute(self, request: Request) -> bytes:
        handler: Command | None = self._server.commands.get(request.command)
        try:
            if handler is None:
                raise CommandNotFound(f"The command {request.command} has not been found")
            value = await handler.call(self._daemon, request.arguments)
        except QMPError as exc:
            return self._conn.error(request, exc)
        except Exception as exc:  # a bug must not take the daemon down; report it
            log.exception("command %s failed unexpectedly", request.command)
            return self._conn.error(request, QMPError(f"Internal error: {exc}"))
        try:
            return self._conn.reply(request, value)
        except (TypeError, ValueError) as exc:  # a return value with no JSON form: a bug
            log.exception("the reply of command %s cannot be encoded", request.command)
            return self._conn.error(request, QMPError(f"Internal error: {exc}"))


def _unlink_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse a live one or a non-socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise EndpointError(f"Failed to bind socket to {path}: File exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left behind by a daemon that died
        return
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            raise EndpointError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise EndpointError(f"Failed to bind socket to {path}: a running daemon is listening there")


def _check_directory(path: str) -> None:
    """Refuse a socket directory where another user could swap the file: one writable by
    everyone without the sticky bit (a sticky one such as /tmp is fine)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise EndpointError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise EndpointError(
            f"Failed to bind socket to {path}: the directory {directory} is writable by "
            "everyone and not sticky"
        )


def _bind_unix(path: str) -> socket.socket:
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise EndpointError(f"UNIX socket path '{path}' is too long")
    _check_directory(path)
    _unlink_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask decides the mode bind() gives the file: never wider than 0600, and
    # stricter if the user's umask is (the mode is never loosened afterwards).
    old = os.umask(0o177)
    try:
        os.umask(old | 0o177)
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise EndpointError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    sock.listen(LISTEN_BACKLOG)
    return sock


class Server:
    """Serves QMP on any number of endpoints for one :class:`Daemon`.

    Add endpoints with :meth:`add_endpoint` (sockets are bound at once, so errors show
    before the daemon reports ready), then run :meth:`run` in a nursery and stop it with
    :meth:`aclose`.

    Args:
        daemon: what commands act on; its event bus feeds every negotiated session.
        commands: the handler table (``registry.load_all()``).
        max_connections: sessions served at once.
        outbox_limit: bytes queued for one client before its connection is closed.
        outbox_pause: bytes not yet written to a client past which its requests wait;
            by default :data:`OUTBOX_PAUSE`, or a quarter of ``outbox_limit`` if less.
    """

    def __init__(
        self,
        daemon: Daemon,
        commands: Mapping[str, Command],
        *,
        max_connections: int = MAX_CONNECTIONS,
        outbox_limit: int = OUTBOX_LIMIT,
        outbox_pause: int | None = None,
    ) -> None:
        self.daemon = daemon
        self.commands = commands
        self.max_connections = max_connections
        self.outbox_limit = outbox_limit
        if outbox_pause is None:
            outbox_pause = min(OUTBOX_PAUSE, outbox_limit // 4)
        self.outbox_pause = outbox_pause
        self._listeners: list[tuple[trio.SocketListener, bool]] = []
        self._clients: list[tuple[trio.SocketStream, bool]] = []
        self._created: list[tuple[str, int, int]] = []
        self._sessions: set[_Session] = set()
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self._closed = trio.Event()
        self._idle = trio.Event()

    @property
    def paths(self) -> list[str]:
        """The socket files this server created."""
        return [path for path, _, _ in self._created]

    async def add_endpoint(self, endpoint: Endpoint) -> None:
        """Bind (or connect) ``endpoint`` now; it is served once :meth:`run` starts.

        Raises:
            EndpointError: the socket cannot be created, a live daemon owns the path, or
                the client-mode connect fails.
        """
        if endpoint.fd is not None:
            try:
                sock = socket.socket(fileno=endpoint.fd)
                sock.listen(LISTEN_BACKLOG)
            except OSError as exc:
                raise EndpointError(f"fd {endpoint.fd}: {exc.strerror}") from exc
        elif endpoint.listen:
            assert endpoint.path is not None
            sock = _bind_unix(endpoint.path)
            info = os.stat(endpoint.path)
            self._created.append((endpoint.path, info.st_dev, info.st_ino))
        else:
            assert endpoint.path is not None
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await client.connect(endpoint.path)
            except OSError as exc:
                client.close()
                raise EndpointError(
                    f"Failed to connect to '{endpoint.path}': {exc.strerror}"
                ) from exc
            self._clients.append((trio.SocketStream(client), endpoint.pretty))
            return
        sock.setblocking(False)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._listeners.append((listener, endpoint.pretty))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`aclose`; reports started once every endpoint accepts."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with trio.open_nursery() as acceptors:
                    for listener, pretty in self._listeners:
                        acceptors.start_soon(self._accept_loop, listener, pretty)
                    for stream, pretty in self._clients:
                        nursery.start_soon(self._serve, stream, pretty)
                    task_status.started()
                    await self._closing.wait()
                    acceptors.cancel_scope.cancel()
                await self._close_listeners()
                await self._drain(nursery)
        finally:
            await self._close_listeners()
            self.remove_sockets()
            self._closed.set()

    async def _close_listeners(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(LISTENER_CLOSE_SECONDS) as bound:
            for listener, _ in self._listeners:
                await listener.aclose()
        if bound.cancelled_caught:
            log.error("closing the listening sockets took over %gs", LISTENER_CLOSE_SECONDS)

    async def _drain(self, nursery: trio.Nursery) -> None:
        # Stop accepting (the accept loops watch _closing), let sessions flush, then cut.
        for session in list(self._sessions):
            session.stop_reading()
        with trio.move_on_after(CLOSE_GRACE):
            while self._sessions:
                self._idle = trio.Event()
                await self._idle.wait()
        nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        """Stop accepting, flush queued replies (a grace period), close every session.

        Returns once the server is closed and its socket files are removed.
        """
        self._closing.set()
        if self._nursery is not None:
            await self._closed.wait()
        else:
            await self._close_listeners()
            self.remove_sockets()

    def remove_sockets(self) -> None:
        """Delete the socket files created here, if they are still ours."""
        for path, dev, ino in self._created:
            try:
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass
        self._created.clear()

    async def _accept_loop(self, listener: trio.SocketListener, pretty: bool) -> None:
        assert self._nursery is not None
        while not self._closing.is_set():
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            if len(self._sessions) >= self.max_connections:
                log.warning("refusing a QMP connection: %d already open", len(self._sessions))
                await stream.aclose()
                continue
            self._nursery.start_soon(self._serve, stream, pretty)

    async def _serve(self, stream: trio.abc.Stream, pretty: bool) -> None:
        session = _Session(self, stream, pretty)
        self._sessions.add(session)
        try:
            if self._closing.is_set():
                session.stop_reading()
            await session.run()
        finally:
            self._sessions.discard(session)
            self._idle.set()


def describe(endpoint: Endpoint) -> str:
    """A short text for logs: the path or the fd."""
    return endpoint.path if endpoint.path is not None else f"fd {endpoint.fd}"
