"""Random verb sequences against the engine: whatever a client does, the job's event
stream stays a legal walk of the state table, the completion machinery runs once, and
every job ends (hypothesis, under trio's mock clock)."""

from __future__ import annotations

import errno
import logging
from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.fakes import CHUNK, FakeJob
from kit.qmp import Recorder

from blockd.errors import RequestError
from blockd.events import EventBus
from blockd.jobs.manager import JobManager
from blockd.jobs.state import TRANSITIONS, JobStatus

VERBS = ["pause", "resume", "cancel", "set-speed", "finalize", "dismiss", "complete", "query"]

steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.01, 0.1, 0.4, 1.0, 3.0]),
        st.sampled_from(VERBS),
        st.sampled_from([0, 1024, CHUNK, 8 * CHUNK]),
    ),
    max_size=12,
)
options = st.fixed_dictionaries(
    {
        "speed": st.sampled_from([0, CHUNK, 2 * CHUNK]),
        "on_error": st.sampled_from(["report", "ignore", "stop", "enospc", "auto"]),
        "auto_finalize": st.booleans(),
        "auto_dismiss": st.booleans(),
        "io_seconds": st.sampled_from([0.0, 0.05, 0.3]),
        "fail": st.sampled_from([None, errno.EIO, errno.ENOSPC]),
    }
)


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def scenario(opts: dict[str, Any], script: list[tuple[float, str, int]]) -> Recorder:
    bus = EventBus()
    rec = Recorder(bus)
    fail = opts.pop("fail")
    failures = {2 * CHUNK: [OSError(fail, "injected")]} if fail else {}
    async with trio.open_nursery() as nursery:
        manager = JobManager(bus)
        manager.attach(nursery)
        job = FakeJob(manager, "job0", failures=failures, **opts)
        manager.create(job)
        job.start()
        for delay, verb, speed in script:
            await trio.sleep(delay)
            try:
                match verb:
                    case "pause":
                        job.pause()
                    case "resume":
                        job.resume()
                    case "cancel":
                        await job.cancel()
                    case "set-speed":
                        job.set_speed(speed)
                    case "finalize":
                        await job.finalize()
                    case "dismiss":
                        job.dismiss()
                    case "complete":
                        job.complete()
                    case "query":
                        info = job.block_job_info()
                        assert info["paused"] == (job.pause_count > 0)
                        if info["status"] == "paused":
                            assert not info["busy"]
                        if "error" in info:
                            assert info["status"] in ("aborting", "concluded", "null")
                        if info["status"] == "concluded" and job.cancelled:
                            # "Operation canceled", or an error remembered before (ignore)
                            assert "error" in info
            except RequestError:
                pass
        await manager.cancel_all()
        assert job.status in (JobStatus.CONCLUDED, JobStatus.NULL)
        assert (job.status is JobStatus.NULL) == (job.id not in manager.jobs)
    return rec


@settings(max_examples=150, deadline=None)
@given(opts=options, script=steps)
def test_random_verbs_keep_the_machine_legal(
    opts: dict[str, Any], script: list[tuple[float, str, int]]
) -> None:
    errors = Errors()
    logging.getLogger("blockd").addHandler(errors)
    auto_finalize = opts["auto_finalize"]
    try:
        rec = trio.run(scenario, dict(opts), script,
                       clock=trio.testing.MockClock(autojump_threshold=0))  # fmt: skip
    finally:
        logging.getLogger("blockd").removeHandler(errors)
    assert errors.records == []
    names = rec.names()
    # The statuses announced form a walk of the transition table.
    status = JobStatus.UNDEFINED
    for name in names:
        if name.startswith("JSC("):
            new = JobStatus(name[4:-1])
            assert new in TRANSITIONS[status] and new is not status, (status, new, names)
            status = new
    # Exactly one completion event, right before "concluded".
    done = [n for n in names if n in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
    assert len(done) == 1, names
    assert names[names.index(done[0]) + 1] == "JSC(concluded)"
    if "BLOCK_JOB_PENDING" in names:
        assert not auto_finalize
        assert names[names.index("BLOCK_JOB_PENDING") - 1] == "JSC(pending)"
