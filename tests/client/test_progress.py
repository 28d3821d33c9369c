"""blockctl on a real terminal: the live progress bar, and Ctrl-C cancelling the job."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time

from .conftest import Lab
from .test_blockctl import add_chain

STREAM = ("blockdev-add", "block-stream", "query-block-jobs", "query-jobs", "job-dismiss")


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


def test_live_progress_bar(lab: Lab) -> None:
    lab.require(*STREAM)
    add_chain(lab)
    term = Terminal("-s", str(lab.socket), "stream", "top", "--job-id", "j0", "--speed", "4M")
    assert term.wait() == 0, term.text()
    text = term.text()
    # Redrawn in place (carriage returns / cursor moves), with bytes, a rate and an ETA.
    assert "\x1b[" in text and "━" in text
    assert "/8.0 MiB" in text and "MiB/s" in text and "0:00:0" in text
    assert "running" in text and "concluded" in text
    assert "✔ job j0 completed: 8 MiB streamed in" in text


def test_ctrl_c_cancels_the_job(lab: Lab) -> None:
    lab.require(*STREAM, "block-job-cancel")
    add_chain(lab)
    term = Terminal("-s", str(lab.socket), "stream", "top", "--job-id", "j0", "--speed", "256K")
    assert term.read_until(b"running"), term.text()
    os.write(term.fd, b"\x03")  # Ctrl-C typed at the terminal: SIGINT to blockctl
    assert term.wait() == 130, term.text()
    text = term.text()
    assert "interrupted: cancelling job j0" in text
    assert "✘ job j0 was cancelled at " in text
    assert lab.ctl("jobs").stdout == "no jobs\n"  # blockctl collected it
