"""A scratch lab for examples and tests: a qcow2 chain made by qemu-img and a daemon.

:func:`make_chain` builds ``base ← mid ← top`` with ``qemu-img``/``qemu-io`` so that each
layer holds different data; :func:`running_daemon` starts blockd (or any
qemu-storage-daemon binary, which takes the same options) with one QMP socket and stops it
on exit. Both are synchronous and meant to run before or around an event loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: Seconds a daemon may take to create its socket.
START_TIMEOUT = 15.0


class LabError(RuntimeError):
    """A tool or the daemon failed; the message includes its stderr."""


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def make_chain(directory: Path, size: str = "16M", *, qemu_img: str = "qemu-img") -> list[Path]:
    """Create ``base.qcow2 ← mid.qcow2 ← top.qcow2`` in ``directory``; return them top first.

    ``base`` is filled with byte 0x11 over its whole size, ``mid`` overwrites the second
    quarter with 0x22, and ``top`` overwrites the first cluster with 0x33, so a stream has
    data from every layer to copy and the result is easy to check with ``qemu-img compare``.
    """
    qemu_io = str(Path(qemu_img).with_name("qemu-io")) if os.sep in qemu_img else "qemu-io"
    base, mid, top = (directory / f"{n}.qcow2" for n in ("base", "mid", "top"))
    _run(qemu_img, "create", "-q", "-f", "qcow2", str(base), size)
    _run(qemu_io, "-f", "qcow2", "-c", f"write -P 0x11 0 {size}", str(base))
    _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid))
    virtual = int(json.loads(_run(qemu_img, "info", "--output=json", str(base)))["virtual-size"])
    _run(qemu_io, "-f", "qcow2", "-c", f"write -P 0x22 {virtual // 4} {virtual // 4}", str(mid))
    _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top))
    _run(qemu_io, "-f", "qcow2", "-c", "write -P 0x33 0 64k", str(top))
    return [top, mid, base]


def daemon_argv(program: str | None, socket_path: Path) -> list[str]:
    """The command line that serves QMP on ``socket_path``.

    ``program`` is ``None`` or ``"blockd"`` for this blockd (run with the current Python),
    ``"qemu-storage-daemon"``, or a path to a qemu-storage-daemon binary.
    """
    if program in (None, "blockd"):
        head = [sys.executable, "-P", "-m", "blockd"]  # -P: never a ./blockd folder
    else:
        found = shutil.which(program)
        if found is None:
            raise LabError(f"{program}: not found")
        head = [found]
    return [
        *head,
        "--chardev",
        f"socket,id=mon0,path={socket_path},server=on,wait=off",
        "--monitor",
        "chardev=mon0",
    ]


@dataclass
class DaemonProcess:
    """A daemon started by :func:`running_daemon`; its stderr goes to ``log``."""

    process: subprocess.Popen[bytes]
    socket: Path
    argv: Sequence[str]
    log: Path


def _wait_ready(proc: subprocess.Popen[bytes], path: Path, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log.read_text(errors="replace").strip()
            raise LabError(f"daemon exited with status {proc.returncode}: {err}")
        if path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)
    raise LabError(f"daemon did not open {path} within {timeout:g}s")


@contextmanager
def running_daemon(
    directory: Path, program: str | None = None, *, extra: Sequence[str] = ()
) -> Iterator[DaemonProcess]:
    """Run a daemon serving QMP on ``directory/qmp.sock`` for the duration of the block.

    Raises:
        LabError: the daemon could not be started or did not open its socket.
    """
    path = directory / "qmp.sock"
    log = directory / "daemon.log"
    argv = [*daemon_argv(program, path), *extra]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        _wait_ready(proc, path, log, START_TIMEOUT)
        yield DaemonProcess(proc, path, argv, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query_commands(socket_path: Path, timeout: float = 10.0) -> set[str]:
    """The command names a running daemon lists in ``query-commands`` (blocking)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # the greeting
        for command in ("qmp_capabilities", "query-commands"):
            sock.sendall(json.dumps({"execute": command}).encode() + b"\r\n")
            while True:
                reply = json.loads(reader.readline())
                if "event" not in reply:
                    break
        if "return" not in reply:
            raise LabError(f"query-commands failed: {reply}")
        return {entry["name"] for entry in reply["return"]}


class _SyncQMP:
    """A minimal blocking QMP client for :func:`reset_daemon` (no event loop needed)."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(socket_path))
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())
        self.call("qmp_capabilities")

    def call(self, command: str, **arguments: object) -> dict[str, object]:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            reply: dict[str, object] = json.loads(self.reader.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def reset_daemon(socket_path: Path, timeout: float = 20.0) -> None:
    """Bring a daemon back to its empty state: cancel and dismiss every job, then delete
    every node added with ``blockdev-add``. For tests that share one daemon.

    Raises:
        LabError: jobs did not end or nodes could not be removed within ``timeout``.
    """
    qmp = _SyncQMP(socket_path, timeout)
    try:
        deadline = time.monotonic() + timeout
        while True:
            jobs = qmp.call("query-jobs").get("return") or []
            assert isinstance(jobs, list)
            if not jobs:
                break
            for job in jobs:
                if job["status"] == "concluded":
                    qmp.call("job-dismiss", id=job["id"])
                elif job["status"] not in ("aborting", "null"):
                    qmp.call("job-cancel", id=job["id"])
            if time.monotonic() > deadline:
                raise LabError(f"jobs did not end: {jobs}")
            time.sleep(0.02)
        while True:
            nodes = qmp.call("query-named-block-nodes").get("return") or []
            assert isinstance(nodes, list)
            names = [n["node-name"] for n in nodes if not n["node-name"].startswith("#")]
            deleted = [n for n in names if "return" in qmp.call("blockdev-del", **{"node-name": n})]
            if not deleted:
                break
        if names:
            raise LabError(f"nodes left that cannot be deleted: {names}")
    finally:
        qmp.close()
