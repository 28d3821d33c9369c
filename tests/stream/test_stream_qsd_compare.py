"""block-stream side by side with a real qemu-storage-daemon on identical chains.

Runs only when a qemu-storage-daemon binary is present (QEMU 10.0 under /work/qsd10, or
one on ``PATH``). Each scenario runs once under QEMU and once under blockd, each on its
own fresh copy of the chain, through qemu.qmp's client; the event sequences (with their
data), the refusals' texts, ``query-named-block-nodes`` and the resulting image header
must be the same (paths normalised).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol
from reference import QSD_10 as QSD
from streamtools import tool

pytestmark = pytest.mark.skipif(QSD is None, reason="QEMU 10.0 qemu-storage-daemon missing")
BLOCKD = [sys.executable, "-m", "blockd"]
TIMEOUT = 30


def make_chain(d: Path) -> None:
    """base.raw (2 MiB of data) <- mid.qcow2 (64 KiB at 64K) <- top.qcow2."""
    tool("qemu-img", "create", "-q", "-f", "raw", d / "base.raw", "2M")
    tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 2M", d / "base.raw")
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         d / "mid.qcow2")  # fmt: skip
    tool("qemu-io", "-f", "qcow2", "-c", "write -P 2 64k 64k", d / "mid.qcow2")
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
         d / "top.qcow2")  # fmt: skip


def blockdevs(d: Path, errno_: int | None) -> list[dict[str, Any]]:
    base: dict[str, Any] = {"driver": "file", "node-name": "base", "filename": str(d / "base.raw")}
    if errno_ is not None:  # iotest 030's rules: fail the read covering 512 KiB, once
        base = {"driver": "raw", "node-name": "base", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": str(d / "base.raw")},
            "inject-error": [{"event": "read_aio", "errno": errno_, "sector": 1024,
                              "state": 1, "once": True}],
            "set-state": [{"event": "read_aio", "state": 1, "new_state": 2},
                          {"event": "read_aio", "state": 2, "new_state": 1}]}}  # fmt: skip
    return [
        base,
        {"driver": "qcow2", "node-name": "mid", "backing": "base",
         "file": {"driver": "file", "filename": str(d / "mid.qcow2")}},
        {"driver": "qcow2", "node-name": "top", "backing": "mid",
         "file": {"driver": "file", "filename": str(d / "top.qcow2")}},
    ]  # fmt: skip


def scenario(cmd: list[str], d: Path, sock_dir: Path, stream: dict[str, Any],
             errno_: int | None, during: Sequence[tuple[str, dict[str, Any]]] = ()
             ) -> dict[str, Any]:  # fmt: skip
    """Run one stream under the daemon ``cmd`` (``during``: commands sent right after
    it started); what a client and qemu-img then see."""
    d.mkdir()
    make_chain(d)
    sock = sock_dir / f"{d.name}.sock"
    args = [a for b in blockdevs(d, errno_) for a in ("--blockdev", json.dumps(b))]
    proc = subprocess.Popen(
        [*cmd, *args, "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
         "--monitor", "chardev=m0"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[Any] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        refusals = [
            qmp.cmd_raw("block-stream", {"device": "top", "job-id": "x", "base-node": "top"}),
            qmp.cmd_raw("block-stream", {"device": "mid", "job-id": "x", "bottom": "top"}),
            qmp.cmd_raw("block-stream", {"device": "top", "job-id": "x", "base": "nope"}),
            qmp.cmd_raw("block-stream", {"device": "top", "job-id": "x", "backing-file": "y"}),
        ]
        seen.append(qmp.cmd_raw("block-stream", {"device": "top", "job-id": "j", **stream}))
        for name, arguments in during:
            # (only commands whose answers do not depend on how far the job got)
            seen.append([name, qmp.cmd_raw(name, arguments)])
        while True:
            event = qmp.pull_event(wait=TIMEOUT)
            assert event is not None
            data = event.get("data", {})
            seen.append([event["event"], data])
            if data.get("status") == "paused":
                [job] = qmp.cmd_raw("query-block-jobs")["return"]
                seen.append({k: job[k] for k in ("offset", "len", "io-status", "paused")})
                qmp.cmd_raw("block-job-resume", {"device": "j"})
            if event["event"] == "BLOCK_JOB_PENDING":
                seen.append(["job-finalize", qmp.cmd_raw("job-finalize", {"id": "j"})])
            if data.get("status") == "concluded" and stream.get("auto-dismiss") is False:
                seen.append(["query-jobs", qmp.cmd_raw("query-jobs")])
                seen.append(["job-dismiss", qmp.cmd_raw("job-dismiss", {"id": "j"})])
            if data.get("status") == "null":
                break
        nodes = qmp.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
        top = next(n for n in nodes if n["node-name"] == "top")
        seen.append({"backing_file": top.get("backing_file")})
        assert qmp.cmd_raw("quit") == {"return": {}}
        with contextlib.suppress(EOFError):
            qmp.close()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loop = asyncio.get_event_loop()
        loop.close()
        asyncio.set_event_loop(None)
    info = json.loads(tool("qemu-img", "info", "--output=json", d / "top.qcow2").stdout)
    header = (info.get("backing-filename"), info.get("backing-filename-format"))
    text = json.dumps({"refusals": refusals, "seen": seen, "header": header})
    return dict(json.loads(text.replace(str(d), "<dir>")))


@pytest.mark.parametrize(
    ("stream", "errno_"),
    [
        ({"base-node": "base", "backing-mask-protocol": True}, None),
        ({"base-node": "base", "backing-mask-protocol": False}, None),
        ({"on-error": "report"}, 5),
        ({"on-error": "enospc"}, 28),
    ],
    ids=["mask-protocol", "no-mask", "eio-report", "enospc-stop"],
)
def test_same_as_qemu(
    tmp_path: Path, sock_dir: Path, stream: dict[str, Any], errno_: int | None
) -> None:
    assert QSD is not None
    qemu = scenario([QSD], tmp_path / "qemu", sock_dir, stream, errno_)
    ours = scenario(BLOCKD, tmp_path / "blockd", sock_dir, stream, errno_)
    for key in ("refusals", "header"):
        assert ours[key] == qemu[key], key
    # Events (all but timestamps, in order) and the final query; json: filenames are
    # compared as flattened option sets (QEMU writes dotted keys in hash order).
    assert normalize(ours["seen"]) == normalize(qemu["seen"])


BUSY_CHECKS = [
    ("block-stream", {"device": "mid", "job-id": "x"}),
    ("block-stream", {"device": "top", "job-id": "y", "base-node": "mid"}),
    ("block-stream", {"device": "sf", "job-id": "z"}),
    ("blockdev-del", {"node-name": "mid"}),
    ("blockdev-del", {"node-name": "base"}),
    ("block-stream", {"device": "top", "job-id": "j"}),
    ("block-job-set-speed", {"device": "j", "speed": -1}),
    ("block-job-set-speed", {"device": "j", "speed": 0}),
]


def test_busy_nodes_same_as_qemu(tmp_path: Path, sock_dir: Path) -> None:
    """A throttled stream holds its nodes: the same refusals as QEMU, then it finishes."""
    assert QSD is not None
    stream = {"base-node": "base", "filter-node-name": "sf", "speed": 1024}
    qemu = scenario([QSD], tmp_path / "qemu", sock_dir, stream, None, BUSY_CHECKS)
    ours = scenario(BLOCKD, tmp_path / "blockd", sock_dir, stream, None, BUSY_CHECKS)
    assert normalize(ours) == normalize(qemu)


def test_manual_finalize_same_as_qemu(tmp_path: Path, sock_dir: Path) -> None:
    assert QSD is not None
    stream = {"auto-finalize": False, "auto-dismiss": False, "speed": 1024}
    during = [("block-job-set-speed", {"device": "j", "speed": 0})]
    qemu = scenario([QSD], tmp_path / "qemu", sock_dir, stream, None, during)
    ours = scenario(BLOCKD, tmp_path / "blockd", sock_dir, stream, None, during)
    assert normalize(ours) == normalize(qemu)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = list(value.items())
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def normalize(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return {"json": flatten(json.loads(value[5:]))}
    if isinstance(value, dict):
        return {key: normalize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalize(item) for item in value]
    return value
