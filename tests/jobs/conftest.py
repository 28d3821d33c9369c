"""Fixtures for the job engine's tests (its fake job: :mod:`kit.fakes`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
from kit.fakes import FakeJob
from kit.qmp import Recorder

from blockd.events import EventBus
from blockd.jobs.manager import JobManager


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def rec(bus: EventBus) -> Recorder:
    return Recorder(bus)


@pytest.fixture
async def manager(bus: EventBus) -> AsyncIterator[JobManager]:
    async with trio.open_nursery() as nursery:
        m = JobManager(bus)
        m.attach(nursery)
        yield m
        await m.cancel_all()


@pytest.fixture
def make_job(manager: JobManager) -> Iterator[Any]:
    def make(job_id: str = "job0", **kw: Any) -> FakeJob:
        job = FakeJob(manager, job_id, **kw)
        manager.create(job)
        job.start()
        return job

    yield make
