"""Sync helpers for the job tests that drive a daemon process over a real QMP socket.

``daemon_transcript`` starts a daemon (qemu-storage-daemon or ``python -m blockd``) with
QSD's options on fresh images made by ``qemu-img``/``qemu-io``, runs a script through a
:class:`Monitor` and returns everything the client received, in order.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reference import QEMU10_LIB, QSD, QSD10

BLOCKD = [sys.executable, "-m", "blockd"]

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

    def read_to_eof(self) -> None:
        """Record every event until the daemon closes the connection (after ``quit``)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                message = json.loads(line)
                if "event" in message:
                    self.transcript.append(("event", message["event"], message.get("data")))
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            assert ready, "the daemon did not close the connection"
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not data:
                return
            self.buffer += data

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
        env["LD_LIBRARY_PATH"] = str(QEMU10_LIB)
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
