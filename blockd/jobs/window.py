"""Steps of a job's run loop in flight at once, accounted for in order.

A copy step waits for a worker thread; while it does, the event loop can already decide
the next steps and start their copies, so the worker never idles between two steps and
the hand-off latency between threads is hidden. :class:`StepWindow` keeps those steps:
each is started as a task, and the loop takes their results back strictly in offset
order, so progress, error handling and retries see the same sequence of steps as a loop
that copies one step at a time.

Rules:

* At most ``depth`` steps are queued (finished or not) before the loop must wait.
* Copies of adjacent steps merge (:meth:`add_copy`) into one step of up to its
  ``merge_limit`` bytes: one task and one worker-thread call instead of several. The
  merged step starts once a step that does not continue it is queued, or the loop
  waits (:meth:`wait_head`, :meth:`drain`, :meth:`start_open`).
* :meth:`settle` pops the finished steps at the head of the queue; a failed one stops
  it there. The loop then calls :meth:`drain`: the steps after the failure finish and
  are dropped unaccounted, to be decided again (a copy that did land is then found
  allocated and skipped, so nothing is counted twice).
* A step's task records an ``OSError`` (the on-error policy decides about it); any
  other exception fails the whole nursery, as it would fail a one-step loop.

:func:`run_steps` is the run loop that stream and commit jobs share on top of it.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from blockd.jobs.job import Job


@dataclass(eq=False)
class Step:
    """One step: ``length`` bytes at ``offset``; ``error`` once its I/O failed.
    ``first_length`` is the length of the first of the steps merged into it."""

    offset: int
    length: int
    first_length: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None


class StepWindow:
    """Up to ``depth`` steps of a run loop, their I/O running as tasks of ``nursery``."""

    def __init__(self, nursery: trio.Nursery, depth: int) -> None:
        self._nursery = nursery
        self.depth = max(1, depth)
        self._steps: deque[Step] = deque()
        #: the last queued copy while it may still grow, and its I/O
        self._open: tuple[Step, Callable[[int, int], Awaitable[None]]] | None = None

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.depth

    def add_done(self, offset: int, length: int, error: OSError | None = None) -> None:
        """Queue a step that needed no I/O (skipped), or whose decision failed."""
        self.start_open()
        step = Step(offset, length, length, error=error)
        step.done.set()
        self._steps.append(step)

    def add_copy(
        self,
        offset: int,
        length: int,
        io: Callable[[int, int], Awaitable[None]],
        merge_limit: int,
    ) -> None:
        """Queue a step whose I/O is ``io(offset, length)``, merged into the previous
        step when that is a copy not yet started that ends at ``offset`` and the two
        together stay within ``merge_limit`` bytes."""
        if self._open is not None:
            last = self._open[0]
            if last.offset + last.length == offset and last.length + length <= merge_limit:
                last.length += length
                return
            self.start_open()
        step = Step(offset, length, length)
        self._steps.append(step)
        self._open = (step, io)

    def start_open(self) -> None:
        """Start the I/O of the last queued copy, if it has not started yet."""
        if self._open is not None:
            step, io = self._open
            self._open = None
            run = functools.partial(io, step.offset, step.length)
            self._nursery.start_soon(self._run, step, run)

    @staticmethod
    async def _run(step: Step, io: Callable[[], Awaitable[None]]) -> None:
        try:
            await io()
        except OSError as exc:
            step.error = exc
        finally:
            step.done.set()

    def settle(self) -> tuple[int, Step | None]:
        """Pop the finished steps at the head: the bytes they did, and the first failed
        step (popped too), where popping stopped."""
        done = 0
        while self._steps and self._steps[0].done.is_set():
            step = self._steps.popleft()
            if step.error is not None:
                return done, step
            done += step.length
        return done, None

    async def wait_head(self) -> None:
        """Wait until the oldest queued step has finished."""
        self.start_open()
        if self._steps:
            await self._steps[0].done.wait()

    async def drain(self) -> None:
        """Wait for every queued step to finish, then drop them all unaccounted."""
        self.start_open()
        for step in list(self._steps):
            await step.done.wait()
        self._steps.clear()


async def run_steps(
    job: Job,
    window: StepWindow,
    length: int,
    *,
    merge: int,
    step: Callable[[int, int], Awaitable[int]],
    failed: Callable[[Step], Awaitable[int | None]],
) -> None:
    """The run loop of a job that walks ``length`` bytes in steps, up to
    ``window.depth`` of them in flight (QEMU's one-step loops of ``block/stream.c`` and
    ``block/commit.c``, with the same progress, pause, cancel, rate-limit and error
    points).

    ``step(offset, merge_limit)`` decides the step at ``offset``, queues it in
    ``window`` (a copy merged with the one before up to ``merge_limit`` bytes, 0: not
    merged) and returns its length. Progress advances by each step as it is settled,
    in offset order. A pause, a cancel or a rate-limit sleep first waits for every step
    in flight. Where a merged copy failed, its steps are decided again one at a time,
    so that an error is reported for the step that has it; a failed step goes to
    ``failed(step)``, the job's ``on-error`` decision: ``None`` ends the loop (report),
    else the bytes to move on by, counted as progress (0: the step again).
    """
    offset = 0
    merge_from = 0  # adjacent copies merge from here on
    while True:
        done, bad = window.settle()
        job.advance(done)
        if bad is not None:
            await window.drain()
            offset = bad.offset
            if bad.length > bad.first_length:
                merge_from = bad.offset + bad.length
                continue
            skip = await failed(bad)
            if skip is None:
                return
            job.advance(skip)
            offset += skip
            continue
        # a pause, a cancel or a rate-limit sleep finds no copy in flight (and the
        # progress up to date), as in a one-step loop
        if window and (
            offset >= length
            or window.full
            or job.pause_count > 0
            or job.cancelled
            or job.rate_limited()
        ):
            await window.wait_head()
            continue
        if offset >= length:
            return
        await job.rate_limit_sleep()  # also the pause and cancel point
        offset += await step(offset, merge if offset >= merge_from else 0)
