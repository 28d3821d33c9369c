"""The daemon's state: what every command handler acts on."""

from __future__ import annotations

import trio

from blockd.block.graph import Graph
from blockd.events import EventBus
from blockd.jobs.manager import JobManager


class Daemon:
    """The block graph, the jobs and the event bus of one blockd process.

    Use :meth:`run` as the body of the daemon's top-level task: it gives the job manager
    its nursery and, on shutdown, cancels jobs and closes every image.
    """

    def __init__(self) -> None:
        self.events = EventBus()
        self.graph = Graph(self.events)
        self.jobs = JobManager(self.events)
        self._shutdown = trio.Event()

    def request_shutdown(self) -> None:
        """Ask the daemon to stop (``quit``, SIGTERM); returns at once."""
        self._shutdown.set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    async def aclose(self) -> None:
        """Cancel running jobs, then flush and close every node."""
        await self.jobs.cancel_all()
        await self.graph.close_all()
