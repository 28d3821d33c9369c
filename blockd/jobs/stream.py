"""The ``stream`` job: copy a backing chain's data into its top image, then drop it.

Theory of operation (docs/qemu-behaviour/block-stream.md §4; QEMU's ``block/stream.c``):

* Names. *top* is the node being filled (``device``, filters skipped). *base-overlay*
  is the lowest image whose data is copied; *above-base* the node (filters counted)
  directly above the base. With ``bottom`` both are the bottom node. The base itself is
  never read by the job and never changes.
* Setup (:meth:`StreamJob.set_up`, from the :class:`StreamPlan` that
  :mod:`blockd.commands.stream` checked): a read-only top is reopened read-write; a
  ``copy-on-read`` filter with ``bottom = base-overlay`` is inserted above the top and
  takes over all its parents; the job is created; the filter, the top and every node
  down to (not including) the base are blocked. Each step done is undone if a later one
  fails (:class:`~blockd.jobs.setup.UndoStack`).
* Run: the image is walked in steps of at most :data:`STREAM_CHUNK` bytes. A range the
  top already stores is skipped; a range some layer from the top's backing down to the
  base-overlay stores is copied by a prefetch read through the filter; a range nobody
  above the base stores is skipped. Reaching the end of a shorter backing chain skips
  the rest. Progress counts skipped bytes; only copied bytes are charged to the rate
  limit. Errors go through the ``on-error`` policy (``stop`` retries the same offset
  after the resume; ``ignore`` remembers the first error and goes on).
* Copies in flight. A copy runs as a task while the next steps are decided (up to
  :data:`STREAM_DEPTH` steps queued, :class:`~blockd.jobs.window.StepWindow`); results
  are taken back in offset order, and a pause, a cancel or a rate-limit sleep first
  waits for every copy in flight. Where the chain allows offloaded copies, adjacent
  copies merge into one of up to :data:`STREAM_COPY_MERGE` bytes; if a merged copy
  fails, its steps are copied again one at a time, so errors are reported per step.
* Prepare (success only): the copied data is flushed to stable storage first; then the
  filter is removed, the top's backing link moves to the node below above-base (none
  for a full stream) and the top's header gets the new backing file name and format.
* Clean (always): the filter is removed if still there, the blockers are lifted, a
  top that was read-only is made read-only again.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio

from blockd.block import chain
from blockd.block.drivers.copy_on_read import CopyOnReadDriver
from blockd.block.host import offload
from blockd.block.host.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.names.backing import recorded_format
from blockd.block.node import BlockNode, NodeUser
from blockd.errors import QMPError
from blockd.jobs.job import Job
from blockd.jobs.window import Step, StepWindow, run_steps

if TYPE_CHECKING:
    from blockd.block.graph import Graph
    from blockd.jobs.job import JobOwner
    from blockd.jobs.setup import UndoStack

log = logging.getLogger(__name__)

#: the most bytes one step of the run loop examines (QEMU's ``STREAM_CHUNK``)
STREAM_CHUNK: Final = 512 * 1024

#: stream steps queued at once: while one step's copy waits for its worker thread, the
#: next ones are decided and their copies started (see :mod:`blockd.jobs.window`)
STREAM_DEPTH: Final = 4

#: the most bytes the copies of adjacent steps merge into (one worker-thread call)
STREAM_COPY_MERGE: Final = 4 * 1024 * 1024

#: the longest the header update of ``prepare`` (backing file name, then a flush) may
#: take; it is shielded so that the link and the header never disagree. Past it the job
#: fails with ``ETIMEDOUT`` (the storage does not answer).
HEADER_UPDATE_SECONDS: Final = 30.0

#: the longest ``clean`` (remove the filter, release the nodes, reopen read-only) may
#: take; shielded so that a cancel cannot leave half the graph changes behind. Past it
#: the job ends anyway and the error names the node.
CLEAN_SECONDS: Final = 30.0

#: the blocker reason put on every node the job holds
#: (docs/qemu-behaviour/block-stream.md §4, setup step 5)
BLOCKER: Final = "block device is in use by block job: stream"

_BASIC: Final = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


@dataclass(frozen=True)
class StreamPlan:
    """What a ``block-stream`` request asks for, checked by its handler
    (docs/qemu-behaviour/block-stream.md §3).

    Attributes:
        top: the ``device`` node: the filter goes above it, its image is filled.
        base: the base node (``base``/``base-node``), ``None`` for a full stream or with
            ``bottom``; never read by the job.
        base_overlay: the lowest image whose data is copied (``bottom``, or the overlay
            of the base).
        above_base: the node directly above the base, filters counted.
        backing_file: the header string to write instead of the base's filename.
        backing_mask_protocol: write ``raw`` for a protocol base.
        filter_node_name: the copy-on-read filter's ``node-name`` (``None``: implicit).
    """

    top: BlockNode
    base: BlockNode | None
    base_overlay: BlockNode
    above_base: BlockNode
    backing_file: str | None = None
    backing_mask_protocol: bool = False
    filter_node_name: str | None = None


class StreamJob(Job):
    """One block-stream job. The ``block-stream`` handler builds it from a
    :class:`StreamPlan` and awaits :meth:`~blockd.jobs.job.Job.launch`: :meth:`set_up`
    changes the graph, step by step, and a failure undoes every step done.

    Args:
        manager: the job's owner.
        job_id: the job's id.
        graph: the block graph (for the filter and backing-link changes).
        plan: the checked request.
        job_options: ``speed``, ``on_error``, ``auto_finalize``, ``auto_dismiss``.

    Attributes:
        target: the ``device`` node (the filter's child).
        filter_node: the inserted copy-on-read filter, once :meth:`set_up` inserted it
            and until the job removes it.
        read_only: the target was read-only and was reopened read-write.
    """

    job_type: ClassVar[str] = "stream"

    def __init__(
        self,
        manager: JobOwner,
        job_id: str,
        *,
        graph: Graph,
        plan: StreamPlan,
        **job_options: Any,
    ) -> None:
        super().__init__(manager, job_id, **job_options)
        self.graph = graph
        self.plan = plan
        self.target = plan.top
        self.base_overlay = plan.base_overlay
        self.above_base = plan.above_base
        self.backing_file = plan.backing_file
        self.backing_mask_protocol = plan.backing_mask_protocol
        self.filter_node: BlockNode | None = None
        self.read_only = False
        self._holds: list[tuple[BlockNode, NodeUser]] = []
        self._frozen = False

    # -- setup -----------------------------------------------------------------------

    async def set_up(self, undo: UndoStack) -> None:
        """QEMU ``stream_start`` after its checks (docs/qemu-behaviour/block-stream.md §4,
        steps 1-5), each step undone on a later failure: reopen a read-only top
        read-write; insert the copy-on-read filter; freeze its chain; create the job
        (``created``); take the permissions and block the nodes.

        Raises:
            QMPError: QEMU's text for the step that failed (``Could not create node:``,
                ``Could not replace node:``, a frozen link, a permission conflict); the
                steps done were undone, a ``created`` job went to ``null``.
        """
        top = self.target
        if top.read_only:
            # Hold the chain while the top is reopened (QEMU stream_start).
            self.graph.freeze_chain(top, self.above_base)
            try:
                await self.graph.reopen(top, read_only=False)
            finally:
                self.graph.unfreeze_chain(top, self.above_base)
            self.read_only = True
            undo.push(self._reopen_read_only, "reopening the top read-write")
        self.filter_node = await self._insert_filter()
        undo.push(self.drop_filter, "inserting the copy-on-read filter")
        # The copy-on-read filter freezes its chain down to the base-overlay.
        self.freeze()
        undo.push(self._unfreeze, "freezing the chain")
        self.register(undo)
        undo.push(self.release, "taking the permissions")  # hold() may stop half-way
        self.hold()

    async def _insert_filter(self) -> BlockNode:
        """QEMU ``bdrv_insert_node``: opening the filter fails with ``Could not create
        node``, moving the top's parents to it with ``Could not replace node``."""
        options: dict[str, Any] = {"driver": "copy-on-read", "file": self.target.name}
        options["bottom"] = self.base_overlay.name
        name = self.plan.filter_node_name
        if name is not None:
            options["node-name"] = name
            try:
                self.graph.check_name(name)
            except QMPError as exc:
                raise type(exc)(f"Could not create node: {exc.desc}") from exc
        try:
            return await self.graph.insert_filter(options, self.target)
        except QMPError as exc:
            raise type(exc)(f"Could not replace node: {exc.desc}") from exc

    async def _reopen_read_only(self) -> None:
        if self.read_only:
            self.read_only = False
            await self.graph.reopen(self.target, read_only=True)

    def freeze(self) -> None:
        """Freeze the links from the filter down to the base-overlay, as the filter's
        ``bottom`` does in QEMU; the link from the base-overlay to the base stays free.

        Raises:
            RequestError: a link is frozen already or must not be frozen.
        """
        assert self.filter_node is not None
        self.graph.freeze_chain(self.filter_node, self.base_overlay)
        self._frozen = True

    def _unfreeze(self) -> None:
        if self._frozen and self.filter_node is not None:
            self._frozen = False
            self.graph.unfreeze_chain(self.filter_node, self.base_overlay)

    def hold(self) -> None:
        """Take the job's permissions and block the nodes it holds
        (docs/qemu-behaviour/block-stream.md §4, setup steps 4-5):
        the filter, the top and every node strictly between the top and the base.

        Raises:
            RequestError: a permission conflict; what was taken so far stays taken
                until :meth:`release` (or :meth:`clean`) gives it back.
        """
        assert self.filter_node is not None
        who = f"stream job '{self.id}'"
        self._take(self.filter_node, NodeUser(who, "main node", PERM_NONE, PERM_ALL))
        reader = NodeUser(who, "stream", Perm.CONSISTENT_READ, _BASIC | Perm.WRITE)
        self._take(self.filter_node, reader)
        self._take(self.target, NodeUser(who, "active node", PERM_NONE, _BASIC | Perm.WRITE))
        base = self.above_base.filtered
        walk = self.target.filtered
        while walk is not None and walk is not base:
            self._take(walk, NodeUser(who, "intermediate node", PERM_NONE, _BASIC))
            walk = walk.filtered

    def _take(self, node: BlockNode, user: NodeUser) -> None:
        self.graph.add_user(node, user)
        self._holds.append((node, user))
        if not any(held is node for held, _ in self._holds[:-1]):
            node.block(BLOCKER)

    async def release(self) -> None:
        """Give back every permission and blocker but the filter's (idempotent).

        The filter's own holds go with the filter (:meth:`drop_filter`): released
        first, they could close it while its chain is still frozen.
        """
        filt = self.filter_node
        holds = [h for h in self._holds if h[0] is not filt]
        self._holds = [h for h in self._holds if h[0] is filt]
        seen: list[BlockNode] = []
        for node, user in reversed(holds):
            if not any(n is node for n in seen):
                node.unblock(BLOCKER)
                seen.append(node)
            await self.graph.remove_user(node, user)

    async def drop_filter(self) -> None:
        """Unfreeze the filter's chain and take the filter out of the graph (idempotent)."""
        self._unfreeze()
        filt, self.filter_node = self.filter_node, None
        if filt is None:
            return
        for node, user in [h for h in self._holds if h[0] is filt]:
            self._holds.remove((node, user))
            await self.graph.remove_user(node, user)
        filt.unblock(BLOCKER)
        await self.graph.remove_filter(filt)

    # -- run -------------------------------------------------------------------------

    async def run(self) -> None:
        top = self.target.skip_filters()
        if top is self.base_overlay:
            return  # nothing to stream: len and offset stay 0
        length = self.target.length()
        self.set_total(length)
        assert self.filter_node is not None
        cor = self.filter_node.driver
        assert isinstance(cor, CopyOnReadDriver)
        # A full stream leaves no backing file: zeros need not be written, the range
        # reads as zeros unallocated (before prepare the chain shows the same zeros).
        cor.skip_zero_writes = self.above_base.filtered is None
        # Adjacent copies merge only where they are offloaded: a copy through buffers
        # (blkdebug in the chain, O_DIRECT) keeps QEMU's step size, errors included.
        merge = STREAM_COPY_MERGE if offload.chain_offloads(top, self.base_overlay) else 0

        async def on_error(failed: Step) -> int | None:
            assert failed.error is not None
            action = await self.handle_io_error(failed.error)
            if action == "report":
                return None  # the engine fails the job with the remembered error
            return failed.length if action == "ignore" else 0

        async with trio.open_nursery() as nursery:
            window = StepWindow(nursery, STREAM_DEPTH)
            await run_steps(
                self,
                window,
                length,
                merge=merge,
                step=functools.partial(self._step, cor, top, window, length=length),
                failed=on_error,
            )

    async def _step(
        self,
        cor: CopyOnReadDriver,
        top: BlockNode,
        window: StepWindow,
        offset: int,
        merge: int,
        *,
        length: int,
    ) -> int:
        """Decide the step at ``offset`` and queue it, a copy merged with the one before
        up to ``merge`` bytes (0: not merged); returns its length (the reference:
        stream_run's loop body)."""
        n = min(STREAM_CHUNK, length - offset)
        try:
            # The decision and the claim under the filter's lock: no write through the
            # filter lands between them, so the chain is asked once per step.
            async with cor.serial:
                allocated, n = await chain.is_allocated(top, offset, STREAM_CHUNK)
                copy = False
                if not allocated:
                    # copy if a layer down to base_overlay has it
                    copy, n = await chain.is_allocated_above(
                        top.backing, self.base_overlay, True, offset, n
                    )
                    if not copy and n == 0:
                        n = length - offset  # the end of a shorter backing chain
                if copy:
                    cor.claim(offset, n)
        except OSError as exc:
            window.add_done(offset, n, exc)
            return n
        if copy:
            window.add_copy(offset, n, cor.copy_claimed, merge)
            self.charge(n)
        else:
            window.add_done(offset, n)
        return n

    # -- completion ------------------------------------------------------------------

    async def prepare(self) -> None:
        top = self.target.skip_filters()
        # Stable storage first: the header must never name the new backing file while
        # data copied from the old chain could still be lost.
        await top.flush()
        await self.drop_filter()
        if top.backing is None:
            return
        base = self.above_base.filtered
        image = base.skip_filters() if base is not None else None
        name: str | None = None
        fmt: str | None = None
        if image is not None:
            name = self.backing_file if self.backing_file is not None else image.filename
            # docs/qemu-behaviour/block-stream.md §4, prepare step 3
            fmt = recorded_format(image, self.backing_mask_protocol)
        try:
            await self.graph.set_child(top, "backing", base)
        except Exception as exc:
            raise OSError(errno.EPERM, "Operation not permitted") from exc
        # QEMU bdrv_co_change_backing_file: the header string is now what the node would
        # open by itself (a differing link makes it "overridden"). Set it together with
        # the link, before any I/O lets another job look at this node's filename.
        top.auto_backing_file = name or ""
        # The header and the link must not part ways: shielded, but bounded.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(HEADER_UPDATE_SECONDS) as bound:
                await top.driver.change_backing_file(name, fmt)
                await top.flush()
        if bound.cancelled_caught:
            log.error(
                "stream job '%s': writing the backing file name into node '%s' did not "
                "finish within %gs (storage not responding)",
                self.id,
                top.name,
                HEADER_UPDATE_SECONDS,
            )
            raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    async def clean(self) -> None:
        # Runs even when the job is being cancelled; bounded so that a hung disk (the
        # filter's close flushes) cannot hold the job, and shutdown, forever.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLEAN_SECONDS) as bound:
                await self.drop_filter()
                await self.release()
                if self.read_only:
                    await self.graph.reopen(self.target, read_only=True)
        if bound.cancelled_caught:
            log.error(
                "stream job '%s': releasing node '%s' did not finish within %gs (storage "
                "not responding); the node may stay blocked",
                self.id,
                self.target.name,
                CLEAN_SECONDS,
            )
