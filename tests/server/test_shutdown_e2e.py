"""End to end: a real ``python -m blockd`` whose image flush hangs still exits.

There is no FUSE here and blkdebug has no "never answer" rule (QEMU's has none either),
so the hang is made in the daemon process itself: a ``sitecustomize`` module on its
``PYTHONPATH`` replaces ``os.fdatasync``/``os.fsync`` with calls that block forever once
a trigger file exists, as a thread in ``fdatasync`` on dead storage does. Such a thread
cannot be cancelled, so this is what the shutdown watchdog (``blockd/run.py``) is for:
the daemon must still end, within the bound, with an error naming the node on stderr and
exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BLOCKD = [sys.executable, "-m", "blockd"]
TIMEOUT = 30.0
#: the daemon's shutdown bound in these tests (``BLOCKD_SHUTDOWN_SECONDS``)
BOUND = 2.0

SITECUSTOMIZE = """\
import os, threading
_trigger = os.environ.get("BLOCKD_TEST_HANG_FLUSH")
if _trigger:
    def _hanging(real):
        def call(fd):
            if os.path.exists(_trigger):
                threading.Event().wait()  # storage that never answers
            return real(fd)
        return call
    os.fdatasync = _hanging(os.fdatasync)
    os.fsync = _hanging(os.fsync)
"""


class QMP:
    """A blocking line-based QMP client."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.file.readline()  # greeting
        self.execute("qmp_capabilities")

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments or {}}).encode())

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.send(command, arguments)
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                assert "return" in reply, reply
                return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)


def _chain(directory: Path) -> Path:
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    _run("qemu-io", "-c", "write -P 0x5a 0 64M", str(base))
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    return top


@pytest.mark.parametrize("stop", ["quit", "SIGTERM"])
def test_a_hung_flush_does_not_hang_shutdown(sock_dir: Path, tmp_path: Path, stop: str) -> None:
    top = _chain(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trigger = tmp_path / "hang-now"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    env["BLOCKD_TEST_HANG_FLUSH"] = str(trigger)
    env["BLOCKD_SHUTDOWN_SECONDS"] = str(BOUND)
    sock, pid = sock_dir / "s", sock_dir / "pid"
    proc = subprocess.Popen(
        [
            *BLOCKD,
            "--blockdev", f"driver=file,node-name=top-file,filename={top}",
            "--blockdev", '{"driver": "qcow2", "node-name": "top", "file": "top-file"}',
            "--socket", str(sock),
            "--pidfile", str(pid),
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not pid.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no pidfile"
            time.sleep(0.01)
        qmp = QMP(sock)
        args = {"job-id": "j0", "device": "top", "speed": 1 << 20}  # 64 s at this speed
        assert qmp.execute("block-stream", args) == {}
        while qmp.execute("query-jobs")[0]["current-progress"] == 0:  # data was written
            assert time.monotonic() < deadline, "the stream does not progress"
            time.sleep(0.05)
        trigger.touch()  # from now on every flush hangs
        start = time.monotonic()
        if stop == "quit":
            qmp.send("quit")
        else:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=BOUND + 10)
        elapsed = time.monotonic() - start
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        qmp.close()
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert status == 1, stderr
    assert BOUND <= elapsed < BOUND + 10
    assert f"blockd: shutdown did not finish within {BOUND:g}s (node '" in stderr
    assert "is still being flushed; storage not responding): exiting now" in stderr
    assert not sock.exists() and not pid.exists()
