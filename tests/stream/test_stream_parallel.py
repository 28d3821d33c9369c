"""Concurrent streams on one chain (iotest 030 TestParallelOps), cancel and speed."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit.chains import qcow2, raw
from kit.daemons import Harness
from kit.qemu import KIB, MIB, check, compare, create, image_info, own_data, snapshot, write

SIZE = 4 * MIB
BUSY = "is busy: block device is in use by block job: stream"


@pytest.fixture
async def chain9(harness: Harness, tmp_path: Path) -> tuple[Harness, list[Path]]:
    """img0 (raw) <- img1 ... <- img8 (qcow2), nodes node0..node8 added by name; the odd
    images carry 512 KiB of data each at distinct offsets."""
    paths = [create(tmp_path / "img0.raw", SIZE, fmt="raw")]
    write(paths[0], 0, SIZE, 0x40, fmt="raw")
    for index in range(1, 9):
        fmt = "raw" if index == 1 else "qcow2"
        path = create(tmp_path / f"img{index}.qcow2", None, paths[-1], fmt)
        if index % 2:
            write(path, (index // 2) * 1024 * KIB, 512 * KIB, 0x40 + index)
        paths.append(path)
    await harness.add(raw(paths[0], "node0"))
    for index in range(1, 9):
        await harness.add(qcow2(paths[index], f"node{index}", backing=f"node{index - 1}"))
    return harness, paths


async def delete_all(h: Harness) -> None:
    for node in sorted(
        (n for n in h.d.graph.nodes.values() if n.monitor_owned),
        key=lambda n: n.name,
        reverse=True,
    ):
        await h.cmd("blockdev-del", node_name=node.name)


async def test_stream_parallel(chain9: tuple[Harness, list[Path]], tmp_path: Path) -> None:
    h, paths = chain9
    before = snapshot(paths[8], tmp_path / "before.qcow2")
    expected = {i: own_data(paths[i - 1]) for i in (2, 4, 6, 8)}
    for index in (2, 4, 6, 8):
        await h.cmd(
            "block-stream",
            device=f"node{index}",
            job_id=f"stream-node{index}",
            bottom=f"node{index - 1}",
            speed=1024,
        )
    assert len(await h.cmd("query-block-jobs")) == 4
    for index in (8, 6, 4, 2):
        await h.cmd("block-job-set-speed", device=f"stream-node{index}", speed=0)
    for index in (2, 4, 6, 8):
        done = await h.wait_done(f"stream-node{index}")
        assert "error" not in done and done["offset"] == done["len"] == SIZE
    await delete_all(h)
    compare(paths[8], before)
    for index in (2, 4, 6, 8):
        check(paths[index])
        # Each image now also stores the data of the image that was below it.
        assert own_data(paths[index]) == expected[index]
        assert image_info(paths[index])["backing-filename"] == str(paths[index - 2])


async def test_overlapping_streams_are_refused(
    chain9: tuple[Harness, list[Path]], tmp_path: Path
) -> None:
    """test_overlapping_1."""
    h, paths = chain9
    before = snapshot(paths[8], tmp_path / "before.qcow2")
    await h.cmd(
        "block-stream",
        device="node4",
        job_id="stream-node4",
        base=str(paths[1]),
        filter_node_name="stream-filter",
        speed=1024,
    )
    assert await h.error("block-stream", device="node5", job_id="s5", base=str(paths[2])) == (
        f"Node 'stream-filter' {BUSY}"
    )
    assert await h.error("block-stream", device="node3", job_id="s3", base=str(paths[2])) == (
        f"Node 'node3' {BUSY}"
    )
    assert await h.error("block-stream", device="node4", job_id="s4v2") == f"Node 'node4' {BUSY}"
    assert await h.error("blockdev-del", node_name="node2") == f"Node 'node2' {BUSY}"
    # The base is not held: a stream further down may use it as its top.
    await h.cmd("block-stream", device="node1", job_id="s1")
    await h.wait_done("s1")
    assert (
        await h.error("block-stream", device="node4", job_id="stream-node4")
        == f"Node 'node4' {BUSY}"
    )
    await h.cmd("block-job-set-speed", device="stream-node4", speed=0)
    done = await h.wait_done("stream-node4")
    assert "error" not in done
    await delete_all(h)
    compare(paths[8], before)
    assert image_info(paths[4])["backing-filename"] == str(paths[1])


async def test_cancel_keeps_chain(chain9: tuple[Harness, list[Path]], tmp_path: Path) -> None:
    h, paths = chain9
    before = snapshot(paths[8], tmp_path / "before.qcow2")
    await h.cmd("block-stream", device="node8", job_id="j", speed=1024)
    await h.wait_progress("j")
    start = len(h.events)
    await h.cmd("block-job-cancel", device="j")
    done = await h.wait_done("j")
    assert done["event"] == "BLOCK_JOB_CANCELLED"
    assert done["len"] == SIZE and 0 < done["offset"] < SIZE
    assert h.names(start=start) == [
        "JSC(aborting)",
        "BLOCK_JOB_CANCELLED",
        "JSC(concluded)",
        "JSC(null)",
    ]
    await delete_all(h)
    compare(paths[8], before)
    check(paths[8])
    assert image_info(paths[8])["backing-filename"] == str(paths[7])


async def test_set_speed(chain9: tuple[Harness, list[Path]]) -> None:
    """TestSetSpeed: speed shows in queries and events; negative speeds are refused."""
    h, _ = chain9
    await h.cmd("block-stream", device="node8", job_id="j")
    [job] = await h.cmd("query-block-jobs")
    assert job["speed"] == 0
    # The first chunk is never delayed; a tiny speed then keeps the job asleep.
    await h.cmd("block-job-set-speed", device="j", speed=1)
    await h.cmd("block-job-pause", device="j")
    await h.cmd("block-job-set-speed", device="j", speed=8 * MIB)
    [job] = await h.cmd("query-block-jobs")
    assert (job["speed"], job["paused"]) == (8 * MIB, True)
    assert await h.error("block-job-set-speed", device="j", speed=-1) == (
        "Parameter 'speed' expects a non-negative value"
    )
    await h.cmd("block-job-resume", device="j")
    await h.cmd("block-job-set-speed", device="j", speed=0)
    assert (await h.wait_done("j"))["speed"] == 0
    await h.cmd("block-stream", device="node6", job_id="k", speed=4 * MIB)
    [job] = await h.cmd("query-block-jobs")
    assert job["speed"] == 4 * MIB
    done = await h.wait_done("k")
    assert done["speed"] == 4 * MIB and "error" not in done
