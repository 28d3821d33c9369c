"""``copy-on-read``: a filter that stores what it reads from below into its child.

Reads through this filter return the ``file`` child's data, as any filter does; on the way, every
range the child does not store itself (it is read from the child's backing chain) is written into
the child. With ``bottom``, only ranges that some layer from the child's backing down to ``bottom``
(inclusive) stores are copied; data of the layers below ``bottom`` stays where it is. This is how
``block-stream`` copies (docs/qemu-behaviour/block-stream.md §4, docs/qemu-behaviour/blockdev.md §2;
QEMU's ``block/copy-on-read.c`` and ``bdrv_co_do_copy_on_readv``).

:meth:`CopyOnReadDriver.prefetch` does the copying without returning data. The stream
job decides per step itself, claims the range (:meth:`~CopyOnReadDriver.claim`) and runs the
copy (:meth:`~CopyOnReadDriver.copy_claimed`) while it decides the next steps; copies go
through :mod:`blockd.block.host.offload` where every layer allows. A copy (its decision, read
and write) and a read or write through the filter never overlap, so a copy cannot store
stale data over a newer write; every parent of the child writes through the filter once
``block-stream`` has inserted it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import trio

from blockd.block import chain
from blockd.block.driver import BlockStatus, Driver
from blockd.block.host import offload
from blockd.block.node import BlockNode
from blockd.block.request_lock import RequestLock
from blockd.errors import RequestError

#: the largest piece copied in one read/write pair (bounds the bounce buffer)
MAX_BOUNCE: Final = 1024 * 1024


_ZERO_PREFIX: Final = bytes(4096)


@functools.lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return bytes(length)


def _is_zero(view: memoryview) -> bool:
    """Whether ``view`` holds only zero bytes (memcmp speed; data rarely starts zeroed)."""
    obj = view.obj
    if isinstance(obj, bytearray) and len(obj) == len(view):
        if not obj.startswith(_ZERO_PREFIX[: len(obj)]):
            return False
        return obj == _zeros(len(obj))
    data = view.tobytes()
    return data.startswith(_ZERO_PREFIX[: len(data)]) and data == _zeros(len(data))


def _find_below(start: BlockNode, name: str) -> BlockNode | None:
    node: BlockNode | None = start
    while node is not None:
        if node.name == name:
            return node
        node = node.filtered
    return None


class CopyOnReadDriver(Driver):
    """The ``copy-on-read`` filter over its ``file`` child."""

    format_name: ClassVar[str] = "copy-on-read"
    is_filter: ClassVar[bool] = True
    link_kind = "copy-on-read"

    def __init__(self, node: BlockNode, bottom: BlockNode | None) -> None:
        super().__init__(node)
        #: the lowest layer whose data is copied; ``None`` = every layer
        self.bottom = bottom
        #: leave all-zero ranges unallocated instead of writing them. Only correct when
        #: nothing will show through them: a stream that removes the whole backing
        #: chain sets it (QEMU writes zero clusters there; blockd has no write-zeroes).
        self.skip_zero_writes = False
        self._bounce = bytearray()
        #: copy decisions and writes through the filter never overlap
        self._serial = RequestLock()
        #: ranges of copies decided but not finished (see :meth:`claim`)
        self._claims: list[tuple[int, int]] = []
        self._claims_changed = trio.Event()
        #: one copy at a time uses the bounce buffer
        self._bounce_lock = RequestLock()

    @classmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> CopyOnReadDriver:
        child = node.file
        if child is None:
            raise RequestError("Parameter 'file' is missing")
        bottom: BlockNode | None = None
        name = options.get("bottom")
        if name is not None:
            bottom = _find_below(child, str(name))
            if bottom is None:
                raise RequestError(f"Bottom node '{name}' not found")
            if not hasattr(bottom, "driver"):
                raise RequestError(f"Bottom node '{name}' not opened")
            if bottom.is_filter:
                raise RequestError(f"Bottom node '{name}' is a filter")
        return cls(node, bottom)

    @property
    def _child(self) -> BlockNode:
        child = self.node.file
        assert child is not None
        return child

    def length(self) -> int:
        return self._child.length()

    @property
    def request_alignment(self) -> int:
        return self._child.driver.request_alignment

    async def _copy_decision(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether to copy ``[offset, offset + n)``, and ``n``; ``n == 0`` means the
        rest of the range lies past the end of a shorter backing chain."""
        top = self._child
        allocated, n = await chain.is_allocated(top, offset, length)
        if allocated:
            return False, n
        if self.bottom is None:
            return True, n
        below = chain.backing_chain_next(top)
        if below is None:
            return False, n
        try:
            allocated, n = await chain.is_allocated_above(below, self.bottom, True, offset, n)
        except OSError:
            # Let the copying read report the error, as QEMU does.
            return True, n
        return allocated, n

    async def _copy(
        self, offset: int, length: int, buf: memoryview | None, source: BlockNode | None = None
    ) -> None:
        """Read ``[offset, offset + length)`` through the child (or ``source``, which
        shows the same data there) and store it in the child."""
        top = self._child
        reader = top if source is None else source
        if buf is None:
            if len(self._bounce) < min(MAX_BOUNCE, length):
                self._bounce = bytearray(min(MAX_BOUNCE, length))
            bounce = memoryview(self._bounce)
        else:
            bounce = buf
        done = 0
        while done < length:
            piece = min(len(bounce), length - done)
            view = bounce[done : done + piece] if buf is not None else bounce[:piece]
            await reader.read(offset + done, view)
            if not (self.skip_zero_writes and _is_zero(view)):
                # QEMU fires cor_write on the node it copies into (io.c)
                top.debug_event("cor_write")
                await top.write(offset + done, view)
            done += piece

    async def read(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        pos = offset
        while pos < end:
            async with self._serial:
                await self._wait_claims(pos, end - pos)
                copy, n = await self._copy_decision(pos, end - pos)
                if n == 0:
                    # Past the end of a shorter backing chain: nothing to copy.
                    await self._child.read(pos, buf[pos - offset :])
                    return
                view = buf[pos - offset : pos - offset + n]
                if copy:
                    await self._copy(pos, n, view)
            if not copy:
                await self._child.read(pos, view)
            pos += n

    async def prefetch(self, offset: int, length: int) -> None:
        """Copy what a read of ``[offset, offset + length)`` would copy; return nothing.

        Raises:
            OSError: a read or the copy's write failed (the range may be partly copied).
        """
        if offset < 0 or length < 0 or offset + length > self.length():
            raise OSError(22, "Invalid argument")
        end = offset + length
        pos = offset
        while pos < end:
            async with self._serial:
                await self._wait_claims(pos, end - pos)
                copy, n = await self._copy_decision(pos, end - pos)
                if n == 0:
                    return
                if copy:
                    async with self._bounce_lock:
                        await self._copy(pos, n, None)
            pos += n

    @property
    def serial(self) -> RequestLock:
        """The lock that keeps copy decisions and writes through the filter apart. A
        caller that decides itself what to copy (the stream job, to query the chain
        once per step) holds it for the decision and claims the range (:meth:`claim`)
        before letting go; the copy itself (:meth:`copy_claimed`) runs without it."""
        return self._serial

    def claim(self, offset: int, length: int) -> None:
        """Reserve ``[offset, offset + length)`` for a copy decided under :attr:`serial`
        (held by the caller): until :meth:`copy_claimed` is done, reads and writes
        through the filter that overlap it wait, so the copy can never store stale data
        over a newer write."""
        self._claims.append((offset, length))

    async def copy_claimed(self, offset: int, length: int) -> None:
        """Copy the claimed range into the child and release the claims in it (adjacent
        claims may be copied at once): the child stores none of it and a layer down to
        ``bottom`` stores all of it. Runs without :attr:`serial`; several claimed
        copies may run at once.

        Raises:
            OSError: a read or the copy's write failed (the range may be partly copied).
        """
        try:
            if offset < 0 or length < 0 or offset + length > self.length():
                raise OSError(22, "Invalid argument")
            source = self._backing_source(offset + length)
            pos, end = offset, offset + length
            while pos < end:
                n = end - pos
                if source is not None:
                    extents, n = await offload.map_prefix(source, pos, n)
                    if extents is not None and await offload.copy_extents(
                        self._child, pos, extents
                    ):
                        pos += n
                        continue
                async with self._bounce_lock:
                    await self._copy(pos, n, None, source=source)
                pos += n
        finally:
            end = offset + length
            self._claims = [(o, n) for o, n in self._claims if not offset <= o < end]
            self._claims_changed.set()
            self._claims_changed = trio.Event()

    async def _wait_claims(self, offset: int, length: int) -> None:
        """Wait until no claimed copy overlaps ``[offset, offset + length)``."""
        end = offset + length
        while any(o < end and offset < o + n for o, n in self._claims):
            await self._claims_changed.wait()

    def _backing_source(self, end: int) -> BlockNode | None:
        """The node a copy may read from instead of the child: the child's backing node
        when the child is an image (not a filter) whose backing reaches ``end``. The
        child stores nothing of a range it copies, so its reads there are exactly the
        backing node's; reading that directly skips one layer per copy."""
        child = self._child
        if child.is_filter or child.is_protocol:
            return None
        backing = child.backing
        if backing is None or backing.length() < end:
            return None
        return backing

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        # Never between a copy's decision and its write: the copy would store the old
        # data over this write (QEMU serialises copy-on-read requests the same way).
        async with self._serial:
            await self._wait_claims(offset, len(memoryview(data).cast("B")))
            await self._child.write(offset, data)

    async def flush(self) -> None:
        await self._child.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        return await self._child.block_status(offset, length)
