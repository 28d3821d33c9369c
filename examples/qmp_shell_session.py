#!/usr/bin/env python3
"""Drive ``qmp-shell -p`` against blockd through a terminal and print the session.

``qmp-shell`` (from the ``qemu.qmp`` package) is QEMU's interactive QMP shell. This script
runs it on a pseudo-terminal, as if a person were typing, so the output is exactly what a
person sees: the banner from the greeting, tab completion filled from ``query-commands``
(``query-block-j<TAB>`` completes to ``query-block-jobs``), pretty-printed replies
(``-p``), an error reply, and queued events printed on an empty line. It streams a
generated chain in between. ``examples/qmp-shell-transcript.txt`` was made with::

    python examples/qmp_shell_session.py --dir /tmp/blockd-shell > examples/qmp-shell-transcript.txt

Run it as-is (it starts ``blockd`` in a temporary directory); ``--daemon
qemu-storage-daemon`` shows the same session with QEMU's daemon.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import sys
import tempfile
import termios
import time
from pathlib import Path

from blockd.client.lab import make_chain, running_daemon

PROMPT = b"(QEMU) "


class PtyShell:
    """``qmp-shell -p SOCKET`` on a pseudo-terminal; :meth:`type` sends one line."""

    def __init__(self, socket: Path, home: Path) -> None:
        beside = Path(sys.executable).with_name("qmp-shell")  # installed with qemu.qmp
        program = str(beside) if beside.exists() else shutil.which("qmp-shell") or "qmp-shell"
        argv = [program, "-p", str(socket)]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: qmp-shell with its history file in `home`
            # A wide terminal, so that readline does not scroll long lines sideways.
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
            os.environ["HOME"] = str(home)
            os.environ["TERM"] = "dumb"
            os.execvp(argv[0], argv)
        self.transcript = bytearray()

    def _read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        data = bytearray()
        while not data.endswith(marker):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"qmp-shell did not print {marker!r}; got {bytes(data)!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the shell has exited
                    break
                if not chunk:
                    break
                data += chunk
        self.transcript += data
        return bytes(data)

    def start(self) -> str:
        return self._read_until(PROMPT).decode()

    def type(self, line: str) -> str:
        """Type ``line`` (``\\t`` is the Tab key) and Enter; return what the shell printed."""
        os.write(self.fd, line.encode() + b"\r")
        return self._read_until(PROMPT).decode()

    def close(self) -> str:
        os.write(self.fd, b"\x04")  # Ctrl-D: EOF ends the shell
        tail = self._read_until(b"\n\n", timeout=5.0)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        if status and os.WIFSIGNALED(status):
            os.kill(self.pid, signal.SIGKILL)
        return tail.decode()

    def text(self) -> str:
        return self.transcript.decode().replace("\r\n", "\n")


def session(socket: Path, top: Path, home: Path) -> str:
    shell = PtyShell(socket, home)
    shell.start()
    shell.type("query-version")
    shell.type("query-block-j\t")
    # qemu.qmp 0.0.6's qmp-shell mis-nests a second dotted key (file.driver=... file.filename=...
    # ends up as file.file.filename), so the child node is given as one JSON value.
    shell.type(
        f'blockdev-add driver=qcow2 node-name=top file={{"driver":"file","filename":"{top}"}}'
    )
    shell.type("block-stream device=nope job-id=j0")
    shell.type("block-stream device=top job-id=j0 speed=1048576 auto-dismiss=false")
    time.sleep(0.2)
    shell.type("query-block-jobs")
    shell.type("block-job-set-speed device=j0 speed=0")
    time.sleep(1.0)  # let the job finish, so the events are queued
    shell.type("")
    shell.type("query-jobs")
    shell.type("")  # the events that arrived while query-jobs ran
    shell.type("job-dismiss id=j0")
    shell.type("blockdev-del node-name=top")
    shell.close()
    return shell.text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--daemon", default="blockd", help="blockd or a qemu-storage-daemon")
    parser.add_argument("--dir", type=Path, help="where to make the images (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockd-shell-") as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for old in work.glob("*.qcow2"):
            old.unlink()
        top = make_chain(work, "8M")[0]
        with running_daemon(work, args.daemon) as daemon:
            print(f"$ qmp-shell -p {daemon.socket}")
            sys.stdout.write(session(daemon.socket, top, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
