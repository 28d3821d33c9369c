"""Shutdown never hangs: a node whose flush never returns, a job stuck in I/O.

Unit tests use a test-only driver registered for the test (``hang-raw``: a ``raw`` node
whose flush never returns) and a job whose ``run()`` never reaches a pause point. The end
to end tests are in ``test_shutdown_e2e.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import trio
from trio.testing import MockClock

from blockd.block.drivers import DRIVERS
from blockd.block.drivers.raw import RawDriver
from blockd.block.graph import NODE_CLOSE_SECONDS, Graph
from blockd.daemon import Daemon
from blockd.events import EventBus
from blockd.jobs.job import Job
from blockd.jobs.manager import CANCEL_ALL_SECONDS, JobManager


class HangingFlushDriver(RawDriver):
    """``raw``, except that a flush never returns (a disk that stopped answering)."""

    format_name: ClassVar[str] = "hang-raw"
    closed: ClassVar[list[str]] = []

    async def flush(self) -> None:
        await trio.sleep_forever()

    async def close(self) -> None:
        HangingFlushDriver.closed.append(self.node.name)
        await super().close()


@pytest.fixture
def hang_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DRIVERS, "hang-raw", HangingFlushDriver)
    HangingFlushDriver.closed = []


@pytest.fixture
def image(tmp_path: Path) -> Callable[[str], str]:
    def make(name: str) -> str:
        path = tmp_path / name
        path.write_bytes(b"\0" * 65536)
        return str(path)

    return make


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def _add(graph: Graph, driver: str, name: str, filename: str) -> None:
    options = {
        "driver": driver,
        "node-name": name,
        "file": {"driver": "file", "filename": filename},
    }
    await graph.open_node(options, top_level=True)


async def test_close_all_gives_up_on_a_hung_flush_and_closes_the_rest(
    autojump_clock: MockClock,
    hang_driver: None,
    image: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    graph = Graph()
    await _add(graph, "raw", "before", image("a.img"))
    await _add(graph, "hang-raw", "stuck", image("b.img"))
    await _add(graph, "raw", "after", image("c.img"))
    files = [graph.nodes[n].file for n in ("before", "stuck", "after")]
    # (the autojump clock also jumps while a worker thread runs: bound the total only)
    with trio.fail_after(10 * NODE_CLOSE_SECONDS):
        await graph.close_all()
    assert graph.nodes == {} and graph.unflushed == ["stuck"] and graph.closing is None
    # every file was closed, the stuck node's too (its close never ran)
    assert all(f is not None and f.driver.fd == -1 for f in files)  # type: ignore[attr-defined]
    assert HangingFlushDriver.closed == []
    assert _errors(caplog) == [
        f"node 'stuck': flush and close did not finish within {NODE_CLOSE_SECONDS:g}s "
        "(storage not responding); closed without flushing its data"
    ]


async def test_a_hung_flush_does_not_hang_blockdev_del_and_cancel_still_propagates(
    autojump_clock: MockClock, hang_driver: None, image: Callable[[str], str]
) -> None:
    graph = Graph()
    await _add(graph, "hang-raw", "stuck", image("b.img"))
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 1  # the caller's own timeout
        await graph.delete("stuck")  # shielded, bounded: the close runs to its bound
        await trio.sleep_forever()  # the caller's cancel is delivered here, not swallowed
    assert scope.cancelled_caught
    assert trio.current_time() >= NODE_CLOSE_SECONDS  # the close ran to its bound
    assert graph.unflushed == ["stuck"] and "stuck" not in graph.nodes


async def test_daemon_aclose_reports_data_not_flushed(
    autojump_clock: MockClock, hang_driver: None, image: Callable[[str], str]
) -> None:
    daemon = Daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await _add(daemon.graph, "hang-raw", "stuck", image("b.img"))
        await _add(daemon.graph, "raw", "fine", image("c.img"))
        assert daemon.data_safe
        with trio.fail_after(3 * NODE_CLOSE_SECONDS):
            daemon.request_shutdown()
    assert daemon.graph.nodes == {} and not daemon.data_safe


class StuckJob(Job):
    """A job whose ``run()`` is stuck in I/O: it never reaches a pause point."""

    job_type: ClassVar[str] = "stream"

    async def run(self) -> None:
        await trio.sleep_forever()


async def test_cancel_all_gives_up_on_a_job_stuck_in_io(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        manager = JobManager(EventBus())
        manager.attach(nursery)
        job = StuckJob(manager, "j0")
        await job.launch()
        await trio.sleep(1)
        start = trio.current_time()
        assert await manager.cancel_all() is False
        assert trio.current_time() - start == pytest.approx(CANCEL_ALL_SECONDS)
        assert await manager.cancel_all() is False  # the next one does not wait again
        assert trio.current_time() - start == pytest.approx(CANCEL_ALL_SECONDS)
        assert not job.ended and job.cancelled
        nursery.cancel_scope.cancel()  # the daemon's exit tears the job down
    assert job.ended
    assert _errors(caplog) == [
        f"job 'j0' did not end within {CANCEL_ALL_SECONDS:g}s of the cancel (status running; "
        "storage not responding?)"
    ]
