"""The lock that keeps a node's requests apart, taken without a detour when free.

``trio.Lock`` passes through the scheduler on every acquire, free or not (a checkpoint
for cancellation and fairness). The block layer takes several such locks per request
(the copy-on-read filter's, each qcow2 layer's), and the request itself then waits for a
worker thread, which is a checkpoint anyway; the extra scheduler rounds cost more than a
stream step's own Python. :class:`RequestLock` takes a free lock at once and waits only
when another task holds it; ownership, FIFO hand-off and ``locked()`` are trio's.
"""

from __future__ import annotations

from types import TracebackType

import trio


class RequestLock:
    """A ``trio.Lock`` for ``async with`` that is taken without a checkpoint when free."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        """Whether some task holds the lock."""
        return self._lock.locked()

    async def __aenter__(self) -> None:
        # trio hands a released lock straight to its first waiter, so a free lock has
        # no waiters to overtake
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
