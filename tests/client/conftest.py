"""Fixtures for blockctl and the client: a daemon subprocess with its QMP socket.

The daemon is blockd (``python -m blockd``). Set ``BLOCKD_TEST_DAEMON`` to
``qemu-storage-daemon`` or to a QSD binary's path to run the same tests against QEMU's
daemon: a client that works with one must work with the other. A test that needs a QMP
command the daemon does not list in ``query-commands`` is skipped with that reason
(:class:`kit.daemons.Lab`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.daemons import Lab, lab_daemon

from blockd.client.lab import DaemonProcess


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[tuple[DaemonProcess, set[str]]]:
    """One daemon per test module (starting and stopping one takes seconds on a busy
    machine); :func:`lab` empties it after every test."""
    with lab_daemon("blockd-ctl-") as (daemon, commands):
        yield daemon, commands


@pytest.fixture
def lab(shared_daemon: tuple[DaemonProcess, set[str]], tmp_path: Path) -> Iterator[Lab]:
    """The module's daemon, empty (no jobs, no nodes); images go to ``tmp_path``."""
    daemon, commands = shared_daemon
    lab = Lab(daemon, commands, tmp_path)
    yield lab
    lab.reset()
