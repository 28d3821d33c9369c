"""One job set-up at a time: the lock around the commands that start block jobs.

QEMU runs a command's checks and its graph changes without interruption. Here a job's
set-up awaits (a reopen, a filter's open), so a second ``block-stream`` or
``block-commit`` must not pass its busy checks before the first has blocked its nodes:
every handler that sets up a job is wrapped in :func:`one_setup_at_a_time`, which holds
one lock per daemon around it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from blockd.daemon import Daemon

_SETUP_LOCKS: weakref.WeakKeyDictionary[Daemon, trio.Lock] = weakref.WeakKeyDictionary()


def one_setup_at_a_time(
    handler: Callable[..., Awaitable[dict[str, Any]]],
) -> Callable[..., Awaitable[dict[str, Any]]]:
    """Run ``handler`` under the daemon's job set-up lock."""

    @functools.wraps(handler)
    async def serialized(d: Daemon, **arguments: Any) -> dict[str, Any]:
        async with _SETUP_LOCKS.setdefault(d, trio.Lock()):
            return await handler(d, **arguments)

    return serialized
