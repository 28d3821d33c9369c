"""A real ENOSPC: the top image lives on a small tmpfs that fills up during the stream.

With ``on-error=enospc`` the job pauses (``io-status: nospace``); once space is freed,
``block-job-resume`` retries the failed chunk and the stream completes with no data lost.
Needs permission to mount a tmpfs (root); skipped otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.chains import qcow2
from kit.daemons import Harness
from kit.host import fill, small_tmpfs
from kit.qemu import KIB, MIB, check, compare, create, image_info, snapshot, write


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, "3m") as mount:
        yield mount


async def test_real_enospc_pauses_then_completes(
    harness: Harness, tmp_path: Path, small_fs: Path
) -> None:
    base = create(tmp_path / "base.qcow2", 2 * MIB)
    write(base, 0, 2 * MIB, 0x6B)
    top = create(small_fs / "top.qcow2", None, base)
    write(top, 64 * KIB, 64 * KIB, 0x01)
    before = snapshot(top, tmp_path / "before.qcow2")
    # Leave about 1 MiB free: the 2 MiB of data cannot all be copied.
    filler = fill(small_fs, 1 * MIB, 0xFF)
    h = harness
    await h.add(qcow2(top, "top"))
    await h.cmd("block-stream", device="top", job_id="j", on_error="enospc")
    await h.wait_event("JOB_STATUS_CHANGE", status="paused")
    assert h.last("BLOCK_JOB_ERROR") == {"device": "j", "operation": "read", "action": "stop"}
    [job] = await h.cmd("query-block-jobs")
    assert job["io-status"] == "nospace" and job["status"] == "paused"
    # Copies in flight take the space in any order: the one that finds the disk full
    # may be the first step's (offset 0) or a later one's.
    assert 0 <= job["offset"] < 2 * MIB
    filler.unlink()
    await h.cmd("block-job-resume", device="j")
    done = await h.wait_done("j")
    assert done["event"] == "BLOCK_JOB_COMPLETED" and "error" not in done
    assert done["offset"] == done["len"] == 2 * MIB
    await h.cmd("blockdev-del", node_name="top")
    compare(top, before)
    assert "backing-filename" not in image_info(top)
    # No corruption and no leak: the clusters of the copy that failed were freed.
    check(top)
