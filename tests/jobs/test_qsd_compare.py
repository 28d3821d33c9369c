"""The job engine against a real ``qemu-storage-daemon``: same script, same transcript.

Each scenario runs first on QEMU's daemon (10.0 under /work/qsd10, or one on ``PATH``),
then on ``python -m blockd`` with the same options, each on fresh images made by
``qemu-img``/``qemu-io``. The transcript is every event and every recorded reply, in
the order the client received them; polls that wait for a state are not recorded (their
events are). Skipped when no qemu-storage-daemon binary is present.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

QSD10 = Path("/work/qsd10/root/usr/bin/qemu-storage-daemon")
QSD = str(QSD10) if QSD10.exists() else shutil.which("qemu-storage-daemon")
pytestmark = pytest.mark.skipif(QSD is None, reason="no qemu-storage-daemon binary")
TIMEOUT = 10.0
MIB = 1024 * 1024


class Monitor:
    """A minimal QMP client that keeps the transcript."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buffer = b""
        self.transcript: list[Any] = []
        self._next()  # greeting
        self.call("qmp_capabilities", record=False)

    def _next(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            assert ready, "no answer from the daemon"
            data = self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        if "event" in message:
            self.transcript.append(("event", message["event"], message.get("data")))
        return message

    def call(self, name: str, record: bool = True, **arguments: Any) -> Any:
        request = {"execute": name, "arguments": arguments}
        self.sock.sendall(json.dumps(request).encode())
        while "event" in (reply := self._next()):
            pass
        if record:
            self.transcript.append(("reply", name, reply))
        return reply.get("return")

    def wait(self, condition: Callable[[list[dict[str, Any]]], bool]) -> None:
        """Poll ``query-jobs`` (unrecorded) until ``condition`` holds for its answer."""
        deadline = time.monotonic() + TIMEOUT
        while not condition(self.call("query-block-jobs", record=False)):
            assert time.monotonic() < deadline, "timed out waiting for a job state"
            time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


def make_images(where: Path) -> None:
    for name in ("base.qcow2", "top.qcow2"):
        (where / name).unlink(missing_ok=True)
    base, top = where / "base.qcow2", where / "top.qcow2"
    run = [
        ["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"],
        ["qemu-io", "-c", "write -P 1 0 4M", str(base)],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
    ]
    for argv in run:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=30)


def blockdevs(where: Path, inject: dict[str, Any] | None) -> list[str]:
    base_file = {"driver": "file", "node-name": "base-file", "filename": str(where / "base.qcow2")}
    under_base = "base-file"
    out = [json.dumps(base_file)]
    if inject is not None:
        out.append(json.dumps({"driver": "blkdebug", "node-name": "base-dbg",
                               "image": "base-file", "inject-error": [inject]}))  # fmt: skip
        under_base = "base-dbg"
    out += [
        json.dumps({"driver": "qcow2", "node-name": "base", "file": under_base}),
        json.dumps(
            {"driver": "file", "node-name": "top-file", "filename": str(where / "top.qcow2")}
        ),
        json.dumps({"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"}),
    ]
    return [arg for bd in out for arg in ("--blockdev", bd)]


def transcript(
    program: list[str],
    where: Path,
    sock_dir: Path,
    script: Callable[[Monitor], None],
    inject: dict[str, Any] | None = None,
) -> list[Any]:
    make_images(where)
    path = sock_dir / "m.sock"
    path.unlink(missing_ok=True)
    env = dict(os.environ)
    if program[0] == QSD and QSD10.exists():
        env["LD_LIBRARY_PATH"] = "/work/qsd10/root/usr/lib/x86_64-linux-gnu"
    proc = subprocess.Popen(
        [*program, *blockdevs(where, inject), "--chardev",
         f"socket,id=m,path={path},server=on,wait=off", "--monitor", "chardev=m"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)
        monitor = Monitor(path)
        try:
            script(monitor)
        finally:
            monitor.close()
        return monitor.transcript
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
        if proc.stderr:
            proc.stderr.close()


def sleeping_after_first_chunk(jobs: list[dict[str, Any]]) -> bool:
    return bool(jobs) and jobs[0]["offset"] == 512 * 1024 and not jobs[0]["busy"]


def status_is(status: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda jobs: bool(jobs) and jobs[0]["status"] == status


def gone(jobs: list[dict[str, Any]]) -> bool:
    return not jobs


def pause_resume_cancel(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024})
    m.wait(sleeping_after_first_chunk)
    m.call("query-block-jobs")
    m.call("job-complete", id="job0")
    m.call("block-job-pause", device="job0")
    m.call("query-block-jobs")
    m.call("query-jobs")
    m.call("job-pause", id="job0")
    m.call("block-job-set-speed", device="job0", speed=-1)
    m.call("block-job-cancel", device="job0")
    m.call("block-job-resume", device="job0")
    m.call("query-block-jobs")
    m.call("job-resume", id="job0")
    m.call("job-pause", id="job0")
    m.call("job-cancel", id="job0")
    m.call("job-resume", id="job0")
    m.call("block-job-set-speed", device="job0", speed=0)


def cancel_sleeping(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024,
                              "auto-dismiss": False})  # fmt: skip
    m.wait(sleeping_after_first_chunk)
    m.call("block-job-cancel", device="job0")
    m.call("query-jobs")
    m.call("block-job-dismiss", id="job0")


def manual_finalize(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "auto-finalize": False,
                              "auto-dismiss": False})  # fmt: skip
    m.wait(status_is("pending"))
    m.call("query-block-jobs")
    m.call("job-dismiss", id="job0")
    m.call("block-job-pause", device="job0")
    m.call("block-job-finalize", id="job0")
    m.call("query-block-jobs")
    m.call("job-finalize", id="job0")
    m.call("job-dismiss", id="job0")
    m.call("query-jobs")


def cancel_pending(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "auto-finalize": False})
    m.wait(status_is("pending"))
    m.call("job-cancel", id="job0")
    m.call("query-jobs")


def set_speed_wakes(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024})
    m.wait(sleeping_after_first_chunk)
    m.call("block-job-set-speed", device="job0", speed=2048)
    m.call("query-block-jobs")
    m.call("block-job-set-speed", device="job0", speed=0)
    m.wait(gone)


def error_stop_resume(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "on-error": "stop",
                              "auto-dismiss": False})  # fmt: skip
    m.wait(status_is("paused"))
    m.call("query-block-jobs")
    m.call("block-job-cancel", device="job0")
    m.call("block-job-resume", device="job0")
    m.wait(status_is("concluded"))
    m.call("query-block-jobs")


def error_enospc_cancel(m: Monitor) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "on-error": "enospc",
                              "auto-dismiss": False})  # fmt: skip
    m.wait(status_is("paused"))
    m.call("query-block-jobs")
    m.call("job-cancel", id="job0")
    m.call("query-block-jobs")


def error_then_conclude(on_error: str) -> Callable[[Monitor], None]:
    def script(m: Monitor) -> None:
        m.call("block-stream", **{"job-id": "job0", "device": "top", "on-error": on_error,
                                  "auto-dismiss": False})  # fmt: skip
        m.wait(status_is("concluded"))
        m.call("query-block-jobs")
        m.call("query-jobs")
        m.call("job-resume", id="job0")
        m.call("job-dismiss", id="job0")

    return script


def change(m: Monitor) -> None:
    m.call("block-job-change", id="nope", type="stream")
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024,
                              "auto-finalize": False})  # fmt: skip
    m.wait(sleeping_after_first_chunk)
    m.call("block-job-change", id="job0", type="stream")
    m.call("block-job-change", id="job0", type="mirror", **{"copy-mode": "write-blocking"})
    m.call("block-job-set-speed", device="job0", speed=0)
    m.wait(status_is("pending"))
    m.call("block-job-change", id="job0", type="stream")
    m.call("block-job-cancel", device="job0")
    m.call("job-cancel", id="job0")


EIO_ONCE = {"event": "read_aio", "errno": 5, "sector": 2048, "once": True}
EIO = {"event": "read_aio", "errno": 5, "sector": 2048}
ENOSPC = {"event": "read_aio", "errno": 28, "sector": 2048}

SCENARIOS = {
    "pause-resume-cancel": (pause_resume_cancel, None),
    "cancel-sleeping": (cancel_sleeping, None),
    "manual-finalize": (manual_finalize, None),
    "cancel-pending": (cancel_pending, None),
    "set-speed-wakes": (set_speed_wakes, None),
    "block-job-change": (change, None),
    "on-error-stop": (error_stop_resume, EIO_ONCE),
    "on-error-enospc": (error_enospc_cancel, ENOSPC),
    "on-error-ignore": (error_then_conclude("ignore"), EIO),
    "on-error-report": (error_then_conclude("report"), EIO),
    "on-error-auto-eio": (error_then_conclude("auto"), EIO),
}


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_transcript_as_qemu(name: str, where: Path, sock_dir: Path) -> None:
    script, inject = SCENARIOS[name]
    assert QSD is not None
    qemu = transcript([QSD], where, sock_dir, script, inject)
    ours = transcript([sys.executable, "-m", "blockd"], where, sock_dir, script, inject)
    assert len(qemu) > 4
    for number, (mine, theirs) in enumerate(zip(ours, qemu, strict=False)):
        assert mine == theirs, f"step {number}: blockd {mine} != qemu {theirs}"
    assert len(ours) == len(qemu), (ours[len(qemu) :], qemu[len(ours) :])
