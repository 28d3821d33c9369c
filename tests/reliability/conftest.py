"""Fixtures of the reliability tests: a blockd subprocess serving one socket, and clients
of it.

The machinery shared with the long runs lives in the ``stress`` package at the repository
root (``stress/fuzzkit.py`` ...), so the CI passes and the long scripts check the same
things; this conftest loads it from there (:func:`kit.repo.load_package`). The in-process
``harness`` fixture is the suite's (``tests/conftest.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kit.repo import load_package

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
