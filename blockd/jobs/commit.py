"""The ``commit`` job (non-active): fold a chain's upper layers into their base.

Theory of operation (docs/qemu-behaviour/block-commit.md §3; QEMU's ``block/commit.c``):

* Names. *device* is the chain's root (the job's main node), *top* the highest image
  committed (below the device), *base* the image that receives the data, *base-overlay*
  the image directly above the base. Everything from the top down to the base-overlay is
  copied; the device and the images above the top are not touched.
* Set-up (:meth:`CommitJob.set_up`, from the :class:`CommitPlan` that
  :mod:`blockd.commands.commit` checked): the job is created and holds the device; a
  read-only base is reopened read-write; a ``commit_top`` filter goes above the top
  (:mod:`blockd.block.drivers.job_filters`) and takes over its parents, so that the
  overlay above keeps consistent reads while nobody else may read the layers in
  between; every node from the top down to the base is held and blocked; the chain is
  frozen from the filter to the base; the job writes into the base and reads the top
  through front ends of its own. Each step done is undone if a later one fails.
* Run: the image is walked in steps of :data:`COMMIT_CHUNK` bytes; a step some layer
  from the top down to the base-overlay stores is read through the top and written into
  the base (copied host extent to host extent where the files allow). Progress counts
  every step, copied or not; only copied bytes are charged to the rate limit. An error
  goes through ``on-error``: ``report`` ends the job, ``stop`` pauses it and
  ``ignore`` retries the step. Copies in flight, as the stream job's
  (:func:`~blockd.jobs.window.run_steps`): up to :data:`COMMIT_DEPTH` steps queued,
  adjacent offloaded copies merged into one of up to :data:`COMMIT_COPY_MERGE` bytes
  (redone step by step if it fails, so errors are reported per step).
* Prepare (success only): the base is flushed; every parent of the filter (the overlay
  above the top) is linked to the base instead, and each such overlay's header gets the
  new backing file name (``backing-file``, else the base's filename) and format. The
  layers in between leave the chain; those the monitor added stay open until
  ``blockdev-del``.
* Abort (failure or cancel): the filter goes, the overlay reads the old chain again.
  What was written into the base stays.
* Clean (always): the holds are released and a base that was read-only is made
  read-only again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio

from blockd.block import chain
from blockd.block.host import offload
from blockd.block.host.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.names.backing import recorded_format
from blockd.block.node import BlockNode, NodeUser
from blockd.errors import QMPError, RequestError
from blockd.jobs.holds import Holds
from blockd.jobs.job import Job
from blockd.jobs.policy import IoOperationType
from blockd.jobs.window import Step, StepWindow, run_steps

if TYPE_CHECKING:
    from blockd.block.graph import Graph
    from blockd.jobs.job import JobOwner
    from blockd.jobs.setup import UndoStack

log = logging.getLogger(__name__)

#: the bytes one step examines and copies (QEMU's ``COMMIT_BUFFER_SIZE``)
COMMIT_CHUNK: Final = 512 * 1024

#: commit steps queued at once (see :mod:`blockd.jobs.window`)
COMMIT_DEPTH: Final = 4

#: the most bytes the offloaded copies of adjacent steps merge into
COMMIT_COPY_MERGE: Final = 4 * 1024 * 1024

#: the longest the graph and header changes of ``prepare`` may take; shielded so that
#: links and headers never disagree. Past it the job fails with ``ETIMEDOUT``.
HEADER_UPDATE_SECONDS: Final = 30.0

#: the longest ``abort`` plus ``clean`` may take (shielded; a hung disk is logged)
CLEAN_SECONDS: Final = 30.0

_WRITES: Final = Perm.WRITE_UNCHANGED | Perm.WRITE


def blocker(job_type: str) -> str:
    """The reason put on every node a job of ``job_type`` holds."""
    return f"block device is in use by block job: {job_type}"


@dataclass(frozen=True)
class CommitPlan:
    """What a ``block-commit`` request asks for, checked by its handler
    (docs/qemu-behaviour/block-commit.md §2).

    Attributes:
        device: the chain's root node (``device``): the job's main node.
        top: the highest image committed (``top-node``/``top``; the device itself for
            an active commit).
        base: the image the data goes into.
        backing_file: the header string to write instead of the base's filename.
        backing_mask_protocol: record ``raw`` for a protocol base.
        filter_node_name: the job filter's ``node-name`` (``None``: implicit).
    """

    device: BlockNode
    top: BlockNode
    base: BlockNode
    backing_file: str | None = None
    backing_mask_protocol: bool = False
    filter_node_name: str | None = None


class CommitFilterJob(Job):
    """What both commit jobs share: a filter above the top, holds, a base reopened
    read-write for the job.

    Attributes:
        plan: the checked request.
        filter_node: the job's filter, once inserted and until removed.
        base_read_only: the base was read-only and was reopened read-write.
    """

    job_type: ClassVar[str] = "commit"
    #: the driver of the filter the job inserts above the top
    filter_driver: ClassVar[str]
    #: the buffer of a copy that cannot be offloaded: it moves at most this much at once
    copy_buffer: ClassVar[int] = COMMIT_CHUNK

    def __init__(
        self,
        manager: JobOwner,
        job_id: str,
        *,
        graph: Graph,
        plan: CommitPlan,
        **job_options: Any,
    ) -> None:
        super().__init__(manager, job_id, **job_options)
        self.graph = graph
        self.plan = plan
        self.holds = Holds(graph, blocker(self.job_type))
        self.filter_node: BlockNode | None = None
        self.base_read_only = False
        self._frozen = False

    @property
    def who(self) -> str:
        return f"{self.job_type} job '{self.id}'"

    async def reopen_base_read_write(self, undo: UndoStack) -> None:
        """Reopen a read-only base read-write; its undo reopens it read-only."""
        base = self.plan.base
        if base.read_only:
            await self.graph.reopen(base, read_only=False)
            self.base_read_only = True
            undo.push(self.restore_base, "reopening the base read-write")

    async def restore_base(self) -> None:
        """Make a base that was read-only read-only again (idempotent)."""
        if self.base_read_only:
            self.base_read_only = False
            await self.graph.reopen(self.plan.base, read_only=True)

    async def insert_filter(self, undo: UndoStack, *, read_only: bool) -> BlockNode:
        """Put the job's filter above the top; its parents move to it. The filter's
        links are never frozen (QEMU's ``never_freeze``)."""
        options: dict[str, Any] = {"driver": self.filter_driver, "backing": self.plan.top.name}
        if self.plan.filter_node_name is not None:
            options["node-name"] = self.plan.filter_node_name
        filt = await self.graph.insert_filter(options, self.plan.top, read_only=read_only)
        filt.never_freeze = True
        self.filter_node = filt
        undo.push(self.drop_filter, "inserting the job's filter")
        return filt

    async def drop_filter(self) -> None:
        """Unfreeze, give the filter's parents back to the top, close it (idempotent)."""
        self.unfreeze()
        filt, self.filter_node = self.filter_node, None
        if filt is not None:
            await self.holds.release(only=filt)
            await self.graph.remove_filter(filt)

    def freeze(self, undo: UndoStack) -> None:
        """Freeze the links from the filter down to the base (exclusive)."""
        assert self.filter_node is not None
        self.graph.freeze_chain(self.filter_node, self.plan.base)
        self._frozen = True
        undo.push(self.unfreeze, "freezing the chain")

    def unfreeze(self) -> None:
        if self._frozen and self.filter_node is not None:
            self._frozen = False
            self.graph.unfreeze_chain(self.filter_node, self.plan.base)

    def hold_chain(self, first: BlockNode, role: str) -> None:
        """Hold every node from ``first`` down to the base (exclusive) as ``role``:
        writes shared, consistent reads only on the filters right above the base
        (QEMU's ``iter_shared_perms``)."""
        base = self.plan.base
        overlay = chain.find_overlay(self.plan.top, base)
        filtered_base = overlay.backing if overlay is not None else None
        shared = _WRITES
        walk: BlockNode | None = first
        while walk is not None and walk is not base:
            if walk is filtered_base:
                shared |= Perm.CONSISTENT_READ
            self.holds.take(walk, NodeUser(self.who, role, PERM_NONE, shared))
            walk = walk.filtered

    async def bounded_release(self, steps: Callable[[], Awaitable[None]]) -> None:
        """Run a clean-up's ``steps`` shielded (a cancel cannot leave half of them done)
        and bounded by :data:`CLEAN_SECONDS`: past it a hung disk is logged and the job
        ends anyway."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLEAN_SECONDS) as bound:
                await steps()
        if bound.cancelled_caught:
            log.error(
                "%s: releasing the chain did not finish within %gs (storage not "
                "responding); nodes may stay blocked",
                self.who,
                CLEAN_SECONDS,
            )

    def check_not_same(self) -> None:
        """Raises: RequestError: top and base are one image (filters skipped)."""
        if self.plan.top.skip_filters() is self.plan.base.skip_filters():
            raise RequestError("Invalid files for merge: top and base are the same")

    def base_writer(self) -> NodeUser:
        """The job's front end on the base: writes, and grows it when shorter."""
        perm = Perm.CONSISTENT_READ | Perm.WRITE
        if self.plan.base.length() < self.plan.top.length():
            perm |= Perm.RESIZE
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        return NodeUser(self.who, "base writer", perm, shared, backend=True)

    async def copy(self, offset: int, length: int) -> None:
        """Copy ``[offset, offset + length)`` from the top's view into the base: as host
        extents where the files allow, else through a buffer of :attr:`copy_buffer`
        bytes at most.

        Raises:
            CopyError: with the errno, and whether the source failed.
        """
        top, base = self.plan.top, self.plan.base
        pos, end = offset, offset + length
        buf: bytearray | None = None
        while pos < end:
            try:
                extents, n = await offload.map_prefix(top, pos, end - pos)
            except OSError as exc:
                raise CopyError(exc, source=True) from exc
            if extents is not None:
                try:
                    if await offload.copy_extents(base, pos, extents):
                        pos += n
                        continue
                except OSError as exc:
                    raise CopyError(exc, source=False) from exc
            if buf is None:
                buf = bytearray(min(end - pos, self.copy_buffer))
            n = min(n, len(buf))
            view = memoryview(buf)[:n]
            try:
                await top.read(pos, view)
            except OSError as exc:
                raise CopyError(exc, source=True) from exc
            try:
                await base.write(pos, view)
            except OSError as exc:
                raise CopyError(exc, source=False) from exc
            pos += n


class CopyError(OSError):
    """A copy step failed: the errno, and whether reading the source failed."""

    def __init__(self, exc: OSError, *, source: bool) -> None:
        super().__init__(exc.errno or errno.EIO, exc.strerror or os.strerror(errno.EIO))
        self.source = source

    @property
    def operation(self) -> IoOperationType:
        return IoOperationType.READ if self.source else IoOperationType.WRITE


class CommitJob(CommitFilterJob):
    """A non-active commit (the top is below the device). The ``block-commit`` handler
    builds it from a :class:`CommitPlan` and awaits :meth:`~blockd.jobs.job.Job.launch`.
    """

    filter_driver: ClassVar[str] = "commit_top"

    async def set_up(self, undo: UndoStack) -> None:
        """QEMU ``commit_start``, each step undone on a later failure.

        Raises:
            QMPError: QEMU's text for the step that failed; a ``created`` job went to
                ``null``.
        """
        self.check_not_same()
        plan = self.plan
        self.register(undo)
        undo.push(self.holds.release, "taking the permissions")  # holds may stop half-way
        self.holds.take(plan.device, NodeUser(self.who, "main node", PERM_NONE, PERM_ALL))
        await self.reopen_base_read_write(undo)
        await self.insert_filter(undo, read_only=True)
        self.hold_chain(plan.top, "intermediate node")
        self.freeze(undo)
        self.holds.take(plan.base, NodeUser(self.who, "base", PERM_NONE, PERM_ALL))
        self.holds.take(plan.base, self.base_writer(), block=False)
        top_reader = NodeUser(self.who, "top reader", PERM_NONE, PERM_ALL, backend=True)
        self.holds.take(plan.top, top_reader, block=False)

    async def run(self) -> None:
        top, base = self.plan.top, self.plan.base
        length = top.length()
        self.set_total(length)
        if base.length() < length:
            # growing the base needs a resize the block layer does not have yet
            raise OSError(errno.ENOTSUP, "Operation not supported")
        overlay = chain.find_overlay(top, base)
        assert overlay is not None, "the handler checked that base is below top"
        # Adjacent copies merge only where they are offloaded: a copy through buffers
        # (blkdebug in the chain, O_DIRECT) keeps QEMU's step size, errors included.
        merge = COMMIT_COPY_MERGE if offload.chain_offloads(top, base) else 0

        async def step(offset: int, merge_limit: int) -> int:
            """QEMU commit_run's loop body: is the step stored above the base?"""
            try:
                copy, n = await chain.is_allocated_above(top, overlay, True, offset, COMMIT_CHUNK)
            except OSError as exc:
                n = min(COMMIT_CHUNK, length - offset)
                window.add_done(offset, n, exc)
                return n
            if copy:
                window.add_copy(offset, n, self.copy, merge_limit)
                self.charge(n)
            else:
                window.add_done(offset, n)
            return n

        async def on_error(failed: Step) -> int | None:
            exc = failed.error
            assert exc is not None
            operation = exc.operation if isinstance(exc, CopyError) else None
            action = await self.handle_io_error(exc, operation, ignored_fails=False)
            return None if action == "report" else 0  # stop and ignore: the step again

        async with trio.open_nursery() as nursery:
            window = StepWindow(nursery, COMMIT_DEPTH)
            await run_steps(self, window, length, merge=merge, step=step, failed=on_error)

    async def prepare(self) -> None:
        """QEMU ``commit_prepare`` and ``bdrv_drop_intermediate``."""
        plan = self.plan
        filt = self.filter_node
        assert filt is not None
        await plan.base.flush()  # the data is stable before any header names the base
        self.unfreeze()
        name = plan.backing_file if plan.backing_file is not None else plan.base.filename
        fmt = recorded_format(plan.base, plan.backing_mask_protocol)
        overlays = [p for p in dict.fromkeys(filt.parents) if p.backing is filt]
        with trio.CancelScope(shield=True):
            with trio.move_on_after(HEADER_UPDATE_SECONDS) as bound:
                try:
                    await self.graph.replace_node(filt, plan.base)
                except QMPError as exc:
                    raise OSError(errno.EPERM, exc.desc) from exc
                self.filter_node = None
                for overlay in overlays:
                    await self._update_header(overlay, name, fmt)
        if bound.cancelled_caught:
            log.error(
                "%s: relinking the chain onto '%s' did not finish within %gs (storage "
                "not responding)",
                self.who,
                plan.base.name,
                HEADER_UPDATE_SECONDS,
            )
            raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    async def _update_header(self, overlay: BlockNode, name: str, fmt: str) -> None:
        """QEMU ``bdrv_backing_update_filename``: a read-only overlay is reopened
        read-write for the header write and read-only again after."""
        reopened = overlay.read_only
        if reopened:
            await self.graph.reopen(overlay, read_only=False)
        try:
            overlay.auto_backing_file = name
            await overlay.driver.change_backing_file(name, fmt)
            await overlay.flush()
        except OSError as exc:
            log.error("%s: Could not update backing file link: %s", self.who, exc.strerror)
            raise
        finally:
            if reopened:
                await self.graph.reopen(overlay, read_only=True)

    async def abort(self) -> None:
        async def steps() -> None:
            await self.holds.release(skip=self.filter_node)
            await self.drop_filter()

        await self.bounded_release(steps)

    async def clean(self) -> None:
        async def steps() -> None:
            await self.drop_filter()
            await self.holds.release()
            await self.restore_base()

        await self.bounded_release(steps)
