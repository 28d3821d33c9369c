"""Write-behind: a written file's dirty pages go to the disk while writing goes on.

A stream writes the whole image and then, before it may rewrite the header, flushes it.
Left to the kernel, the written data sits dirty in the page cache until that flush, which
then waits for all of it at once (about half a second per GiB here). :class:`WriteBehind`
keeps the disk busy meanwhile: after every ``threshold`` bytes written, a worker thread
that nobody waits for starts the writeback of the file's dirty pages
(``sync_file_range(2)`` with ``SYNC_FILE_RANGE_WRITE``: the I/O is submitted, not
waited for, and no journal commit is forced); the final flush then finds little left to
do. Writing completed writes back earlier never breaks the ordering the qcow2 driver
relies on (its metadata only reaches the file after its flushes).

Where the C library has no ``sync_file_range`` the thread runs ``fdatasync(2)``
instead. A background call that fails keeps its error for the next flush, which raises
it: the kernel reports a writeback error to one sync call only, and that must not be
one that nobody hears.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Final

import trio
import trio.lowlevel

from blockd.block.host import io as hostio

#: bytes written between two background writebacks (measured on a 1 GiB stream here:
#: 4-16 MiB all leave the final flush a few ms; 256 MiB leaves it 140 ms)
THRESHOLD: Final = 8 * 1024 * 1024


class WriteBehind:
    """Background writeback of one file descriptor every ``threshold`` bytes."""

    def __init__(self, threshold: int = THRESHOLD) -> None:
        self.threshold = threshold
        self._written = 0
        self._idle = trio.Event()
        self._idle.set()
        self._error: OSError | None = None

    def wrote(self, fd: int, count: int) -> None:
        """Count ``count`` bytes written to ``fd``; start a writeback when enough piled
        up and none is running. Call from the trio thread."""
        self._written += count
        if self._written < self.threshold or not self._idle.is_set():
            return
        self._written = 0
        self._idle = trio.Event()
        idle = self._idle
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:  # in the worker thread: an outcome.Outcome
            error: OSError | None = None
            try:
                result.unwrap()
            except OSError as exc:
                error = exc
            with contextlib.suppress(trio.RunFinishedError):  # the run ended meanwhile
                token.run_sync_soon(self._finished, error, idle)

        trio.lowlevel.start_thread_soon(functools.partial(hostio.writeback_call(), fd), deliver)

    def _finished(self, error: OSError | None, idle: trio.Event) -> None:
        if error is not None and self._error is None:
            self._error = error
        idle.set()

    async def wait_idle(self) -> None:
        """Wait for a running writeback call; call before the descriptor is closed or
        replaced."""
        await self._idle.wait()

    def take_error(self) -> OSError | None:
        """The first error of a background call since the last time (then forgotten)."""
        error, self._error = self._error, None
        return error
