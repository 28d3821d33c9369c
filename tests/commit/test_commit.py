"""block-commit on real qcow2 chains, in-process (iotest 040's cases and friends).

Every commit is judged with qemu-img: the guest view of the chain's top is identical to a
copy converted before the job, every image checks clean, the overlay's header names the
expected backing file and format, and the nodes end up in the modes QEMU leaves them in.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
from kit.chains import file_ref
from kit.chains import qcow2 as qcow2_node
from kit.daemons import Harness
from kit.qemu import (
    KIB,
    MIB,
    check,
    compare,
    create,
    image_info,
    own_data,
    qemu_io,
    snapshot,
    write,
)

from blockd.block.drivers.job_filters import MirrorTopDriver

DONE = [
    "JSC(created)",
    "JSC(running)",
    "JSC(waiting)",
    "JSC(pending)",
    "BLOCK_JOB_COMPLETED",
    "JSC(concluded)",
    "JSC(null)",
]


def chain3(tmp: Path) -> tuple[Path, Path, Path]:
    """base.qcow2 (data at 0 and 1M) <- mid.qcow2 (at 512K, a zero cluster at 1M) <-
    top.qcow2 (at 1.5M)."""
    base = create(tmp / "base.qcow2", 2 * MIB)
    write(base, 0, 512 * KIB, 0x11)
    write(base, 1024 * KIB, 256 * KIB, 0x12)
    mid = create(tmp / "mid.qcow2", None, base)
    write(mid, 512 * KIB, 512 * KIB, 0x22)
    qemu_io("-f", "qcow2", "-c", f"write -z {1024 * KIB} {64 * KIB}", mid)
    top = create(tmp / "top.qcow2", None, mid)
    write(top, 1536 * KIB, 64 * KIB, 0x33)
    return base, mid, top


def qcow2(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return qcow2_node(path, name, **extra)


async def add_chain(h: Harness, base: Path, mid: Path, top: Path, **top_extra: Any) -> None:
    await h.raw("blockdev-add", qcow2("base", base, **{"read-only": True}))
    await h.raw("blockdev-add", qcow2("mid", mid, backing="base", **{"read-only": True}))
    await h.raw("blockdev-add", qcow2("top", top, backing="mid", **top_extra))


def node(h: Harness, name: str) -> Any:
    found = h.d.graph.find(name)
    assert found is not None, name
    return found


async def test_non_active_commit_folds_mid_into_base(harness: Harness, tmp_path: Path) -> None:
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await add_chain(harness, base, mid, top)
    await harness.cmd("block-commit", device="top", job_id="j", top_node="mid")
    done = await harness.wait_done("j")
    assert done == {
        "event": "BLOCK_JOB_COMPLETED",
        "device": "j",
        "len": 2 * MIB,
        "offset": 2 * MIB,
        "speed": 0,
        "type": "commit",
    }
    assert harness.names() == DONE
    assert node(harness, "top").backing is node(harness, "base")
    assert node(harness, "base").read_only  # back to read-only
    assert node(harness, "mid").parents == []  # out of the chain, still open
    await harness.cmd("blockdev-del", node_name="mid")
    await harness.cmd("quit")
    await trio.sleep(0)
    compare(top, expected)
    for image in (base, mid, top):
        check(image)
    header = image_info(top)
    assert header["backing-filename"] == str(base)
    assert header["backing-filename-format"] == "qcow2"
    # the zero cluster of mid now shadows base's data in base itself
    assert (1024 * KIB, 64 * KIB) not in own_data(base)


async def test_backing_file_and_mask_protocol(harness: Harness, tmp_path: Path) -> None:
    """A raw base opened as a bare ``file`` node: the header records ``raw`` only with
    backing-mask-protocol (iotest 040's backing-file cases)."""
    base = create(tmp_path / "base.raw", 2 * MIB, fmt="raw")
    write(base, 0, 2 * MIB, 0x11, fmt="raw")
    mid = create(tmp_path / "mid.qcow2", None, base, "raw")
    write(mid, 0, 64 * KIB, 0x22)
    top = create(tmp_path / "top.qcow2", None, mid)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await harness.raw("blockdev-add", file_ref(base, **{"node-name": "base"}))
    await harness.raw("blockdev-add", qcow2("mid", mid, backing="base"))
    await harness.raw("blockdev-add", qcow2("top", top, backing="mid"))
    await harness.cmd(
        "block-commit",
        device="top",
        job_id="j",
        top_node="mid",
        base_node="base",
        backing_file="base.raw",
        backing_mask_protocol=True,
    )
    assert (await harness.wait_done("j"))["event"] == "BLOCK_JOB_COMPLETED"
    await harness.cmd("quit")
    compare(top, expected)
    check(top)
    header = image_info(top)
    assert (header["backing-filename"], header["backing-filename-format"]) == ("base.raw", "raw")


async def test_commit_two_layers_into_base(harness: Harness, tmp_path: Path) -> None:
    """base <- mid1 <- mid2 <- top: top-node mid2, base-node base: both layers fold."""
    base = create(tmp_path / "base.qcow2", 2 * MIB)
    write(base, 0, 2 * MIB, 0x11)
    mid1 = create(tmp_path / "mid1.qcow2", None, base)
    write(mid1, 0, 64 * KIB, 0x21)
    mid2 = create(tmp_path / "mid2.qcow2", None, mid1)
    write(mid2, 32 * KIB, 64 * KIB, 0x22)
    top = create(tmp_path / "top.qcow2", None, mid2)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await harness.raw("blockdev-add", qcow2("base", base))
    await harness.raw("blockdev-add", qcow2("mid1", mid1, backing="base"))
    await harness.raw("blockdev-add", qcow2("mid2", mid2, backing="mid1"))
    await harness.raw("blockdev-add", qcow2("top", top, backing="mid2"))
    busy = "Node 'mid1' is busy: block device is in use by block job: commit"
    await harness.cmd(
        "block-commit", device="top", job_id="j", top_node="mid2", base_node="base", speed=1
    )
    assert await harness.error("blockdev-del", node_name="mid1") == busy
    assert await harness.error("block-stream", device="top", job_id="s") == (
        "Node 'top' is busy: block device is in use by block job: commit"
    )
    assert await harness.error("blockdev-del", node_name="base") == "Node base is in use"
    await harness.cmd("block-job-set-speed", device="j", speed=0)
    assert (await harness.wait_done("j"))["event"] == "BLOCK_JOB_COMPLETED"
    assert node(harness, "top").backing is node(harness, "base")
    assert not node(harness, "base").read_only  # it was read-write before
    await harness.cmd("quit")
    compare(top, expected)
    for image in (base, mid1, mid2, top):
        check(image)


async def test_cancel_leaves_the_chain_as_it_was(harness: Harness, tmp_path: Path) -> None:
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await add_chain(harness, base, mid, top)
    await harness.cmd("block-commit", device="top", job_id="j", top_node="mid", speed=64 * KIB)
    await harness.wait_progress("j")
    await harness.cmd("block-job-cancel", device="j")
    done = await harness.wait_done("j")
    assert done["event"] == "BLOCK_JOB_CANCELLED"
    assert harness.names()[-4:] == [
        "JSC(aborting)",
        "BLOCK_JOB_CANCELLED",
        "JSC(concluded)",
        "JSC(null)",
    ]
    assert node(harness, "top").backing is node(harness, "mid")
    assert node(harness, "base").read_only
    assert [n for n in harness.d.graph.nodes.values() if n.drv == "commit_top"] == []
    await harness.cmd("quit")
    compare(top, expected)
    assert image_info(top)["backing-filename"] == str(mid)
    for image in (base, mid, top):
        check(image)


async def test_manual_finalize(harness: Harness, tmp_path: Path) -> None:
    base, mid, top = chain3(tmp_path)
    await add_chain(harness, base, mid, top)
    await harness.cmd(
        "block-commit",
        device="top",
        job_id="j",
        top_node="mid",
        auto_finalize=False,
        auto_dismiss=False,
    )
    await harness.wait_event("BLOCK_JOB_PENDING")
    assert node(harness, "top").backing is not node(harness, "base")  # not yet
    await harness.cmd("job-finalize", id="j")
    await harness.wait_event("JOB_STATUS_CHANGE", status="concluded")
    assert node(harness, "top").backing is node(harness, "base")
    await harness.cmd("job-dismiss", id="j")
    assert harness.names()[-1] == "JSC(null)"


def failing_base(path: Path, errno_: int, once: bool) -> dict[str, Any]:
    """The base behind blkdebug: its first write fails (iotest 040's error cases)."""
    return {
        "driver": "qcow2",
        "node-name": "base",
        "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": str(path)},
            "inject-error": [{"event": "write_aio", "errno": errno_, "once": once}],
        },
    }


@pytest.mark.parametrize(
    ("on_error", "errno_", "action", "finished"),
    [
        ("report", 5, "report", "Input/output error"),
        ("ignore", 5, "ignore", None),
        ("enospc", 28, "stop", None),
        ("enospc", 5, "report", "Input/output error"),
    ],
)
async def test_errors_follow_on_error(
    harness: Harness,
    tmp_path: Path,
    on_error: str,
    errno_: int,
    action: str,
    finished: str | None,
) -> None:
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await harness.raw("blockdev-add", failing_base(base, errno_, once=True))
    await harness.raw("blockdev-add", qcow2("mid", mid, backing="base", **{"read-only": True}))
    await harness.raw("blockdev-add", qcow2("top", top, backing="mid"))
    await harness.cmd("block-commit", device="top", job_id="j", top_node="mid", on_error=on_error)
    error = await harness.wait_event("BLOCK_JOB_ERROR")
    assert error == {"device": "j", "operation": "write", "action": action}
    if action == "stop":
        await harness.wait_event("JOB_STATUS_CHANGE", status="paused")
        [job] = await harness.cmd("query-block-jobs")
        assert (job["io-status"], job["paused"]) == ("nospace", True)
        await harness.cmd("block-job-resume", device="j")
    done = await harness.wait_done("j")
    assert done.get("error") == finished
    await harness.cmd("quit")
    if finished is None:
        compare(top, expected)
    for image in (mid, top):
        check(image)


async def test_active_commit_is_ready_only_after_a_flush_that_worked(
    harness: Harness, tmp_path: Path
) -> None:
    """The base's flush at the end of the first pass fails (full disk, ``on-error:
    stop``): once resumed the job flushes again and only then turns ready (QEMU
    ``mirror_run``: a failed ``mirror_flush`` goes round the loop again). blkdebug's
    state counts the flushes of the base."""
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    flushes = [{"event": "flush_to_disk", "state": s, "new_state": s + 1} for s in (1, 2, 3)]
    blkdebug = {
        "driver": "blkdebug",
        "image": file_ref(base),
        "inject-error": [{"event": "flush_to_disk", "state": 1, "errno": 28, "once": True}],
        "set-state": flushes,
    }
    await harness.raw("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": blkdebug})
    await harness.raw("blockdev-add", qcow2("mid", mid, backing="base", **{"read-only": True}))
    await harness.raw("blockdev-add", qcow2("top", top, backing="mid"))
    await harness.cmd("block-commit", device="top", job_id="j", on_error="stop")
    error = await harness.wait_event("BLOCK_JOB_ERROR")
    assert error == {"device": "j", "operation": "write", "action": "stop"}
    await harness.wait_event("JOB_STATUS_CHANGE", status="paused")
    rules = node(harness, "base").file.driver.rules
    assert rules.state == 2  # one flush, failed
    await harness.cmd("block-job-resume", device="j")
    await harness.wait_event("BLOCK_JOB_READY")
    assert rules.state == 3  # flushed again before ready
    await harness.cmd("job-complete", id="j")
    assert "error" not in await harness.wait_done("j")
    await harness.cmd("quit")
    compare(base, expected)
    check(base)


async def test_active_commit_keeps_up_with_writes(harness: Harness, tmp_path: Path) -> None:
    """Writes into the top before and after ready all reach the base; the pivot moves
    the top's parents onto the base; no header changes (iotest 040 TestActive)."""
    base, mid, top = chain3(tmp_path)
    await add_chain(harness, base, mid, top)
    await harness.cmd("block-commit", device="top", job_id="j", filter_node_name="mf")
    filt = node(harness, "mf")
    assert isinstance(filt.driver, MirrorTopDriver)
    rng = random.Random(7)
    model = bytearray(await node(harness, "top").pread(0, 2 * MIB))

    async def scribble(count: int) -> None:
        for _ in range(count):
            offset = rng.randrange(0, 2 * MIB - 70 * KIB)
            data = rng.randbytes(rng.randrange(1, 70 * KIB))
            await filt.write(offset, data)
            model[offset : offset + len(data)] = data
            await trio.sleep(0)

    await scribble(20)
    ready = await harness.wait_event("BLOCK_JOB_READY")
    assert ready["len"] == ready["offset"]
    await scribble(20)  # dirty again: copied while ready
    await harness.cmd("job-complete", id="j")
    await scribble(5)  # held back at the end, then written into the base
    done = await harness.wait_done("j")
    assert done["event"] == "BLOCK_JOB_COMPLETED"
    assert done["offset"] == done["len"]
    assert harness.names() == [*DONE[:2], "JSC(ready)", "BLOCK_JOB_READY", *DONE[2:]]
    assert node(harness, "top").parents == []
    assert not node(harness, "base").read_only  # the top's mode
    assert await node(harness, "base").pread(0, 2 * MIB) == bytes(model)
    await harness.cmd("blockdev-del", node_name="top")
    await harness.cmd("quit")
    check(base)
    assert "backing-filename" not in image_info(base)
    assert image_info(top)["backing-filename"] == str(mid)


async def test_active_commit_soft_and_forced_cancel(harness: Harness, tmp_path: Path) -> None:
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await add_chain(harness, base, mid, top)
    not_ready = "Job 'j' in state 'running' cannot accept command verb 'complete'"
    await harness.cmd("block-commit", device="top", job_id="j", speed=4 * KIB)
    assert await harness.error("job-complete", id="j") == not_ready
    await harness.cmd("block-job-cancel", device="j")  # before ready: forced
    assert (await harness.wait_done("j"))["event"] == "BLOCK_JOB_CANCELLED"
    assert node(harness, "base").read_only
    start = len(harness.events)
    await harness.cmd("block-commit", device="top", job_id="k")
    await harness.wait_event("BLOCK_JOB_READY", start=start)
    await harness.cmd("block-job-cancel", device="k")  # ready: completes, no pivot
    done = await harness.wait_done("k")
    assert done["event"] == "BLOCK_JOB_COMPLETED"
    assert node(harness, "top").backing is node(harness, "mid")
    assert not node(harness, "base").read_only  # QEMU leaves it read-write
    await harness.cmd("quit")
    compare(top, expected)
    # the base holds the chain's view of the moment
    compare(base, expected)
    check(base)


async def test_job_complete_while_standby_and_after_a_cancel(
    harness: Harness, tmp_path: Path
) -> None:
    """job-complete is taken in standby (the job completes once resumed) and refused
    once a cancel was asked for (QEMU ``job_complete_locked``)."""
    base, mid, top = chain3(tmp_path)
    await add_chain(harness, base, mid, top)
    await harness.cmd("block-commit", device="top", job_id="j")
    await harness.wait_event("BLOCK_JOB_READY")
    await harness.cmd("block-job-pause", device="j")
    await harness.wait_event("JOB_STATUS_CHANGE", status="standby")
    await harness.cmd("job-complete", id="j")
    await harness.cmd("block-job-resume", device="j")
    assert (await harness.wait_done("j"))["event"] == "BLOCK_JOB_COMPLETED"
    assert node(harness, "top").parents == []
    start = len(harness.events)
    await harness.cmd("blockdev-del", node_name="top")
    await harness.raw("blockdev-add", qcow2("top2", tmp_path / "top.qcow2", backing="mid"))
    await harness.cmd("block-commit", device="top2", job_id="k")
    await harness.wait_event("BLOCK_JOB_READY", start=start)
    await harness.cmd("block-job-cancel", device="k")
    assert await harness.error("job-complete", id="k") == (
        "The active block job 'k' cannot be completed"
    )
    assert (await harness.wait_done("k"))["event"] == "BLOCK_JOB_COMPLETED"


async def test_pause_and_resume(harness: Harness, tmp_path: Path) -> None:
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await add_chain(harness, base, mid, top)
    await harness.cmd("block-commit", device="top", job_id="j", top_node="mid", speed=64 * KIB)
    await harness.wait_progress("j")
    await harness.cmd("job-pause", id="j")
    await harness.wait_event("JOB_STATUS_CHANGE", status="paused")
    [job] = await harness.cmd("query-block-jobs")
    assert (job["paused"], job["status"]) == (True, "paused")
    await harness.cmd("block-job-set-speed", device="j", speed=0)
    await harness.cmd("job-resume", id="j")
    assert (await harness.wait_done("j"))["event"] == "BLOCK_JOB_COMPLETED"
    await harness.cmd("quit")
    compare(top, expected)


@pytest.mark.parametrize("on_error", ["stop", "report"])
async def test_active_commit_write_errors(harness: Harness, tmp_path: Path, on_error: str) -> None:
    """A failed write into the base: the run is dirty again; stop pauses (and the
    resume copies it), report fails the job and the top stays the active layer."""
    base, mid, top = chain3(tmp_path)
    expected = snapshot(top, tmp_path / "expected.qcow2")
    await harness.raw("blockdev-add", failing_base(base, 5, once=True))
    await harness.raw("blockdev-add", qcow2("mid", mid, backing="base", **{"read-only": True}))
    await harness.raw("blockdev-add", qcow2("top", top, backing="mid"))
    await harness.cmd("block-commit", device="top", job_id="j", on_error=on_error)
    error = await harness.wait_event("BLOCK_JOB_ERROR")
    assert error == {"device": "j", "operation": "write", "action": on_error}
    if on_error == "stop":
        await harness.wait_event("JOB_STATUS_CHANGE", status="paused")
        await harness.cmd("job-resume", id="j")
        await harness.wait_event("BLOCK_JOB_READY")
        await harness.cmd("job-complete", id="j")
        assert (await harness.wait_done("j"))["event"] == "BLOCK_JOB_COMPLETED"
        assert node(harness, "top").parents == []
    else:
        done = await harness.wait_done("j")
        assert done["error"] == "Input/output error"
        assert node(harness, "top").backing is node(harness, "mid")
        assert [n for n in harness.d.graph.nodes.values() if n.drv == "mirror_top"] == []
    await harness.cmd("quit")
    compare(top, expected)
    if on_error == "stop":
        compare(base, expected)
