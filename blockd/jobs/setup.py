"""Set-up with rollback: each step done pushes its undo; a failure undoes them all.

A job's set-up changes the graph in several steps (reopen a node, insert a filter, freeze
links, register the job, take permissions), and any step may fail. Each step that has
been done pushes the function that undoes it; if a later step raises, :class:`UndoStack`
runs the undos newest first, then lets the error go on. On success the undos are dropped:
the job's own completion (``abort``/``clean``) releases what it holds from then on.

Rules:

* Push the undo right after its step succeeded, or before a step that may stop half-way
  and whose undo copes with a partial result (idempotent releases).
* An undo that raises is logged and the rest still run: the first error is what the
  request reports, never the rollback's.
* The rollback is shielded (a client that goes away or a shutdown cannot leave half a
  set-up behind) and bounded by :data:`ROLLBACK_SECONDS`; past it the remaining undos
  are skipped with an error in the log.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final

import trio

log = logging.getLogger(__name__)

#: The longest a rollback may take. Undos are graph changes that may flush or close an
#: image; a hung disk must not hang the command (or the shutdown waiting for it).
ROLLBACK_SECONDS: Final = 10.0

Undo = Callable[[], Awaitable[None] | None]


class UndoStack:
    """The undos of the steps done so far; an async context manager.

    ``async with UndoStack("stream job 'j'") as undo:`` runs the steps; each calls
    ``undo.push(fn, what)`` once its step is done. Leaving the block by an exception
    (``trio.Cancelled`` included) runs every undo, newest first, then re-raises; leaving
    it normally drops them.

    Args:
        owner: who the steps are for, for the log.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._undos: list[tuple[Undo, str]] = []

    def push(self, undo: Undo, what: str) -> None:
        """Remember ``undo`` (sync or async, no arguments) for the step ``what``."""
        self._undos.append((undo, what))

    def __len__(self) -> int:
        return len(self._undos)

    async def rollback(self) -> None:
        """Run every undo pushed, newest first, and forget them.

        Shielded from cancellation and bounded by :data:`ROLLBACK_SECONDS`: past the
        deadline the undos not yet run are skipped and logged. Undo errors are logged,
        never raised.
        """
        undos, self._undos = self._undos, []
        current = ""
        with trio.CancelScope(shield=True), trio.move_on_after(ROLLBACK_SECONDS) as bound:
            while undos:
                undo, current = undos.pop()
                try:
                    result = undo()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("%s: undoing %s failed", self.owner, current)
        if bound.cancelled_caught:
            skipped = ", ".join(what for _, what in reversed(undos)) or "none"
            log.error(
                "%s: rollback did not finish within %gs (stuck on: %s; skipped: %s)",
                self.owner,
                ROLLBACK_SECONDS,
                current,
                skipped,
            )

    async def __aenter__(self) -> UndoStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._undos.clear()
        else:
            await self.rollback()
