"""A real full filesystem (a small tmpfs) under the image a job writes: the top of a
stream, the base of a non-active or an active commit (:class:`stress.killkit.Kind`),
with 4 KiB clusters, so data and metadata (L2 tables, refcount blocks) allocations both
meet ENOSPC. ``on-error: report`` fails the job with ``No space left on device``;
``stop`` and ``enospc`` pause it (``BLOCK_JOB_ERROR`` action ``stop``, io-status
``nospace``) and a resume once space was freed completes it. Whatever the policy,
nothing already written is lost: every image stays consistent, the chain's guest view
never changes (:func:`stress.killkit.judge`), and once space is freed the job completes.
Skipped where a tmpfs cannot be mounted (needs root)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from kit.daemons import Harness
from kit.host import fill, small_tmpfs
from kit.qemu import KIB, MIB

from stress.killkit import Chain, Kind, Templates, job_commands, judge

#: room left on the filesystem for two jobs: about a third of what they allocate
ROOM = {Kind.STREAM: 2 * MIB, Kind.COMMIT: 512 * KIB, Kind.ACTIVE: 512 * KIB}
#: what ``BLOCK_JOB_ERROR`` says failed: a stream copies on read, and QEMU reports
#: everything that fails in it as a read (``stream_run``)
OPERATION = {Kind.STREAM: "read", Kind.COMMIT: "write", Kind.ACTIVE: "write"}
#: the events after which a job waits for nobody: it ended, or it is ready
ENDS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return Templates(tmp_path_factory.mktemp("templates"), 4 * MIB, cluster=4096)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, "24m") as mount:
        yield mount


def chains(templates: Templates, fs: Path, kind: Kind, count: int) -> list[Chain]:
    return [templates.chain(kind, fs / f"c{i}", f"j{i}") for i in range(count)]


async def start(h: Harness, chain: Chain, **job: str) -> None:
    for name, arguments in job_commands(chain, job):
        await h.raw(name, arguments)


async def settle(h: Harness, job_id: str, start: int = 0) -> dict[str, Any]:
    """Wait until ``job_id`` ended or turned ready (after event ``start``); that event."""
    with trio.fail_after(30):
        while True:
            for event in h.events[start:]:
                if event["event"] in ENDS and event["data"]["device"] == job_id:
                    return event
            await trio.sleep(0.005)  # real I/O: polls, as Harness.wait_progress


async def finish(h: Harness, chain: Chain, start: int = 0) -> dict[str, Any]:
    """Wait for ``chain``'s job to end, completing an active commit once ready; its
    completion."""
    if (await settle(h, chain.job_id, start))["event"] == "BLOCK_JOB_READY":
        await h.cmd("job-complete", id=chain.job_id)
    return await h.wait_done(chain.job_id)


async def delete(h: Harness, chain: Chain) -> None:
    for name in chain.node_names():
        await h.cmd("blockdev-del", node_name=name)


@pytest.mark.parametrize("kind", list(Kind))
async def test_report_fails_cleanly_then_runs_again(
    harness: Harness, templates: Templates, small_fs: Path, kind: Kind
) -> None:
    h = harness
    pair = chains(templates, small_fs, kind, 2)
    filler = fill(small_fs, ROOM[kind])
    for chain in pair:
        await start(h, chain, **{"on-error": "report"})
    ended = [await settle(h, c.job_id) for c in pair]  # an active commit may turn ready
    errors = [e["data"].get("error") for e in ended]
    assert "No space left on device" in errors, ended
    actions = [(e["data"]["operation"], e["data"]["action"]) for e in h.events
               if e["event"] == "BLOCK_JOB_ERROR"]  # fmt: skip
    assert (OPERATION[kind], "report") in actions, actions
    for chain, event in zip(pair, ended, strict=True):
        if event["event"] == "BLOCK_JOB_READY":
            await h.cmd("block-job-cancel", device=chain.job_id, force=True)
        await h.wait_done(chain.job_id)
        await delete(h, chain)
        assert judge(chain, finished=False) == []
    filler.unlink()
    for chain in pair:
        chain.job_id = f"k{chain.job_id}"
        await start(h, chain)
    for chain in pair:
        done = await finish(h, chain)
        assert "error" not in done, done
        await delete(h, chain)
        assert judge(chain, finished=True) == []


@pytest.mark.parametrize("policy", ["stop", "enospc"])
@pytest.mark.parametrize("kind", list(Kind))
async def test_pause_on_enospc_then_resume(
    harness: Harness, templates: Templates, small_fs: Path, kind: Kind, policy: str
) -> None:
    h = harness
    [chain] = chains(templates, small_fs, kind, 1)
    filler = fill(small_fs, ROOM[kind] // 4)
    await start(h, chain, **{"on-error": policy})
    error = await h.wait_event("BLOCK_JOB_ERROR")
    assert error == {"device": chain.job_id, "operation": OPERATION[kind], "action": "stop"}
    await h.wait_event("JOB_STATUS_CHANGE", status="paused")
    [job] = await h.cmd("query-block-jobs")
    assert job["io-status"] == "nospace" and job["paused"], job
    filler.unlink()
    mark = len(h.events)
    await h.cmd("block-job-resume", device=chain.job_id)
    done = await finish(h, chain, mark)
    assert "error" not in done and done["offset"] == done["len"], done
    await delete(h, chain)
    assert judge(chain, finished=True) == []
