"""A client that disconnects mid-job loses nothing: a new client re-syncs from query-jobs
(docs/clients.md §2.4 "Reconnect", §6.5), the job goes on and its result waits to be read."""

from __future__ import annotations

import trio
from kit.chains import qcow2
from kit.daemons import Lab
from kit.qemu import check, compare, convert, qemu_img

from blockd.client.connection import connect
from blockd.client.follow import JOB_EVENTS, Outcome, follow_job
from blockd.client.lab import make_chain

IO = 30.0


async def test_reconnect_resyncs_from_query_jobs(lab: Lab) -> None:
    lab.require("blockdev-add", "block-stream", "query-jobs", "query-block-jobs",
                "block-job-set-speed", "job-dismiss", "blockdev-del")  # fmt: skip
    top = make_chain(lab.images, "4M")[0]
    expected = lab.images / "expected.raw"
    convert(top, expected, force_share=False)
    with trio.fail_after(IO):
        # First client: start a throttled stream that keeps its result, then go away.
        async with connect(str(lab.socket), name="first") as qmp:
            await qmp.execute("blockdev-add", qcow2(top))
            await qmp.execute("block-stream", {"job-id": "j0", "device": "top",
                              "speed": 512 * 1024, "auto-dismiss": False})  # fmt: skip
            [before] = await qmp.execute("query-block-jobs")
            assert before["status"] == "running"

        # Second client: nothing is replayed; it learns the state from query-jobs.
        async with connect(str(lab.socket), name="second") as qmp:
            with qmp.listen(*JOB_EVENTS) as events:
                [job] = await qmp.execute("query-jobs")
                assert (job["id"], job["type"], job["status"]) == ("j0", "stream", "running")
                assert "error" not in job
                assert 0 < job["total-progress"] == 4 * 2**20
                assert events.statistics().current_buffer_used == 0  # no replayed events
                [info] = await qmp.execute("query-block-jobs")
                assert info["offset"] >= before["offset"]
                assert info["speed"] == 512 * 1024  # the job's settings survived
                await qmp.execute("block-job-set-speed", {"device": "j0", "speed": 0})
                seen: list[str] = []
                final = await follow_job(
                    qmp, "j0", events, interval=0.05, dismiss=False,
                    on_update=lambda view: seen.append(view.status),
                )  # fmt: skip
            assert final.outcome is Outcome.COMPLETED and final.error is None
            assert final.offset == final.len == 4 * 2**20
            assert seen[-1] == "concluded"
            [job] = await qmp.execute("query-jobs")
            assert job["status"] == "concluded" and "error" not in job
            await qmp.execute("job-dismiss", {"id": "j0"})
            assert await qmp.execute("query-jobs") == []
            await qmp.execute("blockdev-del", {"node-name": "top"})

    assert "backing file:" not in qemu_img("info", top).stdout
    compare(expected, top, force_share=False)
    check(top, force_share=False)


async def test_concluded_job_survives_disconnect(lab: Lab) -> None:
    """The result of a job that ended while no client was connected is still there."""
    lab.require("blockdev-add", "block-stream", "query-jobs", "job-dismiss")
    top = make_chain(lab.images, "1M")[0]
    with trio.fail_after(IO):
        async with connect(str(lab.socket)) as qmp:
            await qmp.execute("blockdev-add", qcow2(top))
            await qmp.execute("block-stream", {"job-id": "j0", "device": "top",
                                               "auto-dismiss": False})  # fmt: skip
        while True:
            async with connect(str(lab.socket)) as qmp:
                [job] = await qmp.execute("query-jobs")
                if job["status"] == "concluded":
                    assert "error" not in job
                    await qmp.execute("job-dismiss", {"id": "j0"})
                    break
            await trio.sleep(0.05)
