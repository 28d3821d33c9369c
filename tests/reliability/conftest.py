"""Fixtures of the reliability tests: a blockd subprocess serving one socket.

The machinery shared with the long runs lives in the ``stress`` package at the repository
root (``stress/fuzzkit.py`` ...), so the CI passes and the long scripts check the same
things; this conftest loads it from there (:mod:`repo`).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from repo import ROOT, load_package

load_package("stress")

from blockd.client.lab import DaemonProcess, running_daemon  # noqa: E402
from stress.fuzzkit import FuzzClient  # noqa: E402


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One blockd for the module (hypothesis forbids function-scoped fixtures)."""
    with tempfile.TemporaryDirectory(prefix="blockd-rel-") as tmp:
        with running_daemon(Path(tmp)) as proc:
            yield proc
        assert proc.process.returncode == 0, Path(tmp, "daemon.log").read_text()


@pytest.fixture
def connect() -> Iterator[Callable[[Path | str], FuzzClient]]:
    """Open negotiated :class:`FuzzClient` connections; all are closed after the test."""
    opened: list[FuzzClient] = []

    def open_client(path: Path | str) -> FuzzClient:
        opened.append(FuzzClient(path))
        return opened[-1]

    yield open_client
    for client in opened:
        client.close()


# The stream tests' helpers (qemu-img wrappers and an in-process daemon harness).
STREAM_TESTS = ROOT / "tests" / "stream"
if str(STREAM_TESTS) not in sys.path:
    sys.path.insert(0, str(STREAM_TESTS))

import trio  # noqa: E402
from streamtools import Harness  # noqa: E402

from blockd.daemon import Daemon  # noqa: E402


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A daemon driven through its handlers (as tests/stream's fixture of that name)."""
    d = Daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        h = Harness(d)
        try:
            yield h
        finally:
            d.request_shutdown()
