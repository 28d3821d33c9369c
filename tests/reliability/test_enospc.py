"""A real full filesystem (tmpfs of 8 MiB) during streams with small clusters, so data
and metadata (L2 tables, refcount blocks) allocations both meet ENOSPC. Whatever the
``on-error`` policy, nothing already written is lost: the image stays consistent, its
guest view never changes, and once space is freed the stream completes.
Skipped where a tmpfs cannot be mounted (needs root)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.chains import qcow2
from kit.daemons import Harness
from kit.host import fill, small_tmpfs
from kit.qemu import KIB, MIB, compare, create, image_info, snapshot, write

from stress.killkit import check_image


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, "8m") as mount:
        yield mount


def chain(tmp_path: Path, fs: Path, name: str) -> tuple[Path, Path]:
    base = create(tmp_path / f"{name}-base.qcow2", 3 * MIB)
    write(base, 0, 3 * MIB, 0x5A)
    top = create(fs / f"{name}.qcow2", None, base, "qcow2", "qcow2", "cluster_size=4096")
    write(top, 100 * KIB, 8 * KIB, 0x01)
    return top, snapshot(top, tmp_path / f"{name}-before.qcow2")


async def add(h: Harness, top: Path, name: str) -> None:
    await h.add(qcow2(top, name))  # fmt: skip


async def test_report_fails_cleanly_then_streams_again(
    harness: Harness, tmp_path: Path, small_fs: Path
) -> None:
    h = harness
    tops = [chain(tmp_path, small_fs, f"t{i}") for i in range(2)]
    filler = fill(small_fs, 2 * MIB)  # room for about a third of the 6 MiB to copy
    for i, (top, _) in enumerate(tops):
        await add(h, top, f"t{i}")
        await h.cmd("block-stream", device=f"t{i}", job_id=f"j{i}", on_error="report")
    results = [await h.wait_done(f"j{i}") for i in range(2)]
    assert any(r.get("error") == "No space left on device" for r in results), results
    for i, (top, before) in enumerate(tops):
        await h.cmd("blockdev-del", node_name=f"t{i}")
        assert check_image(top) is None
        compare(top, before)
    filler.unlink()
    for i, (top, _) in enumerate(tops):
        await add(h, top, f"t{i}")
        await h.cmd("block-stream", device=f"t{i}", job_id=f"k{i}")
    for i, (top, before) in enumerate(tops):
        done = await h.wait_done(f"k{i}")
        assert "error" not in done, done
        await h.cmd("blockdev-del", node_name=f"t{i}")
        assert "backing-filename" not in image_info(top)
        assert check_image(top) is None
        compare(top, before)


@pytest.mark.parametrize("policy", ["stop", "enospc"])
async def test_pause_on_enospc_then_resume(
    harness: Harness, tmp_path: Path, small_fs: Path, policy: str
) -> None:
    h = harness
    top, before = chain(tmp_path, small_fs, "t")
    filler = fill(small_fs, 1 * MIB)
    await add(h, top, "t")
    await h.cmd("block-stream", device="t", job_id="j", on_error=policy)
    await h.wait_event("JOB_STATUS_CHANGE", status="paused")
    [job] = await h.cmd("query-block-jobs")
    assert job["io-status"] == "nospace" and job["paused"], job
    filler.unlink()
    await h.cmd("block-job-resume", device="j")
    done = await h.wait_done("j")
    assert "error" not in done and done["offset"] == done["len"], done
    await h.cmd("blockdev-del", node_name="t")
    assert check_image(top) is None
    compare(top, before)
