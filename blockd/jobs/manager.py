"""The daemon's jobs.

``JobManager`` owns the daemon-wide nursery that runs every job: the one place a nursery
crosses tasks, so that a job outlives the connection whose command started it.
"""

from __future__ import annotations

from typing import Any

import trio

from blockd.events import EventBus


class JobManager:
    """Every job the daemon knows, newest first in queries."""

    def __init__(self, events: EventBus) -> None:
        self.events = events
        self.jobs: dict[str, Any] = {}
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Run jobs in ``nursery`` from now on (the daemon's top-level nursery)."""
        self._nursery = nursery

    async def cancel_all(self) -> None:
        """Cancel every running job and wait until each has ended."""
