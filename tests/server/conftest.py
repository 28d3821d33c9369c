"""Fixtures for the server tests: an in-process server on a real UNIX socket, a raw
line-reading client, and a daemon subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from blockd.commands.registry import Command, load_all
from blockd.daemon import Daemon
from blockd.server import Endpoint, Server

IO_TIMEOUT = 10.0


class RawClient:
    """A QMP client that sees the bytes: CRLF-framed lines, parsed one at a time.

    Every client is closed after its test (the autouse ``close_raw_clients`` fixture).
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


@pytest.fixture(autouse=True)
def close_raw_clients() -> Iterator[None]:
    yield
    while RawClient.opened:
        # Sync (sync tests use this too) and outside trio: close the bare descriptor.
        fd = RawClient.opened.pop().stream.socket.detach()
        if fd >= 0:  # -1: the test closed it already
            os.close(fd)


@dataclass
class Served:
    daemon: Daemon
    server: Server
    path: Path

    async def client(self, negotiate: bool = True) -> RawClient:
        client = await RawClient.connect(self.path)
        if negotiate:
            await client.negotiate()
        return client


@pytest.fixture
def commands() -> Mapping[str, Command]:
    """The handler table the ``served`` server uses; override to inject handlers."""
    return load_all()


@pytest.fixture
async def served(
    nursery: trio.Nursery, sock_dir: Path, commands: Mapping[str, Command]
) -> AsyncIterator[Served]:
    daemon = Daemon()
    server = Server(daemon, commands, outbox_limit=256 * 1024)
    path = sock_dir / "qmp.sock"
    await server.add_endpoint(Endpoint(str(path)))
    await nursery.start(daemon.run)
    await nursery.start(server.run)
    yield Served(daemon, server, path)
    with trio.fail_after(IO_TIMEOUT):
        await server.aclose()
        daemon.request_shutdown()


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    sock: Path
    pidfile: Path


def start_daemon(sock_dir: Path, *args: str) -> DaemonProcess:
    """``blockd --socket S --pidfile P ARGS``, returned once the pidfile exists."""
    sock, pidfile = sock_dir / "d.sock", sock_dir / "d.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockd", "--socket", str(sock), "--pidfile", str(pidfile), *args],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + IO_TIMEOUT
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"daemon did not start: {err.decode()}")
        time.sleep(0.01)
    return DaemonProcess(proc, sock, pidfile)


def stop_daemon(daemon: DaemonProcess) -> int:
    if daemon.proc.poll() is None:
        daemon.proc.terminate()
    try:
        return daemon.proc.wait(timeout=IO_TIMEOUT)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        if daemon.proc.stderr is not None:
            daemon.proc.stderr.close()


@pytest.fixture
def daemon_process(sock_dir: Path) -> Iterator[DaemonProcess]:
    daemon = start_daemon(sock_dir)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)
