"""The filters commit jobs put above the image they commit: ``commit_top``, ``mirror_top``.

Neither can be opened with ``blockdev-add``; a job inserts one above its top image
(:meth:`Graph.insert_filter <blockd.block.graph.Graph.insert_filter>`) and removes it at
its end. Both sit on a ``backing`` child, show its data unchanged and are named by its
filename, as QEMU's ``block/commit.c`` and ``block/mirror.c`` filters are:

* ``commit_top`` (a non-active commit): takes no permission on the chain below and
  shares all, so that its parents keep consistent reads while the job writes into the
  base beneath them. Only reads pass: nothing above a non-active commit writes.
* ``mirror_top`` (an active commit, a mirror of the top into its base): reads and
  writes pass to the top, and each write that passed marks the job's dirty bitmap (the
  filter's own, not recording: :mod:`blockd.block.dirty`), so the job copies it. The filter
  forwards its parents' permissions without ``consistent read`` and shares ``write``;
  once the job :meth:`~MirrorTopDriver.stop` s it, it takes nothing, so the job can move
  the filter's parents onto the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import trio

from blockd.block.dirty import DirtyBitmap
from blockd.block.driver import BlockStatus, Driver
from blockd.block.node import BlockNode
from blockd.errors import RequestError


class _JobFilter(Driver):
    """A filter on a ``backing`` child, named by that child's filename."""

    is_filter: ClassVar[bool] = True
    child_role: ClassVar[str] = "backing"
    names_as_child: ClassVar[bool] = True

    @classmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> _JobFilter:
        if node.backing is None:
            raise RequestError("Parameter 'backing' is missing")
        return cls(node)

    @property
    def _child(self) -> BlockNode:
        child = self.node.backing
        assert child is not None, "the job filter's child is attached before open"
        return child

    def length(self) -> int:
        return self._child.length()

    @property
    def request_alignment(self) -> int:
        return self._child.driver.request_alignment

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._child.read(offset, buf)

    async def flush(self) -> None:
        await self._child.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._child.block_status(offset, length)


class CommitTopDriver(_JobFilter):
    """``commit_top``: a non-active commit's filter (reads only, takes nothing)."""

    format_name: ClassVar[str] = "commit_top"
    link_kind = "commit-top"


class MirrorTopDriver(_JobFilter):
    """``mirror_top``: an active commit's filter (reads and writes pass).

    The job drains it before it leaves the run loop (QEMU's ``bdrv_drained_begin`` on
    the source): writes that arrive meanwhile wait, writes in flight finish, and the
    job checks one last time that nothing is dirty. The waiting writes go on once the
    job ends the drain, into whatever the filter's child is then (the base after a
    pivot).
    """

    format_name: ClassVar[str] = "mirror_top"
    link_kind = "mirror-commit"

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self._writes = 0
        self._idle = trio.Event()
        self._idle.set()
        self._open = trio.Event()
        self._open.set()
        #: the job's record of what was written through the filter
        self.bitmap: DirtyBitmap | None = None

    async def _passing(self) -> None:
        if not self._open.is_set():
            await self._open.wait()
        if self._writes == 0:
            self._idle = trio.Event()
        self._writes += 1

    def _passed(self) -> None:
        self._writes -= 1
        if self._writes == 0:
            self._idle.set()

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._passing()
        try:
            await self._child.write(offset, data)
        finally:
            self._mark(offset, len(memoryview(data).cast("B")))
            self._passed()

    async def discard(self, offset: int, length: int) -> None:
        await self._passing()
        try:
            await self._child.discard(offset, length)
        finally:
            self._mark(offset, length)
            self._passed()

    def _mark(self, offset: int, length: int) -> None:
        """The job's bitmap is the filter's, and not recording: the filter marks every
        write that passed, failed ones too (part of it may have reached the top)."""
        if self.bitmap is not None:
            self.bitmap.set(offset, length)

    async def drain_begin(self) -> None:
        """Hold new writes back and wait for those in flight to finish."""
        if self._open.is_set():
            self._open = trio.Event()
        await self._idle.wait()

    def drain_end(self) -> None:
        """Let the writes held back go on (idempotent)."""
        self._open.set()

    @property
    def drained(self) -> bool:
        return not self._open.is_set()

    def stop(self) -> None:
        """Take no permission on the child from now on (QEMU's ``stop`` before the
        pivot); the caller refreshes the graph's permissions."""
        self.link_kind = "commit-top"
