"""block-stream on real qcow2 chains (iotest 030 TestSingleDrive and friends)."""

from __future__ import annotations

from pathlib import Path

from streamtools import KIB, MIB, Harness, check, compare, create, info, snapshot, write


def chain3(tmp: Path) -> tuple[Path, Path, Path]:
    """base.qcow2 (data at 0) <- mid.qcow2 (data at 512K) <- top.qcow2 (data at 1.5M)."""
    base = create(tmp / "base.qcow2", 2 * MIB)
    write(base, 0, 512 * KIB, 0x11)
    write(base, 1024 * KIB, 256 * KIB, 0x12)
    mid = create(tmp / "mid.qcow2", None, base)
    write(mid, 512 * KIB, 512 * KIB, 0x22)
    top = create(tmp / "top.qcow2", None, mid)
    write(top, 1536 * KIB, 64 * KIB, 0x33)
    return base, mid, top


async def add_top(h: Harness, top: Path, name: str = "top") -> None:
    await h.raw(
        "blockdev-add",
        {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": str(top)}},
    )


async def test_full_stream(harness: Harness, tmp_path: Path) -> None:
    _base, _mid, top = chain3(tmp_path)
    before = snapshot(top, tmp_path / "before.qcow2")
    await add_top(harness, top)
    assert await harness.cmd("block-stream", device="top", job_id="job0") == {}
    done = await harness.wait_done("job0")
    assert done["event"] == "BLOCK_JOB_COMPLETED" and "error" not in done
    assert done["offset"] == done["len"] == 2 * MIB
    assert harness.names() == [
        "JSC(created)",
        "JSC(running)",
        "JSC(waiting)",
        "JSC(pending)",
        "BLOCK_JOB_COMPLETED",
        "JSC(concluded)",
        "JSC(null)",
    ]
    await harness.cmd("blockdev-del", node_name="top")
    compare(top, before)
    check(top)
    assert "backing-filename" not in info(top)
