"""The command lines the tests run as a user would: ``blockd``, ``blockctl`` and the
example scripts, each bounded in time and never raising on failure (the test judges the
finished process).

Each runs with this Python, in a subprocess, except :func:`ctl_in_process`, which runs
blockctl's ``main`` in this process to save an interpreter start-up; :class:`Terminal`
runs blockctl on a pseudo-terminal, as a user at a shell would.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from blockd.client.ctl import main
from kit.repo import EXAMPLES

#: this blockd, as the suite's daemons run it (safe-path mode: ``tests/conftest.py``)
BLOCKD = [sys.executable, "-m", "blockd"]
#: the daemon the client and example tests run: ``BLOCKD_TEST_DAEMON``
#: (``qemu-storage-daemon`` or a QSD binary's path), or None for this blockd
TEST_DAEMON = os.environ.get("BLOCKD_TEST_DAEMON") or None


def script_env() -> dict[str, str]:
    """This environment as a shell script would pass it on: without the test runner's
    ``COLUMNS``/``LINES`` (they would make rich wrap at 80)."""
    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def run_blockd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``blockd ARGS`` to its end (``python -m blockd``)."""
    return subprocess.run(
        [*BLOCKD, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    """The real blockctl console script in its own process."""
    return subprocess.run([sys.executable, "-m", "blockd.client.ctl", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=script_env())  # fmt: skip


def ctl_in_process(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run blockctl's ``main`` in this process, as the console script would, minus the
    interpreter start-up; never raises on failure. ``test_blockctl.py`` also runs the
    real console script in its own process (:func:`run_ctl`)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            status = int(exc.code or 0)
    return subprocess.CompletedProcess(["blockctl", *argv], status, out.getvalue(),
                                       err.getvalue())  # fmt: skip


def run_example(name: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``examples/NAME ARGS...`` as-is with this Python, against the daemon under test
    (:data:`TEST_DAEMON`)."""
    extra = ["--daemon", TEST_DAEMON] if TEST_DAEMON else []
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *extra, *args],
        capture_output=True, text=True, timeout=timeout, check=False, env=script_env(),
    )  # fmt: skip


class Terminal:
    """``blockctl ARGS`` on a pseudo-terminal, 120 columns wide."""

    def __init__(self, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            os.environ.pop("COLUMNS", None)
            os.environ["TERM"] = "xterm"
            os.execv(sys.executable, [sys.executable, "-m", "blockd.client.ctl", *argv])
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the other side is closed
                    return marker in self.output
                if not chunk:
                    return marker in self.output
                self.output += chunk
        return True

    def wait(self) -> int:
        self.read_until(b"\0", timeout=30.0)  # drain to EOF
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.fd = -1
        return os.waitstatus_to_exitcode(status)

    def text(self) -> str:
        return self.output.decode(errors="replace")
