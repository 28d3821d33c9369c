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

import os
import signal
import time
from pathlib import Path

import pytest
from kit.chains import base_and_top
from kit.cli import BLOCKD
from kit.daemons import daemon
from kit.qmp import SyncClient

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


@pytest.mark.parametrize("stop", ["quit", "SIGTERM"])
def test_a_hung_flush_does_not_hang_shutdown(sock_dir: Path, tmp_path: Path, stop: str) -> None:
    _base, top = base_and_top(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trigger = tmp_path / "hang-now"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    env["BLOCKD_TEST_HANG_FLUSH"] = str(trigger)
    env["BLOCKD_SHUTDOWN_SECONDS"] = str(BOUND)
    sock, pid = sock_dir / "s", sock_dir / "pid"
    argv = [
        *BLOCKD,
        "--blockdev", f"driver=file,node-name=top-file,filename={top}",
        "--blockdev", '{"driver": "qcow2", "node-name": "top", "file": "top-file"}',
        "--socket", str(sock),
        "--pidfile", str(pid),
    ]  # fmt: skip
    with daemon(argv, ready=pid, env=env) as proc:
        deadline = time.monotonic() + TIMEOUT
        qmp = SyncClient(sock, timeout=TIMEOUT)
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
    assert status == 1, stderr
    assert BOUND <= elapsed < BOUND + 10
    assert f"blockd: shutdown did not finish within {BOUND:g}s (node '" in stderr
    assert "is still being flushed; storage not responding): exiting now" in stderr
    assert not sock.exists() and not pid.exists()
