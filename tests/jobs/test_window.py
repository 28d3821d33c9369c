"""The step window of a job's run loop: steps run at once, accounted for in order."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from blockd.jobs.window import StepWindow


async def test_finished_steps_are_settled_in_offset_order() -> None:
    gates = [trio.Event() for _ in range(3)]

    def io(k: int) -> Callable[[int, int], Awaitable[None]]:
        async def run(offset: int, length: int) -> None:
            await gates[k].wait()

        return run

    async with trio.open_nursery() as nursery:
        window = StepWindow(nursery, depth=3)
        window.add_copy(0, 10, io(0), merge_limit=10)
        window.add_done(10, 5)  # a skipped step between two copies
        window.add_copy(15, 10, io(1), merge_limit=10)
        window.start_open()
        assert window.full and len(window) == 3
        gates[1].set()  # the later copy finishes first: nothing to account yet
        await trio.testing.wait_all_tasks_blocked()
        assert window.settle() == (0, None)
        gates[0].set()
        await window.wait_head()
        await trio.testing.wait_all_tasks_blocked()
        assert window.settle() == (25, None)
        assert len(window) == 0


async def test_a_failure_stops_settling_and_drain_drops_the_rest() -> None:
    async def fail(offset: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    later = trio.Event()

    async def slow(offset: int, length: int) -> None:
        await later.wait()

    async with trio.open_nursery() as nursery:
        window = StepWindow(nursery, depth=4)
        window.add_done(0, 4)
        window.add_copy(4, 4, fail, merge_limit=4)
        window.add_copy(8, 4, slow, merge_limit=4)
        window.start_open()
        await trio.testing.wait_all_tasks_blocked()
        done, failed = window.settle()
        assert done == 4 and failed is not None
        assert (failed.offset, failed.length) == (4, 4)
        assert failed.error is not None and failed.error.errno == errno.EIO
        nursery.start_soon(_set_later, later)
        await window.drain()  # waits for the copy after the failure, then drops it
        assert later.is_set() and len(window) == 0


async def _set_later(event: trio.Event) -> None:
    await trio.sleep(0.01)
    event.set()


async def test_a_failed_decision_is_settled_like_a_failed_copy() -> None:
    async with trio.open_nursery() as nursery:
        window = StepWindow(nursery, depth=2)
        window.add_done(0, 8, OSError(errno.EIO, "Input/output error"))
        done, failed = window.settle()
        assert done == 0 and failed is not None and failed.offset == 0


async def test_other_exceptions_fail_the_nursery() -> None:
    async def broken(offset: int, length: int) -> None:
        raise ValueError("not an I/O error")

    try:
        async with trio.open_nursery() as nursery:
            window = StepWindow(nursery, depth=2)
            window.add_copy(0, 1, broken, merge_limit=1)
            window.start_open()
    except* ValueError:
        pass
    else:
        raise AssertionError("the ValueError was swallowed")


async def test_adjacent_copies_merge_up_to_the_limit() -> None:
    calls: list[tuple[int, int]] = []

    async def io(offset: int, length: int) -> None:
        calls.append((offset, length))

    async with trio.open_nursery() as nursery:
        window = StepWindow(nursery, depth=8)
        for k in range(5):  # 5 adjacent copies of 4: merged as 12 + 8
            window.add_copy(4 * k, 4, io, merge_limit=12)
        window.add_copy(24, 4, io, merge_limit=12)  # not adjacent: a step of its own
        window.add_done(28, 4)  # a skip starts the open copy
        assert len(window) == 4
        first = window._steps[0]
        assert (first.offset, first.length, first.first_length) == (0, 12, 4)
        await window.drain()
    assert sorted(calls) == [(0, 12), (12, 8), (24, 4)]
