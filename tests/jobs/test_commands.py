"""The job commands as handlers on a real Daemon: errors, shapes, event order.

Arguments are validated with the real schema first and return values and events are
checked against it, so these tests also pin the schema files to the handlers.
``--reply`` markers stand where the server queues the reply: right after the handler.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from kit.daemons import run_command
from kit.fakes import CHUNK, FakeJob
from kit.qmp import Recorder
from trio.testing import MockClock

from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.qmp.schema import Schema

JOB_COMMANDS = ["job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize",
                "job-dismiss"]  # fmt: skip
BLOCK_JOB_COMMANDS = {
    "block-job-pause": "device",
    "block-job-resume": "device",
    "block-job-cancel": "device",
    "block-job-complete": "device",
    "block-job-set-speed": "device",
    "block-job-finalize": "id",
    "block-job-dismiss": "id",
    "block-job-change": "id",
}


class Client:
    """Runs commands the way the server does: validate, call, check the return."""

    def __init__(self, daemon: Daemon, rec: Recorder) -> None:
        self.d = daemon
        self.rec = rec
        self.commands = load_all()

    async def __call__(self, name: str, **arguments: Any) -> Any:
        value = await run_command(self.d, name, arguments, self.commands)
        self.rec.mark(f"reply {name}")
        return value

    async def error(self, name: str, **arguments: Any) -> tuple[str, str]:
        with pytest.raises(QMPError) as info:
            await self(name, **arguments)
        return info.value.error_class, info.value.desc

    def start(self, job_id: str = "job0", **kw: Any) -> FakeJob:
        job = FakeJob(self.d.jobs, job_id, **kw)
        self.d.jobs.create(job)
        job.start()
        self.rec.mark("reply block-stream")
        return job


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.fixture
async def daemon(schema: Schema) -> AsyncIterator[Daemon]:
    d = Daemon(schema)
    async with trio.open_nursery() as nursery:
        d.jobs.attach(nursery)
        yield d
        await d.jobs.cancel_all()


@pytest.fixture
def client(daemon: Daemon) -> Client:
    rec = Recorder(daemon.events)
    daemon.events.subscribe(lambda ev: daemon.schema.validate_event(ev["event"], ev["data"]))
    return Client(daemon, rec)


async def test_every_job_command_has_a_schema_and_a_handler(daemon: Daemon) -> None:
    names = {"query-jobs", "query-block-jobs", *JOB_COMMANDS, *BLOCK_JOB_COMMANDS}
    table = load_all()
    for name in names:
        assert name in table, name
        assert name in daemon.schema.commands, name
    for event in ["JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                  "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING", "BLOCK_JOB_READY"]:  # fmt: skip
        assert event in daemon.schema.events


async def test_unknown_ids(client: Client) -> None:
    for name in JOB_COMMANDS:
        assert await client.error(name, id="nope") == ("GenericError", "Job not found")
    for name, key in BLOCK_JOB_COMMANDS.items():
        extra: dict[str, Any] = {"block-job-set-speed": {"speed": 0},
                                 "block-job-change": {"type": "stream"}}.get(name, {})  # fmt: skip
        assert await client.error(name, **{key: "nope"}, **extra) == (
            "DeviceNotActive", "Block job 'nope' not found",
        )  # fmt: skip
    assert await client("query-jobs") == []
    assert await client("query-block-jobs") == []


async def test_query_shapes_newest_first(client: Client, autojump_clock: MockClock) -> None:
    client.start("older", speed=CHUNK)
    client.start("newer", speed=CHUNK, auto_dismiss=False, on_error="stop")
    await trio.sleep(0.5)
    jobs = await client("query-jobs")
    assert [j["id"] for j in jobs] == ["newer", "older"]
    assert jobs[0] == {"id": "newer", "type": "stream", "status": "running",
                       "current-progress": CHUNK, "total-progress": 8 * CHUNK}  # fmt: skip
    assert list(jobs[0]) == ["id", "type", "status", "current-progress", "total-progress"]
    block = await client("query-block-jobs")
    assert [j["device"] for j in block] == ["newer", "older"]
    assert block[0] == {
        "type": "stream", "device": "newer", "len": 8 * CHUNK, "offset": CHUNK,
        "busy": False, "paused": False, "speed": CHUNK, "io-status": "ok", "ready": False,
        "status": "running", "auto-finalize": True, "auto-dismiss": False,
    }  # fmt: skip
    assert list(block[0]) == ["type", "device", "len", "offset", "busy", "paused", "speed",
                              "io-status", "ready", "status", "auto-finalize",
                              "auto-dismiss"]  # fmt: skip


async def test_block_job_cancel_of_a_paused_job(client: Client, autojump_clock: MockClock) -> None:
    client.start(speed=CHUNK)
    await trio.sleep(0.5)
    await client("block-job-pause", device="job0")
    assert await client.error("block-job-cancel", device="job0") == (
        "GenericError", "The block job for device 'job0' is currently paused",
    )  # fmt: skip
    assert await client.error("block-job-cancel", device="job0", force=False) == (
        "GenericError", "The block job for device 'job0' is currently paused",
    )  # fmt: skip
    client.rec.clear()
    await client("block-job-cancel", device="job0", force=True)
    # As qemu-storage-daemon 10.0: a paused job is finished before the reply.
    assert client.rec.names() == [
        "JSC(running)", "JSC(aborting)", "BLOCK_JOB_CANCELLED", "JSC(concluded)", "JSC(null)",
        "--reply block-job-cancel",
    ]  # fmt: skip


async def test_stopped_job_needs_force_or_job_cancel(
    client: Client, autojump_clock: MockClock
) -> None:
    job = client.start(on_error="stop", failures={0: [OSError(errno.EIO, "x")]})
    await trio.sleep(1)
    assert job.status == "paused"
    assert (await client("query-block-jobs"))[0]["io-status"] == "failed"
    assert (await client.error("block-job-cancel", device="job0"))[1] == (
        "The block job for device 'job0' is currently paused"
    )
    await client("job-cancel", id="job0")
    await trio.sleep(1)
    assert await client("query-jobs") == []


async def test_pause_resume_commands(client: Client, autojump_clock: MockClock) -> None:
    client.start(speed=CHUNK)
    await trio.sleep(0.5)
    client.rec.clear()
    await client("job-pause", id="job0")
    assert await client.error("block-job-pause", device="job0") == (
        "GenericError", "Job is already paused",
    )  # fmt: skip
    await client("block-job-resume", device="job0")
    assert await client.error("job-resume", id="job0") == (
        "GenericError", "Can't resume a job that was not paused",
    )  # fmt: skip
    assert client.rec.names() == [
        "JSC(paused)", "--reply job-pause", "JSC(running)", "--reply block-job-resume",
    ]  # fmt: skip


async def test_set_speed_command(client: Client, autojump_clock: MockClock) -> None:
    job = client.start(speed=1024)
    await trio.sleep(1)
    assert await client.error("block-job-set-speed", device="job0", speed=-1) == (
        "GenericError", "Parameter 'speed' expects a non-negative value",
    )  # fmt: skip
    assert job.speed == 1024
    await client("block-job-set-speed", device="job0", speed=0)
    assert (await client("query-block-jobs"))[0]["speed"] == 0
    await job.wait_ended()
    assert trio.current_time() < 1.1


async def test_complete_commands_fail_for_stream(client: Client) -> None:
    client.start()
    text = "Job 'job0' in state 'running' cannot accept command verb 'complete'"
    assert await client.error("job-complete", id="job0") == ("GenericError", text)
    assert await client.error("block-job-complete", device="job0") == ("GenericError", text)


@pytest.mark.parametrize("style", ["job", "block-job"])
async def test_manual_finalize_and_dismiss(
    client: Client, autojump_clock: MockClock, style: str
) -> None:
    client.start(auto_finalize=False, auto_dismiss=False)
    await trio.sleep(10)
    assert client.rec.names() == [
        "JSC(created)", "JSC(running)", "--reply block-stream", "JSC(waiting)",
        "JSC(pending)", "BLOCK_JOB_PENDING",
    ]  # fmt: skip
    assert await client.error(f"{style}-dismiss", id="job0") == (
        "GenericError", "Job 'job0' in state 'pending' cannot accept command verb 'dismiss'",
    )  # fmt: skip
    client.rec.clear()
    await client(f"{style}-finalize", id="job0")
    assert client.rec.names() == [
        "BLOCK_JOB_COMPLETED", "JSC(concluded)", f"--reply {style}-finalize",
    ]  # fmt: skip
    (info,) = await client("query-block-jobs")
    assert (info["status"], "error" in info, info["busy"]) == ("concluded", False, False)
    client.rec.clear()
    await client(f"{style}-dismiss", id="job0")
    assert client.rec.names() == ["JSC(null)", f"--reply {style}-dismiss"]
    assert await client("query-jobs") == []


async def test_cancel_in_pending_events_before_reply(
    client: Client, autojump_clock: MockClock
) -> None:
    client.start(auto_finalize=False)
    await trio.sleep(10)
    client.rec.clear()
    await client("job-cancel", id="job0")
    assert client.rec.names() == [
        "JSC(aborting)", "BLOCK_JOB_CANCELLED", "JSC(concluded)", "JSC(null)",
        "--reply job-cancel",
    ]  # fmt: skip


async def test_cancel_of_a_running_job_events_after_reply(
    client: Client, autojump_clock: MockClock
) -> None:
    client.start(io_seconds=1.0, auto_dismiss=False)
    await trio.sleep(0.5)
    client.rec.clear()
    await client("block-job-cancel", device="job0")
    await trio.sleep(5)
    assert client.rec.names() == [
        "--reply block-job-cancel", "JSC(aborting)", "BLOCK_JOB_CANCELLED", "JSC(concluded)",
    ]  # fmt: skip
    (info,) = await client("query-jobs")
    assert info["error"] == "Operation canceled" and info["status"] == "concluded"


async def test_concurrent_finalize(client: Client, autojump_clock: MockClock) -> None:
    """A second finalize meeting a finalisation in progress waits, then sees the result."""
    client.start(auto_finalize=False)
    await trio.sleep(10)
    results: list[Any] = []

    async def finalize() -> None:
        try:
            results.append(await client("job-finalize", id="job0"))
        except QMPError as exc:
            results.append(exc.desc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finalize)
        nursery.start_soon(finalize)
    assert sorted(map(str, results)) == ["Job not found", "{}"]
    assert client.rec.names().count("BLOCK_JOB_COMPLETED") == 1


async def test_jobs_outlive_the_connection_that_started_them(
    client: Client, autojump_clock: MockClock
) -> None:
    """A job belongs to the daemon: cancelling the starting connection's task leaves it."""

    async def connection() -> None:
        client.start(speed=4 * CHUNK, auto_dismiss=False, failures={CHUNK: [OSError(5, "")]})
        await trio.sleep_forever()

    async with trio.open_nursery() as conn:
        conn.start_soon(connection)
        await trio.sleep(0.1)
        conn.cancel_scope.cancel()  # the client went away
    await trio.sleep(60)
    # Another client, later: the concluded job still shows its error until dismissed.
    (info,) = await client("query-jobs")
    assert info == {"id": "job0", "type": "stream", "status": "concluded",
                    "current-progress": CHUNK, "total-progress": 8 * CHUNK,
                    "error": "Input/output error"}  # fmt: skip
    await client("job-dismiss", id="job0")
    assert await client("query-jobs") == []


async def test_id_errors(client: Client) -> None:
    d = client.d
    for bad in ["", "0abc", "a b", "-x"]:
        with pytest.raises(QMPError) as info:
            d.jobs.create(FakeJob(d.jobs, bad))
        assert info.value.desc == f"Invalid job ID '{bad}'"
    client.start("job0", auto_finalize=False, auto_dismiss=False)
    client.rec.clear()
    with pytest.raises(QMPError) as info:
        d.jobs.create(FakeJob(d.jobs, "job0"))
    assert info.value.desc == "Job ID 'job0' already in use"
    assert client.rec.names() == []  # no event for a refused id


async def test_early_failure_emits_created_then_null(client: Client) -> None:
    d = client.d
    job = FakeJob(d.jobs, "job1", speed=-1)
    with pytest.raises(QMPError) as info:
        d.jobs.create(job)
    assert info.value.desc == "Parameter 'speed' expects a non-negative value"
    assert client.rec.names() == ["JSC(created)", "JSC(null)"]
    assert d.jobs.jobs == {}
    # The same for a failure of the caller's own set-up after create().
    client.rec.clear()
    job = FakeJob(d.jobs, "job1")
    d.jobs.create(job)
    job.early_fail()
    assert client.rec.names() == ["JSC(created)", "JSC(null)"]
    assert job.calls == []


async def test_shutdown_cancels_every_job(client: Client, autojump_clock: MockClock) -> None:
    running = client.start("running", speed=1024)
    busy = client.start("busy", io_seconds=5.0)
    paused = client.start("paused", speed=CHUNK)
    pending = client.start("pending", auto_finalize=False)
    kept = client.start("kept", auto_dismiss=False)
    await trio.sleep(0.5)
    await client("job-pause", id="paused")
    await trio.sleep(10)
    assert pending.status == "pending" and kept.status == "concluded"
    client.rec.clear()
    await client.d.aclose()
    for job in (running, busy, paused, pending):
        assert job.status == "null", job
        assert job.calls[-2:] == ["abort", "clean"]
    assert kept.status == "concluded"
    assert len(client.rec.data("BLOCK_JOB_CANCELLED")) == 4
    assert [j["id"] for j in await client("query-jobs")] == ["kept"]


async def test_block_job_change(client: Client, autojump_clock: MockClock) -> None:
    client.start(auto_finalize=False)
    for kind in [{"type": "stream"}, {"type": "mirror", "copy-mode": "write-blocking"}]:
        assert await client.error("block-job-change", id="job0", **kind) == (
            "GenericError", "Job type does not support change",
        )  # fmt: skip
    await trio.sleep(10)
    assert await client.error("block-job-change", id="job0", type="stream") == (
        "GenericError", "Job 'job0' in state 'pending' cannot accept command verb 'change'",
    )  # fmt: skip


async def test_resume_replies_once_the_job_is_asleep_again(
    client: Client, autojump_clock: MockClock
) -> None:
    """As in QEMU, a resumed job has run to its next sleep before the reply."""
    client.start(speed=1024)
    await trio.sleep(1)
    await client("job-pause", id="job0")
    await client("block-job-resume", device="job0")
    (info,) = await client("query-block-jobs")
    assert (info["status"], info["busy"], info["paused"]) == ("running", False, False)
    await client("block-job-set-speed", device="job0", speed=2048)
    (info,) = await client("query-block-jobs")
    assert (info["busy"], info["speed"]) == (False, 2048)  # woken, still in debt: asleep


@pytest.mark.parametrize(
    ("auto_dismiss", "error"),
    [
        (False, "Job 'job0' in state 'concluded' cannot accept command verb 'cancel'"),
        (True, "Job not found"),
    ],
)
async def test_cancel_during_auto_finalisation(
    client: Client, autojump_clock: MockClock, auto_dismiss: bool, error: str
) -> None:
    """QEMU finalises in one main-loop turn, so a cancel can never catch a job half-way:
    the command waits for the finalisation in progress, then sees its outcome."""
    job = client.start(prepare_seconds=5.0, auto_dismiss=auto_dismiss)
    await trio.sleep(1)
    assert job.status == "pending" and job.completing and job.calls == ["run", "prepare"]
    assert await client.error("job-cancel", id="job0") == ("GenericError", error)
    assert trio.current_time() == pytest.approx(5.0, abs=1e-3)
    assert "BLOCK_JOB_CANCELLED" not in client.rec.names()
    assert client.rec.data("BLOCK_JOB_COMPLETED")[0].get("error") is None
