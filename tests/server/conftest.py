"""Fixtures for the server tests: an in-process server on a real UNIX socket (clients:
:class:`kit.qmp.RawClient`), and a daemon subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
import trio
from kit.daemons import BlockdProcess, Served, start_blockd, stop
from kit.qmp import IO_TIMEOUT, RawClient

from blockd.commands.registry import Command, load_all
from blockd.daemon import Daemon
from blockd.server import Endpoint, Server


@pytest.fixture(autouse=True)
def close_raw_clients() -> Iterator[None]:
    yield
    RawClient.close_all()


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


@pytest.fixture
def daemon_process(sock_dir: Path) -> Iterator[BlockdProcess]:
    daemon = start_blockd(sock_dir)
    try:
        yield daemon
    finally:
        stop(daemon.proc)
