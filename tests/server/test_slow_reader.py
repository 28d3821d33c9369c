"""Output paces input: a session stops handling its client's requests while too much of
its output is unread, and yields to the others between requests (blockd/server.py).

The daemon-level check, with a flooding client and latency figures, is
tests/reliability/test_slow_reader.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from blockd.commands.registry import Command, load_all
from blockd.daemon import Daemon
from blockd.server import OUTBOX_PAUSE, Endpoint, Server, _Outbox

from .conftest import IO_TIMEOUT, RawClient, Served

# --- the outbox's accounting -------------------------------------------------------------


async def test_pending_counts_what_the_writer_is_still_sending() -> None:
    outbox = _Outbox(limit=100)
    assert outbox.put_nowait(b"a" * 30) and outbox.put_nowait(b"b" * 30)
    assert outbox.pending == 60
    assert await outbox.get() == b"a" * 30 + b"b" * 30
    assert outbox.pending == 60  # handed to the writer, not yet taken by the socket
    assert outbox.put_nowait(b"c" * 40)
    assert not outbox.put_nowait(b"d")  # 101 > 100: the connection overflows
    assert outbox.overflowed and outbox.closed
    assert await outbox.get() is None


async def test_wait_drained_returns_once_the_writer_comes_back() -> None:
    outbox = _Outbox(limit=1000)
    outbox.put_nowait(b"x" * 500)
    waited = trio.Event()

    async def reader() -> None:
        await outbox.wait_drained(100)
        waited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        data = await outbox.get()  # the writer takes it: still pending while sending
        await trio.testing.wait_all_tasks_blocked()
        assert data is not None and not waited.is_set()
        outbox.put_nowait(b"y" * 50)
        assert await outbox.get() == b"y" * 50  # the first write is done: 50 <= 100
        await trio.testing.wait_all_tasks_blocked()
        assert waited.is_set()


async def test_wait_drained_returns_when_the_outbox_closes() -> None:
    outbox = _Outbox(limit=1000)
    outbox.put_nowait(b"x" * 500)
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.wait_drained, 0)
            await trio.testing.wait_all_tasks_blocked()
            outbox.close()


# --- sessions ----------------------------------------------------------------------------


async def test_a_client_that_never_reads_is_paused_and_loses_nothing(served: Served) -> None:
    lazy, lively = await served.client(), await served.client()
    count = 400  # 10 MiB of replies, 40 times the outbox limit of the served fixture
    await lazy.send(
        b"".join(b'{"execute": "query-qmp-schema", "id": %d}' % i for i in range(count))
    )
    for i in range(20):  # served throughout
        await lively.execute("query-version", id=i)
        assert (await lively.recv())["id"] == i
    # Still connected, and every reply arrives, in order, once it reads.
    for i in range(count):
        reply = await lazy.recv()
        assert reply["id"] == i and reply["return"]
    await lazy.execute("query-version", id="after")
    assert (await lazy.recv())["id"] == "after"


@pytest.fixture
def counted() -> tuple[Mapping[str, Command], list[int]]:
    """The handler table with a query-version that counts its calls."""
    table = dict(load_all())
    real = table["query-version"]
    calls = [0]

    async def counting(d: Daemon) -> Any:
        calls[0] += 1
        return await real.call(d, {})

    table["query-version"] = Command("query-version", counting)
    return table, calls


@pytest.fixture
async def roomy(
    nursery: trio.Nursery, sock_dir: Path, counted: tuple[Mapping[str, Command], list[int]]
) -> AsyncIterator[Path]:
    """A server with the default outbox limits (the burst below never reaches the pause)."""
    daemon = Daemon()
    server = Server(daemon, counted[0])
    assert server.outbox_pause == OUTBOX_PAUSE
    path = sock_dir / "roomy.sock"
    await server.add_endpoint(Endpoint(str(path)))
    await nursery.start(daemon.run)
    await nursery.start(server.run)
    yield path
    with trio.fail_after(IO_TIMEOUT):
        await server.aclose()
        daemon.request_shutdown()


async def test_a_burst_of_requests_lets_other_sessions_in(
    roomy: Path, counted: tuple[Mapping[str, Command], list[int]]
) -> None:
    calls = counted[1]
    burst, lively = await RawClient.connect(roomy), await RawClient.connect(roomy)
    await burst.negotiate()
    await lively.negotiate()
    count = 3000  # no I/O and no checkpoint in the handler: only the session yields
    await burst.send(b'{"execute": "query-version"}' * count)
    await lively.execute("query-jobs", id="lively")
    assert await lively.recv() == {"return": [], "id": "lively"}
    assert calls[0] < count // 2  # answered in the middle of the burst, not after it
    for _ in range(count):
        assert "return" in await burst.recv()
    assert calls[0] == count
