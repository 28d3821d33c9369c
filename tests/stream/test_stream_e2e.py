"""block-stream end to end: a blockd process, a real QMP client (qemu.qmp) over its UNIX
socket, real qcow2 chains, and qemu-img as the judge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.chains import Layer, build
from kit.cli import BLOCKD
from kit.daemons import daemon, monitor_args
from kit.qemu import KIB, MIB, assert_streamed, check, image_info, own_data, snapshot
from kit.qmp import COMPLETED_JOB, legacy_client, legacy_events_until, legacy_quit, short_names
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 30


@pytest.fixture
def blockd(sock_dir: Path, tmp_path: Path) -> Iterator[tuple[QEMUMonitorProtocol, Path]]:
    """A daemon with the chain base <- mid <- top opened as node ``top``; a connected
    qemu.qmp client."""
    _base, _mid, top = build(
        tmp_path,
        Layer("base.qcow2", 4 * MIB, ["write -P 0x11 0 1M"]),
        Layer("mid.qcow2", writes=["write -P 0x22 1M 1M"], absolute=True),
        Layer("top.qcow2", writes=["write -P 0x33 3M 64k"], absolute=True),
    )
    sock = sock_dir / "qmp"
    argv = [
        *BLOCKD,
        "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
        *monitor_args(sock, "m0", "mode=control"),
        "--pidfile", str(sock_dir / "pid"),
    ]  # fmt: skip
    with daemon(argv, ready=sock_dir / "pid") as proc:
        with legacy_client(sock) as qmp:
            try:
                yield qmp, top
            finally:
                legacy_quit(qmp)
        assert proc.wait(timeout=TIMEOUT) == 0


def test_stream_over_the_socket(blockd: tuple[QEMUMonitorProtocol, Path], tmp_path: Path) -> None:
    qmp, top = blockd
    before = snapshot(top, tmp_path / "before.qcow2")
    mid = tmp_path / "mid.qcow2"
    base = tmp_path / "base.qcow2"
    assert qmp.cmd_raw("block-stream", {"device": "top", "base": str(base)}) == {"return": {}}
    seen = legacy_events_until(qmp, "JOB_STATUS_CHANGE", "null")
    assert short_names(seen) == COMPLETED_JOB
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
    assert_streamed(top, before, base)
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
    assert short_names(qmp.get_events()) == ["JSC(created)", "JSC(null)"]
    qmp.clear_events()
    args = {"device": "top", "job-id": "j", "auto-finalize": False, "auto-dismiss": False}
    assert qmp.cmd_raw("block-stream", args) == {"return": {}}
    seen = legacy_events_until(qmp, "BLOCK_JOB_PENDING")
    assert short_names(seen) == [
        "JSC(created)",
        "JSC(running)",
        "JSC(waiting)",
        "JSC(pending)",
        "BLOCK_JOB_PENDING",
    ]
    assert qmp.cmd_raw("job-finalize", {"id": "j"}) == {"return": {}}
    assert short_names(qmp.get_events()) == ["BLOCK_JOB_COMPLETED", "JSC(concluded)"]
    qmp.clear_events()
    [job] = qmp.cmd_raw("query-jobs")["return"]
    assert job["status"] == "concluded" and "error" not in job
    assert qmp.cmd_raw("job-dismiss", {"id": "j"}) == {"return": {}}
    assert short_names(qmp.get_events()) == ["JSC(null)"]
    assert qmp.cmd_raw("blockdev-del", {"node-name": "top"}) == {"return": {}}
    check(top)
    assert "backing-filename" not in image_info(top)


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
    seen = legacy_events_until(qmp, "JOB_STATUS_CHANGE", "null")
    completed = [e["data"] for e in seen if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[0]
    assert qmp.cmd_raw("blockdev-del", {"node-name": "top"}) == {"return": {}}
    assert_streamed(top, before, None)
