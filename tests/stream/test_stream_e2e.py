"""block-stream end to end: a blockd process, a real QMP client (qemu.qmp) over its UNIX
socket, real qcow2 chains, and qemu-img as the judge."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from streamtools import KIB, MIB, check, compare, create, info, own_data, snapshot, write

TIMEOUT = 30


def close_legacy_loop() -> None:
    """Close the thread's default asyncio loop that qemu.qmp's legacy client made, so it
    is not garbage collected unclosed during some later test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loop = asyncio.get_event_loop()
    if not loop.is_running():
        loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def blockd(sock_dir: Path, tmp_path: Path) -> Iterator[tuple[QEMUMonitorProtocol, Path]]:
    """A daemon with the chain base <- mid <- top opened as node ``top``; a connected
    qemu.qmp client."""
    base = create(tmp_path / "base.qcow2", 4 * MIB)
    write(base, 0, 1 * MIB, 0x11)
    mid = create(tmp_path / "mid.qcow2", None, base)
    write(mid, 1 * MIB, 1 * MIB, 0x22)
    top = create(tmp_path / "top.qcow2", None, mid)
    write(top, 3 * MIB, 64 * KIB, 0x33)
    sock = sock_dir / "qmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockd",
         "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
         "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
         "--monitor", "chardev=m0,mode=control",
         "--pidfile", str(sock_dir / "pid")],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (sock_dir / "pid").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        try:
            yield qmp, top
        finally:
            assert qmp.cmd_obj({"execute": "quit"}) == {"return": {}}
            with contextlib.suppress(EOFError):  # qemu.qmp re-raises the server's EOF
                qmp.close()
            close_legacy_loop()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def events_until(qmp: QEMUMonitorProtocol, name: str, status: str | None = None) -> list[Any]:
    seen: list[Any] = []
    while True:
        event = qmp.pull_event(wait=TIMEOUT)
        assert event is not None
        seen.append(event)
        data = event.get("data", {})
        if event["event"] == name and (status is None or data.get("status") == status):
            return seen


def names(events: list[Any]) -> list[str]:
    return [
        f"JSC({e['data']['status']})" if e["event"] == "JOB_STATUS_CHANGE" else e["event"]
        for e in events
    ]


def test_stream_over_the_socket(blockd: tuple[QEMUMonitorProtocol, Path], tmp_path: Path) -> None:
    qmp, top = blockd
    before = snapshot(top, tmp_path / "before.qcow2")
    mid = tmp_path / "mid.qcow2"
    base = tmp_path / "base.qcow2"
    assert qmp.cmd_raw("block-stream", {"device": "top", "base": str(base)}) == {"return": {}}
    seen = events_until(qmp, "JOB_STATUS_CHANGE", "null")
    assert names(seen) == [
        "JSC(created)",
        "JSC(running)",
        "JSC(waiting)",
        "JSC(pending)",
        "BLOCK_JOB_COMPLETED",
        "JSC(concluded)",
        "JSC(null)",
    ]
    completed = seen[4]["data"]
    assert completed == {
        "type": "stream",
        "device": "top",
        "len": 4 * MIB,
        "offset": 4 * MIB,
        "speed": 0,
    }
    assert qmp.cmd_raw("query-block-jobs") == {"return": []}
    nodes = qmp.cmd_raw("query-named-block-nodes")["return"]
    assert [n["backing_file"] for n in nodes if n["node-name"] == "top"] == [str(base)]
    assert qmp.cmd_raw("blockdev-del", {"node-name": "top"}) == {"return": {}}
    compare(top, before)
    check(top)
    assert info(top)["backing-filename"] == str(base)
    assert own_data(top) == [*own_data(mid), (3 * MIB, 64 * KIB)]


def test_errors_and_manual_finalize_over_the_socket(
    blockd: tuple[QEMUMonitorProtocol, Path], tmp_path: Path
) -> None:
    qmp, top = blockd
    reply = qmp.cmd_raw("block-stream", {"device": "nonexistent"})
    assert reply["error"] == {
        "class": "GenericError",
        "desc": "Cannot find device='nonexistent' nor node-name='nonexistent'",
    }
    reply = qmp.cmd_raw("block-stream", {"device": "top", "job-id": "j", "speed": -1})
    assert reply["error"]["desc"] == "Parameter 'speed' expects a non-negative value"
    # created and null went out before the error reply.
    assert names(qmp.get_events()) == ["JSC(created)", "JSC(null)"]
    qmp.clear_events()
    args = {"device": "top", "job-id": "j", "auto-finalize": False, "auto-dismiss": False}
    assert qmp.cmd_raw("block-stream", args) == {"return": {}}
    seen = events_until(qmp, "BLOCK_JOB_PENDING")
    assert names(seen) == [
        "JSC(created)",
        "JSC(running)",
        "JSC(waiting)",
        "JSC(pending)",
        "BLOCK_JOB_PENDING",
    ]
    assert qmp.cmd_raw("job-finalize", {"id": "j"}) == {"return": {}}
    assert names(qmp.get_events()) == ["BLOCK_JOB_COMPLETED", "JSC(concluded)"]
    qmp.clear_events()
    [job] = qmp.cmd_raw("query-jobs")["return"]
    assert job["status"] == "concluded" and "error" not in job
    assert qmp.cmd_raw("job-dismiss", {"id": "j"}) == {"return": {}}
    assert names(qmp.get_events()) == ["JSC(null)"]
    assert qmp.cmd_raw("blockdev-del", {"node-name": "top"}) == {"return": {}}
    check(top)
    assert "backing-filename" not in info(top)


def test_job_survives_client_disconnect(
    blockd: tuple[QEMUMonitorProtocol, Path], tmp_path: Path, sock_dir: Path
) -> None:
    qmp, top = blockd
    before = snapshot(top, tmp_path / "before.qcow2")
    other = QEMUMonitorProtocol(str(sock_dir / "qmp"))
    other.connect(negotiate=True)
    args = {"device": "top", "job-id": "j", "speed": 1024}
    assert other.cmd_raw("block-stream", args) == {"return": {}}
    with contextlib.suppress(EOFError):
        other.close()
    [job] = qmp.cmd_raw("query-jobs")["return"]
    assert job["id"] == "j" and job["status"] in ("running", "paused")
    assert qmp.cmd_raw("block-job-set-speed", {"device": "j", "speed": 0}) == {"return": {}}
    seen = events_until(qmp, "JOB_STATUS_CHANGE", "null")
    completed = [e["data"] for e in seen if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[0]
    assert qmp.cmd_raw("blockdev-del", {"node-name": "top"}) == {"return": {}}
    compare(top, before)
    check(top)
    assert "backing-filename" not in info(top)
