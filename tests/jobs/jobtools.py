"""Helpers for the job engine's tests: an event recorder and a fake copying job.

``FakeJob`` is a fake for unit tests of the engine only: it "copies" chunks of a pretend
image in memory, with optional simulated I/O time and injected ``OSError``s at chosen
offsets. The stream job is tested on real images elsewhere (tests/stream).
"""

from __future__ import annotations

from typing import Any, ClassVar

import trio

from blockd.events import EventBus
from blockd.jobs.job import Job
from blockd.jobs.manager import JobManager

CHUNK = 512 * 1024


class Recorder:
    """Collects ``(event, data)`` pairs from a bus, plus markers the test inserts."""

    def __init__(self, bus: EventBus) -> None:
        self.items: list[tuple[str, Any]] = []
        self.bus = bus
        bus.subscribe(lambda ev: self.items.append((ev["event"], ev.get("data"))))

    def mark(self, label: str) -> None:
        """Insert a marker (e.g. a command's reply) into the sequence."""
        self.items.append(("--", label))

    def names(self, job_id: str | None = None) -> list[str]:
        """Compact view: ``JSC(status)``, event names, ``--label`` markers."""
        out = []
        for name, data in self.items:
            if name == "--":
                out.append(f"--{data}")
            elif name == "JOB_STATUS_CHANGE":
                if job_id is None or data["id"] == job_id:
                    out.append(f"JSC({data['status']})")
            elif job_id is None or job_id in (data.get("device"), data.get("id")):
                out.append(name)
        return out

    def data(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.items if n == name]

    def clear(self) -> None:
        self.items.clear()


class FakeJob(Job):
    """Copies ``size`` bytes in ``chunk`` steps; see the module docstring.

    Args:
        failures: offset → errors to raise (one per attempt) when that chunk is copied.
        io_seconds: simulated I/O time per chunk (the job is busy meanwhile).
        prepare_error: raised by :meth:`prepare`.
        prepare_seconds: simulated I/O time of :meth:`prepare`.
        raise_first: re-raise the first handled error from ``run()`` (as the stream job
            does) instead of relying on the engine remembering it.
    """

    job_type: ClassVar[str] = "stream"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        *,
        size: int = 8 * CHUNK,
        chunk: int = CHUNK,
        failures: dict[int, list[OSError]] | None = None,
        io_seconds: float = 0.0,
        prepare_error: BaseException | None = None,
        prepare_seconds: float = 0.001,
        raise_first: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(manager, job_id, **options)
        self.size = size
        self.chunk = chunk
        self.failures = failures or {}
        self.io_seconds = io_seconds
        self.prepare_error = prepare_error
        self.prepare_seconds = prepare_seconds
        self.raise_first = raise_first
        self.copied: list[int] = []
        self.copy_times: list[float] = []
        self.calls: list[str] = []

    async def run(self) -> None:
        self.calls.append("run")
        self.set_total(self.size)
        offset = 0
        first: OSError | None = None
        while offset < self.size:
            await self.rate_limit_sleep()
            n = min(self.chunk, self.size - offset)
            try:
                if self.io_seconds:
                    await trio.sleep(self.io_seconds)
                pending = self.failures.get(offset)
                if pending:
                    raise pending.pop(0)
                self.copied.append(offset)
                self.copy_times.append(trio.current_time())
            except OSError as exc:
                action = await self.handle_io_error(exc)
                if action == "retry":
                    continue
                first = first or exc
                if action == "report":
                    break
            offset += n
            self.advance(n)
            self.charge(n)
        if self.raise_first and first is not None:
            raise first

    async def prepare(self) -> None:
        self.calls.append("prepare")
        await trio.sleep(self.prepare_seconds)  # finalisation does I/O too
        if self.prepare_error is not None:
            raise self.prepare_error

    async def abort(self) -> None:
        self.calls.append("abort")

    async def clean(self) -> None:
        self.calls.append("clean")
