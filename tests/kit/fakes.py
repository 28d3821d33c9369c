"""Fakes for the unit tests of the job engine: :class:`FakeJob`.

It "copies" chunks of a pretend image in memory, with optional simulated I/O time and
injected ``OSError``s at chosen offsets; it serves the engine's unit tests only. The stream
job is tested on real images elsewhere (tests/stream).
"""

from __future__ import annotations

from typing import Any, ClassVar

import trio

from blockd.jobs.job import Job
from blockd.jobs.manager import JobManager

CHUNK = 512 * 1024


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
