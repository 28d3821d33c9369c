"""I/O errors during a stream, injected with blkdebug (iotest 030 TestEIO, TestENOSPC).

The backing file is a raw image read through a blkdebug node whose rules fail the read
covering 512 KiB exactly once (state 1 <-> 2 flipped by every read_aio), as 030 does.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from kit.chains import BLKDEBUG_030_CONF, blkdebug_030, file_ref, qcow2
from kit.daemons import Harness
from kit.qemu import KIB, MIB, check, compare, create, image_info, snapshot, write

LEN = 2 * MIB


def blkdebug_backing(path: Path, code: int) -> dict[str, Any]:
    dbg = {"driver": "blkdebug", "image": file_ref(path), **blkdebug_030(code, immediately=False)}
    return {"driver": "raw", "file": dbg}


async def setup(h: Harness, tmp: Path, code: int = errno.EIO) -> tuple[Path, Path]:
    backing = create(tmp / "backing.img", LEN, fmt="raw")
    write(backing, 0, LEN, 0x5A, fmt="raw")
    top = create(tmp / "test.qcow2", None, backing, "raw")
    write(top, 1536 * KIB, 64 * KIB, 0x01)
    before = snapshot(top, tmp / "before.qcow2")
    # the backing node first, then referenced: QEMU refuses it inline under an image
    # whose header names a backing file (the header name collides with image.filename)
    await h.raw("blockdev-add", {"node-name": "bk", **blkdebug_backing(backing, code)})
    await h.add(qcow2(top, "drive0", backing="bk"))
    return top, before


async def test_report(harness: Harness, tmp_path: Path) -> None:
    top, before = await setup(harness, tmp_path)
    await harness.cmd("block-stream", device="drive0")
    done = await harness.wait_done("drive0")
    assert done["event"] == "BLOCK_JOB_COMPLETED"
    assert done["error"] == "Input/output error"
    assert (done["offset"], done["len"]) == (512 * KIB, LEN)
    assert harness.last("BLOCK_JOB_ERROR") == {
        "device": "drive0",
        "operation": "read",
        "action": "report",
    }
    assert harness.names() == [
        "JSC(created)",
        "JSC(running)",
        "BLOCK_JOB_ERROR",
        "JSC(aborting)",
        "BLOCK_JOB_COMPLETED",
        "JSC(concluded)",
        "JSC(null)",
    ]
    await harness.cmd("blockdev-del", node_name="drive0")
    check(top)
    assert image_info(top)["backing-filename"].endswith("backing.img")  # chain untouched
    compare(top, before)


@pytest.mark.parametrize("policy", ["enospc", "auto"])
async def test_enospc_policy_with_eio_reports(
    harness: Harness, tmp_path: Path, policy: str
) -> None:
    top, before = await setup(harness, tmp_path)
    await harness.cmd("block-stream", device="drive0", on_error=policy)
    done = await harness.wait_done("drive0")
    assert done["error"] == "Input/output error" and done["offset"] == 512 * KIB
    assert harness.last("BLOCK_JOB_ERROR")["action"] == "report"
    await harness.cmd("blockdev-del", node_name="drive0")
    compare(top, before)


async def test_ignore(harness: Harness, tmp_path: Path) -> None:
    top, before = await setup(harness, tmp_path)
    await harness.cmd("block-stream", device="drive0", on_error="ignore")
    done = await harness.wait_done("drive0")
    assert done["event"] == "BLOCK_JOB_COMPLETED"
    assert done["error"] == "Input/output error"
    assert done["offset"] == done["len"] == LEN
    assert harness.last("BLOCK_JOB_ERROR")["action"] == "ignore"
    assert "JSC(waiting)" not in harness.names()  # failed: prepare never ran
    await harness.cmd("blockdev-del", node_name="drive0")
    check(top)
    assert image_info(top)["backing-filename"].endswith("backing.img")  # backing kept
    compare(top, before)


@pytest.mark.parametrize(
    ("code", "policy", "io_status"),
    [
        (errno.EIO, "stop", "failed"),
        (errno.ENOSPC, "enospc", "nospace"),
        (errno.ENOSPC, "stop", "nospace"),
    ],
)
async def test_stop_and_resume(
    harness: Harness, tmp_path: Path, code: int, policy: str, io_status: str
) -> None:
    top, before = await setup(harness, tmp_path, code)
    h = harness
    await h.cmd("block-stream", device="drive0", on_error=policy)
    await h.wait_event("JOB_STATUS_CHANGE", status="paused")
    assert h.last("BLOCK_JOB_ERROR")["action"] == "stop"
    [job] = await h.cmd("query-block-jobs")
    assert (job["status"], job["paused"], job["busy"]) == ("paused", True, False)
    assert job["offset"] == 512 * KIB and job["io-status"] == io_status
    assert await h.error("block-job-cancel", device="drive0") == (
        "The block job for device 'drive0' is currently paused"
    )
    start = len(h.events)
    await h.cmd("block-job-resume", device="drive0")
    assert h.names(start=start)[0] == "JSC(running)"
    [job] = await h.cmd("query-block-jobs") or [{"io-status": "ok"}]
    assert job["io-status"] == "ok"
    done = await h.wait_done("drive0")
    assert done["event"] == "BLOCK_JOB_COMPLETED" and "error" not in done
    assert done["offset"] == done["len"] == LEN
    await h.cmd("blockdev-del", node_name="drive0")
    check(top)
    assert "backing-filename" not in image_info(top)
    compare(top, before)


async def test_blkdebug_fails_a_plain_read(harness: Harness, tmp_path: Path) -> None:
    """The driver under raw: the rule fires at its offset, once, with its errno."""
    path = create(tmp_path / "disk.raw", 1 * MIB, fmt="raw")
    await harness.raw(
        "blockdev-add",
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "align": 4096,
            "image": {"driver": "file", "filename": str(path)},
            "inject-error": [
                {
                    "event": "read_aio",
                    "errno": errno.ENOSPC,
                    "sector": 8,
                    "once": True,
                    "immediately": True,
                }
            ],
        },
    )
    dbg = harness.d.graph.find("dbg")
    assert dbg is not None and dbg.driver.request_alignment == 4096
    # events come from a format driver above (raw fires read_aio), as in QEMU
    await harness.raw("blockdev-add", {"driver": "raw", "node-name": "fmt", "file": "dbg"})
    node = harness.d.graph.find("fmt")
    assert node is not None
    assert await node.pread(0, 4096) == bytes(4096)  # does not cover sector 8
    with pytest.raises(OSError) as failure:
        await node.pread(0, 8192)
    assert failure.value.errno == errno.ENOSPC
    assert await node.pread(0, 8192) == bytes(8192)  # once: gone
    nodes = {n["node-name"]: n for n in await harness.cmd("query-named-block-nodes")}
    assert nodes["dbg"]["drv"] == "blkdebug"


async def test_report_with_config_file(harness: Harness, tmp_path: Path) -> None:
    """The same rules from an INI config file, as iotest 030 writes them."""
    config = tmp_path / "blkdebug.conf"
    config.write_text(BLKDEBUG_030_CONF)
    backing = create(tmp_path / "backing.img", LEN, fmt="raw")
    write(backing, 0, LEN, 0x5A, fmt="raw")
    top = create(tmp_path / "test.qcow2", None, backing, "raw")
    h = harness
    assert await h.error("blockdev-add", driver="blkdebug", node_name="bad",
                         config=str(tmp_path / "missing.conf"),
                         image={"driver": "file", "filename": str(backing)}) == (
        "Could not read blkdebug config file: No such file or directory"
    )  # fmt: skip
    await h.raw("blockdev-add", {
        "driver": "raw", "node-name": "bk", "file": {
            "driver": "blkdebug", "config": str(config),
            "image": {"driver": "file", "filename": str(backing)}}})  # fmt: skip
    await h.add(qcow2(top, "drive0", backing="bk"))  # fmt: skip
    await h.cmd("block-stream", device="drive0")
    done = await h.wait_done("drive0")
    assert done["error"] == "Input/output error"
    assert (done["offset"], done["len"]) == (512 * KIB, LEN)
    await h.cmd("blockdev-del", node_name="drive0")
    check(top)
