"""The set-up undo stack (``blockd/jobs/setup.py``): order, errors, cancellation, bound."""

from __future__ import annotations

import logging

import pytest
import trio
from trio.testing import MockClock

from blockd.jobs.setup import ROLLBACK_SECONDS, UndoStack


class Step(Exception):
    pass


async def test_a_failure_undoes_the_steps_done_newest_first() -> None:
    done: list[str] = []

    async def undo_async() -> None:
        await trio.lowlevel.checkpoint()
        done.append("b")

    with pytest.raises(Step):
        async with UndoStack("test") as undo:
            undo.push(lambda: done.append("a"), "a")
            undo.push(undo_async, "b")
            undo.push(lambda: done.append("c"), "c")
            raise Step
    assert done == ["c", "b", "a"]
    assert len(undo) == 0


async def test_success_drops_the_undos() -> None:
    done: list[str] = []
    async with UndoStack("test") as undo:
        undo.push(lambda: done.append("a"), "a")
    assert done == [] and len(undo) == 0


async def test_an_undo_that_fails_is_logged_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []

    def broken() -> None:
        raise RuntimeError("undo broke")

    with pytest.raises(Step):  # the step's error, never the rollback's
        async with UndoStack("stream job 'j'") as undo:
            undo.push(lambda: done.append("a"), "a")
            undo.push(broken, "the broken step")
            raise Step
    assert done == ["a"]
    assert "stream job 'j': undoing the broken step failed" in caplog.text


async def test_a_cancelled_set_up_is_undone_and_stays_cancelled(
    autojump_clock: MockClock,
) -> None:
    done: list[str] = []

    async def slow_undo() -> None:
        await trio.sleep(1)  # shielded: the cancel that stopped the set-up does not stop it
        done.append("a")

    with trio.CancelScope() as scope:
        async with UndoStack("test") as undo:
            undo.push(slow_undo, "a")
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught  # trio.Cancelled went on through the stack
    assert done == ["a"]


async def test_a_rollback_that_hangs_gives_up_at_its_deadline(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    done: list[str] = []
    start = trio.current_time()
    with pytest.raises(Step):
        async with UndoStack("stream job 'j'") as undo:
            undo.push(lambda: done.append("first"), "the first step")
            undo.push(trio.sleep_forever, "the hung step")
            raise Step
    assert trio.current_time() - start == pytest.approx(ROLLBACK_SECONDS)
    assert done == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"stream job 'j': rollback did not finish within {ROLLBACK_SECONDS:g}s "
        "(stuck on: the hung step; skipped: the first step)"
    ]
