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
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockd.client.lab import DaemonProcess, LabError, query_commands, running_daemon
from blockd.ctl import main

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
        """Run ``blockctl -s SOCKET ARGS...`` in this process (the console script's
        ``main``, as a subprocess would, minus the interpreter start-up); never raises on
        failure. ``tests/client/test_blockctl.py`` also runs the real console script."""
        argv = ["-s", str(self.socket), *args]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exc:  # argparse usage errors
                status = int(exc.code or 0)
        return subprocess.CompletedProcess(["blockctl", *argv], status, out.getvalue(),
                                           err.getvalue())  # fmt: skip


@pytest.fixture
def lab(sock_dir: Path, tmp_path: Path) -> Iterator[Lab]:
    """A daemon serving QMP on a socket in ``sock_dir``; images go to ``tmp_path``."""
    with ExitStack() as stack:
        try:
            daemon = stack.enter_context(running_daemon(sock_dir, PROGRAM))
            commands = query_commands(daemon.socket)
        except (LabError, OSError) as exc:
            if PROGRAM is None:
                pytest.skip(f"blockd does not start or answer yet: {exc}")
            raise
        yield Lab(daemon, commands, tmp_path)
