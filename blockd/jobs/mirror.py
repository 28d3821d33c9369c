"""The mirror machinery, and the active commit built on it (job type ``commit``).

Theory of operation (docs/qemu-behaviour/block-commit.md §4; QEMU's ``block/mirror.c``,
background copy mode):

* A *source* node is kept in step with a *target*. A ``mirror_top`` filter above the
  source takes over its parents (:mod:`blockd.block.drivers.job_filters`); every write
  that passes it marks the job's dirty bitmap (:mod:`blockd.block.dirty`).
* Run (:meth:`MirrorJob.run`): first the bitmap is filled with what the target lacks
  (:meth:`MirrorJob.initial_dirty`; for a commit, every range some layer above the base
  stores). Then dirty runs of up to :data:`MIRROR_IO_BYTES` are taken one after the
  other, wrapping around at the end: a run is cleared, then copied; a copy that fails
  marks it dirty again and goes through ``on-error`` (``stop`` pauses, ``ignore``
  retries later, ``report`` fails the job). Where the chain's files allow offloaded
  copies and no speed limit is set, adjacent dirty runs are taken together, up to
  :data:`MIRROR_COPY_MERGE` bytes in one copy; if such a copy fails, its range is
  marked dirty again and copied run by run, so that an error is reported for the run
  that has it. Progress: ``len`` is what was copied plus what is dirty, so it grows
  while writers keep writing.
* Ready: the first time nothing is dirty the target is flushed (a failed flush goes
  through ``on-error`` and is tried again), the job turns ``ready``
  (``JOB_STATUS_CHANGE`` then ``BLOCK_JOB_READY``) and from then on sleeps
  :data:`READY_SLICE_NS` at a time while nothing is dirty, copying new writes as they
  come.
* Completion: ``job-complete`` (or a cancel without force once ready) asks the job to
  finish. When nothing is dirty the filter is drained (new writes wait, those in flight
  finish), the bitmap checked once more and the target flushed; the job leaves its run
  loop with the source drained. Prepare then does the job's final step
  (:meth:`MirrorJob.pivot`) unless the job was soft-cancelled, the filter leaves, and
  the writes held back go on into the filter's child: the target after a pivot.
* A forced cancel or a failure: the filter leaves, its parents read the source again.

:class:`ActiveCommitJob` is this machinery with the source being the chain's top and
the target its base: the pivot moves every parent of the top onto the base, no header
is rewritten.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING, ClassVar, Final

import trio

from blockd.block import chain
from blockd.block.dirty import DirtyBitmap
from blockd.block.drivers.job_filters import MirrorTopDriver
from blockd.block.host import offload
from blockd.block.host.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.node import NodeUser
from blockd.errors import QMPError, RequestError
from blockd.jobs.commit import CommitFilterJob, CopyError
from blockd.jobs.job import ErrorChoice
from blockd.jobs.policy import IoOperationType
from blockd.jobs.state import JobStatus

if TYPE_CHECKING:
    from blockd.jobs.setup import UndoStack

log = logging.getLogger(__name__)

#: the most bytes one copy moves (QEMU's ``MAX_IO_BYTES``)
MIRROR_IO_BYTES: Final = 1024 * 1024

#: the most bytes one offloaded copy of adjacent dirty runs moves (QEMU's default
#: ``buf-size``, what it keeps in flight)
MIRROR_COPY_MERGE: Final = 16 * 1024 * 1024

#: how long a ready job with nothing to copy sleeps before it looks again
#: (QEMU's ``BLOCK_JOB_SLICE_TIME``)
READY_SLICE_NS: Final = 100_000_000

#: the longest the pivot (graph changes) may take; shielded
PIVOT_SECONDS: Final = 30.0


def default_granularity(node_cluster_size: int | None) -> int:
    """QEMU's ``bdrv_get_default_bitmap_granularity``: the target's cluster size,
    within 4 KiB to 64 KiB; 64 KiB when it has none."""
    if not node_cluster_size:
        return 65536
    return min(65536, max(4096, node_cluster_size))


class MirrorJob(CommitFilterJob):
    """Keep ``plan.top`` (the source) and ``plan.base`` (the target) in step until
    completed; see the module docstring. Subclasses set :attr:`job_type` and define
    :meth:`initial_dirty`, :meth:`set_up` and :meth:`pivot`.

    Attributes:
        bitmap: the source's dirty bitmap, from the set-up on.
        should_complete: ``job-complete`` was accepted.
    """

    filter_driver: ClassVar[str] = "mirror_top"
    completable: ClassVar[bool] = True
    copy_buffer: ClassVar[int] = MIRROR_IO_BYTES

    bitmap: DirtyBitmap | None = None
    should_complete = False
    _last_yield = 0

    # -- the seams for job-complete and block-job-cancel -----------------------------

    def on_complete(self) -> None:
        """QEMU ``mirror_complete``: refused until ready."""
        if not self.is_ready:
            raise RequestError(f"The active block job '{self.id}' cannot be completed")
        self.should_complete = True

    def soft_cancel_allowed(self) -> bool:
        """QEMU ``mirror_cancel``: once ready, a cancel without force completes the job
        without its final step."""
        return self.is_ready

    @property
    def is_ready(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    # -- set-up pieces ---------------------------------------------------------------

    def create_bitmap(self, undo: UndoStack) -> DirtyBitmap:
        """The job's dirty bitmap, at the target's default granularity: the filter's,
        not recording; the filter marks the writes that pass it (QEMU's)."""
        filt = self.filter_node
        assert filt is not None
        cluster = self.plan.base.driver.image_info().get("cluster-size")
        bitmap = DirtyBitmap(default_granularity(cluster), filt.length(), recording=False)
        filt.dirty_bitmaps.append(bitmap)
        self.mirror_filter.bitmap = bitmap
        self.bitmap = bitmap
        undo.push(self.release_bitmap, "creating the dirty bitmap")
        return bitmap

    def release_bitmap(self) -> None:
        bitmap, self.bitmap = self.bitmap, None
        filt = self.filter_node
        if bitmap is None or filt is None:
            return
        self.mirror_filter.bitmap = None
        if any(b is bitmap for b in filt.dirty_bitmaps):
            filt.dirty_bitmaps.remove(bitmap)

    @property
    def mirror_filter(self) -> MirrorTopDriver:
        assert self.filter_node is not None
        driver = self.filter_node.driver
        assert isinstance(driver, MirrorTopDriver)
        return driver

    # -- run -------------------------------------------------------------------------

    async def initial_dirty(self, bitmap: DirtyBitmap) -> None:
        """Mark what the target lacks (QEMU ``mirror_dirty_init``)."""
        raise NotImplementedError

    async def throttle(self) -> None:
        """QEMU ``mirror_throttle``: a pause point, and a yield to the other tasks once
        every :data:`READY_SLICE_NS` (a long walk over the chain's metadata does not
        hold the daemon up, and does not sleep either)."""
        now = time.monotonic_ns()
        if now - self._last_yield >= READY_SLICE_NS:
            self._last_yield = now
            await self.sleep_ns(0)
        else:
            await self.pause_point()

    async def run(self) -> None:
        source, target = self.plan.top, self.plan.base
        length = source.length()
        if target.length() < length:
            # growing the base needs a resize the block layer does not have yet
            raise OSError(errno.ENOTSUP, "Operation not supported")
        bitmap = self.bitmap
        assert bitmap is not None
        if length == 0:
            self.ready()
            while not (self.should_complete or self.soft_cancelled):
                await self.sleep_ns(READY_SLICE_NS)
            return
        await self.initial_dirty(bitmap)
        self.set_total(self.progress_current + bitmap.dirty_bytes)
        # Adjacent runs merge only where copies are offloaded: a copy through buffers
        # (blkdebug in the chain, O_DIRECT) keeps QEMU's run size, errors included.
        merge = MIRROR_COPY_MERGE if offload.chain_offloads(source, target) else 0
        position = 0
        unmerged_until = 0  # runs below this are copied one by one (a merged copy failed)
        while True:
            # merged copies only without a speed limit: limited, each run pays for itself
            most = merge if merge and not self.speed else MIRROR_IO_BYTES
            found = bitmap.next_dirty(
                position, most if position >= unmerged_until else MIRROR_IO_BYTES
            )
            if found is None and position:
                unmerged_until = 0
                found = bitmap.next_dirty(0, most)
            if found is not None:
                offset, n = found
                position = offset + n
                bitmap.reset(offset, n)
                try:
                    await self.copy(offset, n)
                except CopyError as exc:
                    bitmap.set(offset, n)
                    if n > MIRROR_IO_BYTES:
                        position, unmerged_until = offset, offset + n
                        continue  # the same range again, run by run
                    action = await self.handle_io_error(exc, exc.operation, ignored_fails=False)
                    if action == "report":
                        return
                else:
                    self.advance(n)
                    self.charge(n)
            self.set_total(self.progress_current + bitmap.dirty_bytes)
            finish = False
            if not bitmap:
                if not self.is_ready:
                    failed = await self._flush_target()
                    if failed == "report":
                        return
                    if failed is not None:
                        # QEMU mirror_run: ready only after a flush that worked; the
                        # failed one is tried again (after a pause point)
                        await self.rate_limit_sleep()
                        continue
                    if bitmap:
                        continue
                    self.ready()
                finish = self.should_complete or self.soft_cancelled
            if finish and not bitmap:
                if await self._converge():
                    return
                continue
            if self.is_ready and not finish and not bitmap:
                await self.sleep_ns(READY_SLICE_NS)
            else:
                await self.rate_limit_sleep()

    async def _flush_target(self) -> ErrorChoice | None:
        """Flush the target (QEMU ``mirror_flush``): None when it worked, else what
        ``on-error`` chose for the failure (after the resume, for ``stop``)."""
        try:
            await self.plan.base.flush()
        except OSError as exc:
            return await self.handle_io_error(exc, IoOperationType.WRITE, ignored_fails=False)
        return None

    async def _converge(self) -> bool:
        """Drain the filter; true when nothing is dirty and the target is flushed (the
        run ends with the source drained), else the drain ends and the loop goes on."""
        bitmap = self.bitmap
        assert bitmap is not None
        mirror = self.mirror_filter
        await mirror.drain_begin()
        if not bitmap:
            try:
                await self.plan.base.flush()
            except OSError as exc:
                mirror.drain_end()
                action = await self.handle_io_error(exc, IoOperationType.WRITE, ignored_fails=False)
                return action == "report"  # report: the run ends (failed)
            return True
        mirror.drain_end()
        return False

    # -- completion ------------------------------------------------------------------

    async def pivot(self) -> None:
        """The job's final step after a completion (not after a soft cancel)."""
        raise NotImplementedError

    async def prepare(self) -> None:
        if self.should_complete and not self.soft_cancelled:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(PIVOT_SECONDS) as bound:
                    await self.pivot()
            if bound.cancelled_caught:
                log.error(
                    "%s: the pivot onto '%s' did not finish within %gs",
                    self.who,
                    self.plan.base.name,
                    PIVOT_SECONDS,
                )
                raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    async def clean(self) -> None:
        failed = self.error is not None

        async def steps() -> None:
            self.release_bitmap()
            drained = self.filter_node is not None and self.mirror_filter.drained
            await self.holds.release(skip=self.filter_node)
            await self.drop_filter_and_resume(drained)
            if failed:
                await self.restore_base()
            else:
                self.base_read_only = False  # the base keeps the top's mode

        await self.bounded_release(steps)

    async def drop_filter_and_resume(self, drained: bool) -> None:
        """Take the filter out, then let the writes it held back go on (into what is
        the filter's child by then)."""
        filt = self.filter_node
        mirror = self.mirror_filter if filt is not None else None
        try:
            await self.drop_filter()
        finally:
            if mirror is not None and drained:
                mirror.drain_end()


class ActiveCommitJob(MirrorJob):
    """An active commit: the top is the device; built from a
    :class:`~blockd.jobs.commit.CommitPlan` by the ``block-commit`` handler."""

    job_type: ClassVar[str] = "commit"

    async def set_up(self, undo: UndoStack) -> None:
        """QEMU ``commit_active_start`` and ``mirror_start_job``, each step undone on a
        later failure.

        Raises:
            QMPError: QEMU's text for the step that failed; a ``created`` job went to
                ``null``.
        """
        plan = self.plan
        await self.reopen_base_read_write(undo)  # before the job exists, as QEMU
        await self.insert_filter(undo, read_only=False)
        filt = self.filter_node
        assert filt is not None
        self.register(undo)
        undo.push(self.holds.release, "taking the permissions")  # holds may stop half-way
        main = NodeUser(
            self.who,
            "main node",
            Perm.CONSISTENT_READ,
            Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE,
        )
        self.holds.take(filt, main)
        target_perm = Perm.WRITE
        if plan.base.length() < plan.top.length():
            target_perm |= Perm.RESIZE
        shared = Perm.WRITE_UNCHANGED | Perm.CONSISTENT_READ | Perm.WRITE
        writer = NodeUser(self.who, "target", target_perm, shared, backend=True)
        self.holds.take(plan.base, writer, block=False)
        self.create_bitmap(undo)
        source = NodeUser(
            self.who,
            "source",
            PERM_NONE,
            Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.CONSISTENT_READ,
        )
        self.holds.take(plan.top, source)
        self.holds.take(plan.base, NodeUser(self.who, "target", PERM_NONE, PERM_ALL))
        below = plan.top.filtered
        if below is not None and below is not plan.base:
            self.hold_chain(below, "intermediate node")
        self.freeze(undo)

    async def initial_dirty(self, bitmap: DirtyBitmap) -> None:
        top, base = self.plan.top, self.plan.base
        overlay = chain.find_overlay(top, base)
        assert overlay is not None, "the handler checked that base is below top"
        length = top.length()
        offset = 0
        while offset < length:
            await self.throttle()
            try:
                allocated, n = await chain.is_allocated_above(
                    top, overlay, True, offset, length - offset
                )
            except OSError as exc:
                action = await self.handle_io_error(exc, ignored_fails=False)
                if action == "report":
                    raise
                continue
            if n == 0:
                break
            if allocated:
                bitmap.set(offset, n)
            offset += n

    async def pivot(self) -> None:
        """QEMU ``mirror_exit_common`` for a completed active commit: the base takes the
        top's mode, the filter stops taking permissions, and every parent of the top
        (the filter included) now links to the base."""
        top, base = self.plan.top, self.plan.base
        self.unfreeze()
        if top.read_only != base.read_only:
            await self.graph.reopen(base, read_only=top.read_only)
        self.mirror_filter.stop()
        assert self.filter_node is not None
        self.graph.refresh_permissions([self.filter_node])
        try:
            await self.graph.replace_node(top, base)
        except QMPError as exc:
            raise OSError(errno.EPERM, exc.desc) from exc
