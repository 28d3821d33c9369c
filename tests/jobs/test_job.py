"""The job engine under trio's autojump clock, with the fake copying job.

Event sequences are compared with docs/qemu-behaviour/jobs.md §6. ``--reply`` markers stand for
the point where a command's reply would be queued (right after its handler returns).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio
import trio.testing
from kit.fakes import CHUNK, FakeJob
from kit.qmp import DONE, Recorder
from trio.testing import MockClock

from blockd.errors import RequestError
from blockd.jobs.manager import JobManager

CANCELLED = ["JSC(aborting)", "BLOCK_JOB_CANCELLED", "JSC(concluded)", "JSC(null)"]


def rec_bus(rec: Recorder) -> Any:
    return rec.bus


def eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_default_run(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job()
    rec.mark("reply")
    assert job.status == "running"
    await job.wait_ended()
    assert rec.names() == ["JSC(created)", "JSC(running)", "--reply", *DONE]
    assert job.copied == [i * CHUNK for i in range(8)]
    assert job.calls == ["run", "prepare", "clean"]
    (done,) = rec.data("BLOCK_JOB_COMPLETED")
    assert done == {"type": "stream", "device": "job0", "len": 8 * CHUNK, "offset": 8 * CHUNK,
                    "speed": 0}  # fmt: skip
    assert list(done) == ["type", "device", "len", "offset", "speed"]
    assert "job0" not in manager.jobs
    assert manager.query_jobs() == []


async def test_no_auto_finalize_no_auto_dismiss(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(auto_finalize=False, auto_dismiss=False)
    rec.mark("reply")
    await trio.sleep(100)
    assert rec.names() == [
        "JSC(created)", "JSC(running)", "--reply", "JSC(waiting)", "JSC(pending)",
        "BLOCK_JOB_PENDING",
    ]  # fmt: skip
    assert rec.data("BLOCK_JOB_PENDING") == [{"type": "stream", "id": "job0"}]
    assert job.status == "pending"
    assert job.calls == ["run"]  # prepare waits for job-finalize
    assert manager.query_jobs()[0]["status"] == "pending"
    rec.clear()
    await job.finalize()
    rec.mark("reply")
    assert rec.names() == ["BLOCK_JOB_COMPLETED", "JSC(concluded)", "--reply"]
    assert job.calls == ["run", "prepare", "clean"]
    await trio.sleep(100)
    assert manager.query_jobs() == [
        {"id": "job0", "type": "stream", "status": "concluded",
         "current-progress": 8 * CHUNK, "total-progress": 8 * CHUNK},
    ]  # fmt: skip
    rec.clear()
    job.dismiss()
    assert rec.names() == ["JSC(null)"]
    assert manager.jobs == {}


async def test_cancel_while_busy(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(io_seconds=1.0, auto_dismiss=False)
    await trio.sleep(2.5)  # in the middle of the third chunk's I/O
    assert job.busy
    rec.clear()
    await job.cancel()
    rec.mark("reply")
    await job.wait_ended()
    assert rec.names() == ["--reply", "JSC(aborting)", "BLOCK_JOB_CANCELLED", "JSC(concluded)"]
    (cancelled,) = rec.data("BLOCK_JOB_CANCELLED")
    # The chunk in flight finishes; the job stops at its next pause point.
    assert cancelled == {"type": "stream", "device": "job0", "len": 8 * CHUNK,
                         "offset": 3 * CHUNK, "speed": 0}  # fmt: skip
    assert job.calls == ["run", "abort", "clean"]
    (info,) = manager.query_jobs()
    assert info["error"] == "Operation canceled"
    assert manager.query_block_jobs()[0]["error"] == "Operation canceled"


async def test_cancel_while_sleeping(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(speed=CHUNK)  # one chunk per second
    await trio.sleep(0.5)
    assert not job.busy
    rec.clear()
    await job.cancel()
    rec.mark("reply")
    assert trio.current_time() < 0.6  # woken at once, not at the end of its sleep
    # A parked job is finished within the command, as qemu-storage-daemon 10.0 does.
    assert rec.names() == [*CANCELLED, "--reply"]
    assert rec.data("BLOCK_JOB_CANCELLED")[0]["offset"] == CHUNK


async def test_cancel_while_paused(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(speed=CHUNK)
    await trio.sleep(0.5)
    job.pause()
    await trio.sleep(10)
    rec.clear()
    await job.cancel()
    rec.mark("reply")
    assert rec.names() == ["JSC(running)", *CANCELLED, "--reply"]
    assert not job.user_paused and job.pause_count == 0


async def test_cancel_in_pending(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(auto_finalize=False)
    await trio.sleep(100)
    assert job.status == "pending"
    rec.clear()
    await job.cancel()
    rec.mark("reply")
    assert rec.names() == [*CANCELLED, "--reply"]
    assert rec.data("BLOCK_JOB_CANCELLED")[0]["offset"] == 8 * CHUNK
    assert job.calls == ["run", "abort", "clean"]  # never prepared
    assert manager.jobs == {}


async def test_pause_and_resume_a_sleeping_job(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(speed=CHUNK)
    await trio.sleep(0.5)
    rec.clear()
    job.pause()
    rec.mark("pause reply")
    # A sleeping job reaches its pause point within the command (QEMU re-enters it).
    assert rec.names() == ["JSC(paused)", "--pause reply"]
    info = manager.query_block_jobs()[0]
    assert (info["status"], info["paused"], info["busy"]) == ("paused", True, False)
    await trio.sleep(60)
    assert job.copied == [0]  # nothing happens while paused
    job.resume()
    rec.mark("resume reply")
    assert rec.names()[-2:] == ["JSC(running)", "--resume reply"]
    info = manager.query_block_jobs()[0]
    assert (info["status"], info["paused"], info["busy"]) == ("running", False, True)
    await job.wait_ended()
    assert job.copied == [i * CHUNK for i in range(8)]
    assert rec.names()[-5:] == DONE


async def test_pause_a_busy_job(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(io_seconds=1.0)
    await trio.sleep(0.5)
    rec.clear()
    job.pause()
    rec.mark("reply")
    info = manager.query_block_jobs()[0]
    # Marked paused at once; the status changes when the job reaches its pause point.
    assert (info["status"], info["paused"], info["busy"]) == ("running", True, True)
    await trio.sleep(1)
    assert rec.names() == ["--reply", "JSC(paused)"]
    info = manager.query_block_jobs()[0]
    assert (info["status"], info["paused"], info["busy"]) == ("paused", True, False)
    assert job.copied == [0]
    with pytest.raises(RequestError, match=r"^Job is already paused$"):
        job.pause()
    job.resume()
    await job.wait_ended()
    assert job.status == "null"


async def test_resume_and_verb_errors(
    autojump_clock: MockClock, manager: JobManager, make_job: Any
) -> None:
    job = make_job(auto_finalize=False, auto_dismiss=False)
    with pytest.raises(RequestError, match=r"^Can't resume a job that was not paused$"):
        job.resume()
    await trio.sleep(100)
    with pytest.raises(RequestError, match=r"state 'pending' cannot accept command verb 'pause'"):
        job.pause()
    with pytest.raises(RequestError, match=r"state 'pending' cannot accept .* 'set-speed'"):
        job.set_speed(1)
    with pytest.raises(RequestError, match=r"state 'pending' cannot accept .* 'dismiss'"):
        job.dismiss()
    with pytest.raises(RequestError, match=r"state 'pending' cannot accept .* 'complete'"):
        job.complete()
    await job.finalize()
    # The not-paused check comes before the verb check, even for a concluded job.
    with pytest.raises(RequestError, match=r"^Can't resume a job that was not paused$"):
        job.resume()
    with pytest.raises(RequestError, match=r"state 'concluded' cannot accept .* 'cancel'"):
        await job.cancel()
    with pytest.raises(RequestError, match=r"state 'concluded' cannot accept .* 'finalize'"):
        await job.finalize()


async def test_complete_is_refused_for_stream(autojump_clock: MockClock, make_job: Any) -> None:
    job = make_job()
    with pytest.raises(RequestError) as info:
        job.complete()
    assert info.value.desc == "Job 'job0' in state 'running' cannot accept command verb 'complete'"


# ------------------------------------------------------------------------ on-error


@pytest.mark.parametrize("raise_first", [False, True])
async def test_on_error_report(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any, raise_first: bool
) -> None:
    job = make_job(failures={CHUNK: [eio()]}, raise_first=raise_first, auto_dismiss=False)
    await job.wait_ended()
    assert rec.names() == [
        "JSC(created)", "JSC(running)", "BLOCK_JOB_ERROR", "JSC(aborting)",
        "BLOCK_JOB_COMPLETED", "JSC(concluded)",
    ]  # fmt: skip
    assert rec.data("BLOCK_JOB_ERROR") == [
        {"device": "job0", "operation": "read", "action": "report"}
    ]
    assert rec.data("BLOCK_JOB_COMPLETED") == [
        {"type": "stream", "device": "job0", "len": 8 * CHUNK, "offset": CHUNK, "speed": 0,
         "error": "Input/output error"},
    ]  # fmt: skip
    assert job.calls == ["run", "abort", "clean"]  # no prepare: the chain is kept
    info = manager.query_block_jobs()[0]
    assert (info["io-status"], info["error"]) == ("ok", "Input/output error")


async def test_on_error_ignore(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(on_error="ignore", failures={CHUNK: [eio()], 3 * CHUNK: [enospc()]})
    await job.wait_ended()
    assert rec.names() == [
        "JSC(created)", "JSC(running)", "BLOCK_JOB_ERROR", "BLOCK_JOB_ERROR",
        "JSC(aborting)", "BLOCK_JOB_COMPLETED", "JSC(concluded)", "JSC(null)",
    ]  # fmt: skip
    assert {e["action"] for e in rec.data("BLOCK_JOB_ERROR")} == {"ignore"}
    (done,) = rec.data("BLOCK_JOB_COMPLETED")
    # The failed chunks count as done; the first error is the job's result.
    assert (done["offset"], done["len"], done["error"]) == (
        8 * CHUNK, 8 * CHUNK, "Input/output error",
    )  # fmt: skip
    assert job.copied == [0, 2 * CHUNK, 4 * CHUNK, 5 * CHUNK, 6 * CHUNK, 7 * CHUNK]
    assert job.calls == ["run", "abort", "clean"]
    assert job.io_status == "ok"


@pytest.mark.parametrize(
    ("on_error", "make_error", "io_status"),
    [
        ("stop", eio, "failed"),
        ("stop", enospc, "nospace"),
        ("enospc", enospc, "nospace"),
        ("auto", enospc, "nospace"),
    ],
)
async def test_on_error_stop_then_resume_retries(
    autojump_clock: MockClock,
    manager: JobManager, rec: Recorder, make_job: Any, on_error: str, make_error: Any,
    io_status: str,
) -> None:  # fmt: skip
    job = make_job(on_error=on_error, failures={2 * CHUNK: [make_error()]})
    await trio.sleep(100)
    assert rec.names() == ["JSC(created)", "JSC(running)", "BLOCK_JOB_ERROR", "JSC(paused)"]
    assert rec.data("BLOCK_JOB_ERROR")[0]["action"] == "stop"
    info = manager.query_block_jobs()[0]
    assert (info["status"], info["paused"], info["busy"], info["io-status"], info["offset"]) == (
        "paused", True, False, io_status, 2 * CHUNK,
    )  # fmt: skip
    assert job.user_paused
    rec.clear()
    job.resume()
    rec.mark("reply")
    assert job.io_status == "ok"
    await job.wait_ended()
    assert rec.names() == ["JSC(running)", "--reply", *DONE]
    (done,) = rec.data("BLOCK_JOB_COMPLETED")
    assert "error" not in done and done["offset"] == done["len"]
    assert job.copied == [i * CHUNK for i in range(8)]  # the failed chunk was retried


@pytest.mark.parametrize("on_error", ["enospc", "auto"])
async def test_enospc_policies_report_other_errors(
    autojump_clock: MockClock, rec: Recorder, make_job: Any, on_error: str
) -> None:
    job = make_job(on_error=on_error, failures={0: [eio()]})
    await job.wait_ended()
    assert rec.data("BLOCK_JOB_ERROR")[0]["action"] == "report"
    assert rec.data("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
    assert rec.data("BLOCK_JOB_COMPLETED")[0]["offset"] == 0


async def test_stopped_job_cancelled(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(on_error="stop", failures={CHUNK: [eio()]})
    await trio.sleep(100)
    assert job.status == "paused" and job.io_status == "failed"
    rec.clear()
    await job.cancel()
    rec.mark("reply")
    assert job.io_status == "ok"  # the cancel lifts the user pause and its io-status
    assert rec.names() == ["JSC(running)", *CANCELLED, "--reply"]


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (OSError(errno.ENOSPC, "x"), "No space left on device"),
        (OSError(errno.EPERM, "x"), "Operation not permitted"),
        (OSError(errno.EINVAL, "x"), "Invalid argument"),
    ],
)
async def test_prepare_failure(
    autojump_clock: MockClock,
    manager: JobManager,
    rec: Recorder,
    make_job: Any,
    error: OSError,
    text: str,
) -> None:
    job = make_job(prepare_error=error)
    await job.wait_ended()
    assert rec.names() == [
        "JSC(created)", "JSC(running)", "JSC(waiting)", "JSC(pending)", "JSC(aborting)",
        "BLOCK_JOB_COMPLETED", "JSC(concluded)", "JSC(null)",
    ]  # fmt: skip
    assert rec.data("BLOCK_JOB_COMPLETED")[0]["error"] == text
    assert job.calls == ["run", "prepare", "abort", "clean"]


# ------------------------------------------------------------------- rate limiting


async def test_rate_limit_long_run(autojump_clock: MockClock, make_job: Any) -> None:
    speed = 1024 * 1024
    job = make_job(size=64 * CHUNK, speed=speed)
    await job.wait_ended()
    times = job.copy_times
    assert times[0] == 0  # the first chunk is not delayed
    rate = (len(times) - 1) * CHUNK / (times[-1] - times[0])
    assert abs(rate - speed) / speed < 0.02
    # Each later chunk waits for the previous one's debt: 0.5 s at 1 MiB/s.
    assert times[1] == pytest.approx(0.5, abs=1e-3)


async def test_unlimited_still_yields(autojump_clock: MockClock, make_job: Any) -> None:
    """At speed 0 the job still yields before every chunk: other tasks run in between."""
    job = make_job(size=32 * CHUNK)
    seen: list[int] = []
    while len(job.copied) < 32:
        seen.append(len(job.copied))
        await trio.lowlevel.checkpoint()
    assert len(set(seen)) > 8
    await job.wait_ended()
    assert trio.current_time() == pytest.approx(0.001)  # only FakeJob.prepare's I/O


async def test_set_speed_zero_wakes_a_sleeper(autojump_clock: MockClock, make_job: Any) -> None:
    job = make_job(speed=1024)  # ~514 s of debt after the first chunk
    await trio.sleep(1)
    assert job.copied == [0] and not job.busy
    job.set_speed(0)
    assert job.busy  # woken within the command
    await job.wait_ended()
    assert trio.current_time() == pytest.approx(1.001)


async def test_raising_the_speed_wakes_and_recomputes(
    autojump_clock: MockClock, make_job: Any
) -> None:
    job = make_job(speed=1024)
    await trio.sleep(1)
    job.set_speed(1024 * 1024)
    assert job.speed == 1024 * 1024
    await trio.sleep(0)
    await trio.testing.wait_all_tasks_blocked()
    # 524288 bytes at the new quota is 0.5 s from the slice start, already past: go on.
    assert job.copied == [0, CHUNK]
    await job.wait_ended()
    assert trio.current_time() == pytest.approx(1 + 6 * 0.5 + 0.001, abs=1e-4)


async def test_lowering_the_speed_does_not_wake(autojump_clock: MockClock, make_job: Any) -> None:
    job = make_job(speed=CHUNK)  # 1 s per chunk
    await trio.sleep(0.25)
    job.set_speed(CHUNK // 2)
    assert not job.busy  # still asleep: the current sleep runs to its end
    await trio.sleep(0.7)
    assert job.copied == [0]
    # At t=1.0 the job wakes and recomputes against the new quota: 2 s per chunk in all.
    await trio.sleep(0.1)
    assert job.copied == [0]
    await trio.sleep(1.1)
    assert job.copied == [0, CHUNK]


async def test_speed_in_queries_and_events(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(speed=4096)
    assert manager.query_block_jobs()[0]["speed"] == 4096
    job.set_speed(0)
    await job.wait_ended()
    assert rec.data("BLOCK_JOB_COMPLETED")[0]["speed"] == 0


async def test_negative_speed(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job()
    with pytest.raises(RequestError, match=r"^Parameter 'speed' expects a non-negative value$"):
        job.set_speed(-1)
    assert job.speed == 0


# ------------------------------------------------------------------ corner cases


async def test_cancel_of_a_job_never_started(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder
) -> None:
    job = FakeJob(manager, "job0")
    manager.create(job)
    await job.cancel()
    # No completion event for a job that never ran (QEMU job_finalize_single).
    assert rec.names() == ["JSC(created)", "JSC(aborting)", "JSC(concluded)", "JSC(null)"]
    assert job.calls == ["abort", "clean"]
    assert manager.jobs == {}


async def test_paused_before_start(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder
) -> None:
    job = FakeJob(manager, "job0")
    manager.create(job)
    job.pause()
    assert job.block_job_info()["paused"]
    job.start()
    await trio.sleep(10)
    assert job.copied == [] and job.status == "paused"
    job.resume()
    await job.wait_ended()
    assert rec.names() == ["JSC(created)", "JSC(running)", "JSC(paused)", "JSC(running)",
                           *DONE]  # fmt: skip


async def test_daemon_nursery_torn_down(autojump_clock: MockClock, rec: Recorder) -> None:
    """Not the orderly shutdown (cancel_all) but a cancelled nursery: the job still
    aborts and cleans up, shielded for a bounded time, and the cancel propagates."""
    jobs = []
    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            manager = JobManager(rec_bus(rec))
            manager.attach(nursery)
            for name, options in [("busy", {"io_seconds": 10.0}), ("paused", {"speed": CHUNK})]:
                job = FakeJob(manager, name, **options)
                manager.create(job)
                job.start()
                jobs.append(job)
            await trio.sleep(0.5)
            jobs[1].pause()
            outer.cancel()
    for job in jobs:
        assert job.status == "null"
        assert job.calls[-2:] == ["abort", "clean"]
    assert len(rec.data("BLOCK_JOB_CANCELLED")) == 2


async def test_cancel_all_drains_then_cancels_newest_first(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder
) -> None:
    """The transcript qemu-storage-daemon 10.0 gives on ``quit`` with a user-paused job A
    and a sleeping job B (newer): B is drained (paused), then each job in turn is
    cancelled and finished, newest first."""
    jobs = {}
    for name in ("jobA", "jobB"):
        jobs[name] = FakeJob(manager, name, speed=1024)
        manager.create(jobs[name])
        jobs[name].start()
    await trio.sleep(1)
    jobs["jobA"].pause()
    rec.clear()
    await manager.cancel_all()
    got = [
        f"{data['id']}:{data['status']}" if name == "JOB_STATUS_CHANGE" else
        f"{name}:{data['device']}"
        for name, data in rec.items
    ]  # fmt: skip
    assert got == [
        "jobB:paused",
        "jobB:running", "jobB:aborting", "BLOCK_JOB_CANCELLED:jobB", "jobB:concluded",
        "jobB:null",
        "jobA:running", "jobA:aborting", "BLOCK_JOB_CANCELLED:jobA", "jobA:concluded",
        "jobA:null",
    ]  # fmt: skip


async def test_drain_waits_for_a_busy_job(
    autojump_clock: MockClock, manager: JobManager, rec: Recorder, make_job: Any
) -> None:
    job = make_job(io_seconds=1.0)
    await trio.sleep(0.25)
    await job.drain()
    assert trio.current_time() == pytest.approx(1.0)  # the chunk in flight finished first
    assert job.status == "paused" and not job.busy and job.copied == [0]
