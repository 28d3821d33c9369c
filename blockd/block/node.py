"""A node of the block graph: one driver instance plus its children and bookkeeping.

Every request goes through the node's public methods, which do the checks QEMU's
``block/io.c`` does once for all drivers: bounds, read-only, request alignment (unaligned
requests are widened with read-modify-write), then call the driver.

Bounds (as QEMU): format and filter nodes refuse requests past their length with
``EINVAL``. Protocol nodes are different: a read past the end returns zeros and a write
past the end grows the node, which is how format drivers append clusters to their file.

Corruption (QEMU's ``qcow2_signal_corruption``): a driver that finds broken metadata
while serving a request raises :class:`~blockd.errors.ImageError` with QEMU's text. The
node reports it once (:attr:`BlockNode.on_corruption`: the ``BLOCK_IMAGE_CORRUPTED``
event) and fails the request with ``EIO``, so that callers meet an I/O error like any
other: a job applies its ``on-error`` policy to it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockd.block.dirty import DirtyBitmap
from blockd.block.driver import BlockStatus, Driver, Extent, OffloadNotSupported, Status
from blockd.block.host.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.names.filename import full_open_options, node_filename
from blockd.errors import ImageError, RequestError


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass(eq=False)
class NodeUser:
    """A user of a node that is not another node: a job's hold on it, an export.

    Users take part in the permission check (docs/qemu-behaviour/blockdev.md §6): every user of a
    node must share what the others use. Add and remove them with
    ``Graph.add_user``/``remove_user``.

    Attributes:
        description: how conflict messages name the user (``stream job 'job0'``).
        child_name: the role it uses the node in (``main node``, ``intermediate node``).
        perm: the permissions it uses.
        shared: the permissions it lets others use.
        backend: the user is a device-like front end (QEMU's BlockBackend: a job's
            reader or writer, an export), not a job's hold on the node: the node stays a
            root node, and ``blockdev-del`` refuses it as in use.
    """

    description: str
    child_name: str
    perm: Perm = PERM_NONE
    shared: Perm = PERM_ALL
    backend: bool = False


@dataclass(eq=False)
class BlockNode:
    """One node. ``driver`` is set by the graph right after the node is created.

    Attributes:
        name: the unique ``node-name`` (generated ``#blockNNN`` when not given).
        options: the blockdev options it was opened with (wire names).
        read_only: the node refuses writes.
        children: attached children by role (``file``, ``backing``, ``image``).
        parents: nodes that have this one as a child (by identity).
        monitor_owned: created by a top-level ``blockdev-add`` or ``--blockdev``.
        implicit_backing: the backing child was opened from the image header (not given
            in ``backing``), which changes how ``base`` names are matched.
        blockers: reasons operations on this node are refused (``"block device is in use
            by block job: stream"``); empty when free. See :meth:`block`.
        users: non-node users (jobs), part of the permission check.
        frozen: roles of child links that must not change (``backing`` of a streamed
            chain); the graph refuses to replace or detach them.
        never_freeze: links to this node cannot be frozen (a commit job's filter).
        child_role: the role of the child the driver reads from (its ``child_role``),
            set by the graph before the driver opens.
        auto_backing_file: the backing file name the node would open by itself: the
            header string after open, the backing node's filename once the graph opened
            it from the header. Whoever rewrites the header (stream) sets it to the new
            string. A backing link that differs from it is "overridden" (QEMU's
            ``bdrv_backing_overridden``) and the node gets a ``json:`` filename.
        implicit: a filter the daemon inserted without a user-given name (a stream's
            copy-on-read): it takes its child's filename and options, so the links to
            it do not count as overridden.
        perm, shared: the node's cumulative permissions, as the graph last computed
            them from all its parents and users.
        dirty_bitmaps: the node's dirty bitmaps: every completed write or discard on
            it marks those that record (:mod:`blockd.block.dirty`).
        on_corruption: called with the node and QEMU's message the first time a
            request finds the image corrupt (set by the graph).
        corruption_reported: that report was made (QEMU suppresses further ones).
    """

    name: str
    options: dict[str, Any]
    read_only: bool = False
    driver: Driver = field(init=False)
    children: dict[str, BlockNode] = field(default_factory=dict)
    parents: list[BlockNode] = field(default_factory=list)
    monitor_owned: bool = False
    implicit_backing: bool = False
    blockers: list[str] = field(default_factory=list)
    users: list[NodeUser] = field(default_factory=list)
    frozen: set[str] = field(default_factory=set)
    never_freeze: bool = False
    child_role: str = "file"
    auto_backing_file: str = ""
    implicit: bool = False
    perm: Perm = PERM_NONE
    shared: Perm = PERM_ALL
    dirty_bitmaps: list[DirtyBitmap] = field(default_factory=list)
    on_corruption: Callable[[BlockNode, str], None] | None = field(default=None, repr=False)
    corruption_reported: bool = False

    # -- blockers ---------------------------------------------------------------------

    def block(self, reason: str) -> None:
        """Refuse operations on this node (``blockdev-del``, new jobs) for ``reason``.

        Each call must be paired with one :meth:`unblock` with the same reason.
        """
        self.blockers.append(reason)

    def unblock(self, reason: str) -> None:
        """Remove one blocker added with ``reason`` (no-op when there is none)."""
        if reason in self.blockers:
            self.blockers.remove(reason)

    def check_not_busy(self, display_name: str | None = None) -> None:
        """Raise ``Node '<name>' is busy: <reason>`` when a blocker is set.

        Raises:
            RequestError: QEMU's text with the first blocker's reason.
        """
        if self.blockers:
            name = self.name if display_name is None else display_name
            raise RequestError(f"Node '{name}' is busy: {self.blockers[0]}")

    @property
    def is_root(self) -> bool:
        """No parent node and no job holds this node; front ends may (QEMU's
        ``bdrv_is_root_node``): what ``block-commit`` accepts as its ``device``."""
        return not self.parents and all(user.backend for user in self.users)

    @property
    def has_backend(self) -> bool:
        """A front end uses this node (QEMU's ``bdrv_has_blk``)."""
        return any(user.backend for user in self.users)

    @property
    def in_use(self) -> bool:
        """Another node or a user references this node (``blockdev-del`` refuses it)."""
        return bool(self.parents) or bool(self.users)

    # -- topology -------------------------------------------------------------------

    @property
    def file(self) -> BlockNode | None:
        """The child the driver reads its data from (``file`` or ``image``)."""
        return self.children.get(self.child_role)

    @property
    def backing(self) -> BlockNode | None:
        return self.children.get("backing")

    @property
    def drv(self) -> str:
        return self.driver.format_name

    @property
    def is_filter(self) -> bool:
        return self.driver.is_filter

    @property
    def is_protocol(self) -> bool:
        return self.driver.protocol_name is not None

    @property
    def backing_overridden(self) -> bool:
        """The backing link is not the one the image header names."""
        if not self.driver.supports_backing:
            return False
        if self.backing is not None:
            return self.auto_backing_file != self.backing.filename
        return self.auto_backing_file != ""

    def full_open_options(self) -> dict[str, Any]:
        """The options that reopen exactly this node (``json:`` filenames)."""
        return full_open_options(self)

    @property
    def filename(self) -> str:
        """QEMU's filename: the driver's, ``blkdebug:<config>:<image>``, or ``json:{...}``
        when options or an overridden backing link make a plain path ambiguous
        (:mod:`blockd.block.names.filename`)."""
        return node_filename(self)

    @property
    def filtered(self) -> BlockNode | None:
        """The child whose data this node shows: the filtered child of a filter, the
        backing (COW) child of a format node, else ``None``."""
        return self.file if self.is_filter else self.backing

    def skip_filters(self) -> BlockNode:
        """This node, or the first non-filter node below it."""
        node = self
        while node.is_filter and node.file is not None:
            node = node.file
        return node

    # -- I/O ------------------------------------------------------------------------

    def length(self) -> int:
        return self.driver.length()

    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0:
            raise _error(errno.EINVAL)
        if write and self.read_only:
            raise _error(errno.EPERM)
        # a filter leaves the bound to its child: blkdebug over a file must let the
        # qcow2 above grow the file, as QEMU does
        if not (self.is_protocol or self.is_filter) and offset + length > self.length():
            raise _error(errno.EINVAL)

    async def read(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with the contents at ``offset`` (zeros past a protocol node's end)."""
        view = memoryview(buf).cast("B")
        self._check(offset, len(view), write=False)
        if not view:
            return
        try:
            padded = await self._read_padded(offset, len(view))
            if padded is None:
                await self.driver.read(offset, view)
                return
        except ImageError as exc:
            raise self.corrupted(exc) from exc
        start, bounce = padded
        view[:] = bounce[offset - start : offset - start + len(view)]

    async def pread(self, offset: int, length: int) -> bytes:
        """Convenience: read ``length`` bytes into a new buffer."""
        buf = bytearray(length)
        await self.read(offset, buf)
        return bytes(buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        self._check(offset, len(view), write=True)
        if not view:
            return
        try:
            padded = await self._read_padded(offset, len(view))
            if padded is None:
                await self.driver.write(offset, view)
            else:
                start, bounce = padded  # read-modify-write of the aligned range
                bounce[offset - start : offset - start + len(view)] = view
                await self.driver.write(start, bounce)
        except ImageError as exc:
            raise self.corrupted(exc) from exc
        self._mark_dirty(offset, len(view))

    def _mark_dirty(self, offset: int, length: int) -> None:
        """QEMU ``bdrv_set_dirty``: a write that completed marks every recording bitmap."""
        for bitmap in self.dirty_bitmaps:
            if bitmap.recording:
                bitmap.set(offset, length)

    async def copy_in(self, offset: int, extents: Sequence[Extent]) -> None:
        """Store the host ``extents`` at ``offset`` (see :meth:`Driver.copy_in`).

        Raises:
            OffloadNotSupported: the range does not suit the driver's alignment, or the
                driver cannot offload; nothing was written.
        """
        length = sum(e.length for e in extents)
        self._check(offset, length, write=True)
        align = self.driver.request_alignment
        if offset % align or length % align:
            raise OffloadNotSupported
        if length:
            try:
                await self.driver.copy_in(offset, extents)
            except ImageError as exc:
                raise self.corrupted(exc) from exc
            self._mark_dirty(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        """Give ``[offset, offset + length)`` back to the host (see
        :meth:`Driver.discard`); a read-only node or a bad range is left alone."""
        if offset < 0 or length <= 0 or self.read_only:
            return
        try:
            await self.driver.discard(offset, length)
        except ImageError as exc:
            raise self.corrupted(exc) from exc
        self._mark_dirty(offset, length)

    async def _read_padded(self, offset: int, length: int) -> tuple[int, bytearray] | None:
        """``None`` when ``[offset, offset + length)`` suits the driver's alignment;
        otherwise the aligned range around it, read: its start and its bytes."""
        align = self.driver.request_alignment
        if not (offset % align or length % align):
            return None
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        bounce = bytearray(end - start)
        await self.driver.read(start, memoryview(bounce))
        return start, bounce

    def debug_event(self, name: str) -> None:
        """Tell this node's driver that the node above reached debug point ``name``.

        As in QEMU 10 (``bdrv_co_debug_event``) the event goes to this node only, not
        further down: a format driver fires it on its ``file`` child right before the
        request it announces."""
        self.driver.debug_event(name)

    async def flush(self) -> None:
        file = self.children.get(self.child_role)
        if file is not None:
            file.debug_event("flush_to_os")
            file.debug_event("flush_to_disk")
        try:
            await self.driver.flush()
        except ImageError as exc:
            raise self.corrupted(exc) from exc

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """This layer's status of ``[offset, offset + length)``, clamped to the node."""
        size = self.length()
        if offset >= size:
            return BlockStatus(Status.NONE, 0)
        try:
            return await self.driver.block_status(offset, min(length, size - offset))
        except ImageError as exc:
            raise self.corrupted(exc) from exc

    def corrupted(self, exc: ImageError) -> OSError:
        """The ``EIO`` a request that found the image corrupt (``exc``) fails with; the
        first time, the corruption is reported (:attr:`on_corruption`)."""
        if not self.corruption_reported:
            self.corruption_reported = True
            if self.on_corruption is not None:
                self.on_corruption(self, exc.desc)
        return _error(errno.EIO)
