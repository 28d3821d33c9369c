"""Fixtures for blockctl and the client: a daemon subprocess with its QMP socket.

The daemon is blockd (``python -m blockd``). Set ``BLOCKD_TEST_DAEMON`` to
``qemu-storage-daemon`` or to a QSD binary's path to run the same tests against QEMU's
daemon: a client that works with one must work with the other. A test that needs a QMP
command the daemon does not list in ``query-commands`` is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockd.client.ctl import main
from blockd.client.lab import (
    DaemonProcess,
    LabError,
    query_commands,
    reset_daemon,
    running_daemon,
)

PROGRAM = os.environ.get("BLOCKD_TEST_DAEMON") or None


@dataclass
class Lab:
    """A running daemon plus helpers to drive it."""

    daemon: DaemonProcess
    commands: set[str]
    images: Path

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    def require(self, *commands: str) -> None:
        """Skip the calling test while the daemon lacks one of ``commands``."""
        missing = sorted(set(commands) - self.commands)
        if missing:
            pytest.skip(f"the daemon does not implement {', '.join(missing)} yet")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``blockctl -s SOCKET ARGS...``; see :func:`ctl_in_process`."""
        return ctl_in_process("-s", str(self.socket), *args)


def ctl_in_process(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run blockctl's ``main`` in this process, as the console script would, minus the
    interpreter start-up; never raises on failure. ``test_blockctl.py`` also runs the
    real console script in its own process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            status = int(exc.code or 0)
    return subprocess.CompletedProcess(["blockctl", *argv], status, out.getvalue(),
                                       err.getvalue())  # fmt: skip


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[tuple[DaemonProcess, set[str]]]:
    """One daemon per test module (starting and stopping one takes seconds on a busy
    machine); :func:`lab` empties it after every test."""
    where = Path(tempfile.mkdtemp(prefix="blockd-ctl-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, where, ignore_errors=True)
        try:
            daemon = stack.enter_context(running_daemon(where, PROGRAM))
            commands = query_commands(daemon.socket)
        except (LabError, OSError) as exc:
            if PROGRAM is None:
                pytest.skip(f"blockd does not start or answer yet: {exc}")
            raise
        yield daemon, commands


@pytest.fixture
def lab(shared_daemon: tuple[DaemonProcess, set[str]], tmp_path: Path) -> Iterator[Lab]:
    """The module's daemon, empty (no jobs, no nodes); images go to ``tmp_path``."""
    daemon, commands = shared_daemon
    yield Lab(daemon, commands, tmp_path)
    if daemon.process.poll() is not None:
        raise AssertionError(f"the daemon died: {daemon.log.read_text()}")
    if {"query-jobs", "query-named-block-nodes", "blockdev-del"} <= commands:
        reset_daemon(daemon.socket)
