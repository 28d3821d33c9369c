"""The daemon's state: what every command handler acts on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from blockd.block.graph import Graph
from blockd.events import EventBus
from blockd.jobs.manager import JobManager

if TYPE_CHECKING:
    from blockd.qmp.schema import Schema


class Daemon:
    """The block graph, the jobs and the event bus of one blockd process.

    Use :meth:`run` as the body of the daemon's top-level task: it gives the job manager
    its nursery and, on shutdown, cancels jobs and closes every image.

    Args:
        schema: the QMP schema; loaded from ``schema/`` on first use when not given.
    """

    def __init__(self, schema: Schema | None = None) -> None:
        self.events = EventBus()
        self.graph = Graph()
        self.graph.corruption_sink = self._image_corrupted
        self.jobs = JobManager(self.events)
        self._schema = schema
        self._shutdown = trio.Event()
        self._jobs_hung = False

    def _image_corrupted(self, node_name: str, message: str) -> None:
        """QEMU's ``qapi_event_send_block_image_corrupted`` for a node without a device:
        blockd never marks an image corrupt (it writes nothing to a broken image), so
        the corruption is never ``fatal``."""
        self.events.emit(
            "BLOCK_IMAGE_CORRUPTED",
            {"device": "", "node-name": node_name, "msg": message, "fatal": False},
        )

    @property
    def schema(self) -> Schema:
        """The QMP contract (``schema/``), loaded once."""
        if self._schema is None:
            from blockd.qmp.schema import Schema

            self._schema = Schema.load()
        return self._schema

    def request_shutdown(self) -> None:
        """Ask the daemon to stop (``quit``, SIGTERM); returns at once."""
        self.jobs.begin_shutdown()
        self._shutdown.set()

    async def wait_shutdown_begun(self) -> None:
        """Wait until a shutdown began: :meth:`request_shutdown`, or ``quit`` starting to
        cancel the jobs (before its reply, so before it requests the shutdown)."""
        await self.jobs.wait_shutdown_begun()

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the job nursery until shutdown is requested, then :meth:`aclose`.

        Reports started once jobs can be run. Returns after every job has ended and every
        image is closed. Cancelled from outside, it still cancels the jobs (they live in
        its nursery) but images are then closed only if :meth:`aclose` is called.
        """
        async with trio.open_nursery() as nursery:
            self.jobs.attach(nursery)
            task_status.started()
            await self.wait_shutdown()
            await self.aclose()
            nursery.cancel_scope.cancel()

    def set_shutdown_seconds(self, seconds: float) -> None:
        """Bound each shutdown step by ``seconds``: the cancel of every job
        (:attr:`JobManager.cancel_seconds`) and each node's flush and close
        (:attr:`Graph.close_seconds`)."""
        self.jobs.cancel_seconds = seconds
        self.graph.close_seconds = seconds

    @property
    def data_safe(self) -> bool:
        """Every job ended and every node closed was flushed within its deadline."""
        return not self._jobs_hung and not self.graph.unflushed

    async def aclose(self) -> None:
        """Cancel running jobs, then flush and close every node.

        Never hangs on storage that stopped answering: the cancel is bounded by
        :attr:`JobManager.cancel_seconds`, each node by :attr:`Graph.close_seconds`;
        what does not finish is logged as an error and :attr:`data_safe` turns False.
        Closing continues with the other nodes either way.
        """
        if not await self.jobs.cancel_all():
            self._jobs_hung = True
        await self.graph.close_all()
