"""The qcow2 L2 cache: slices of L2 tables, LRU, write-back, and the one ordering rule it
must keep.

The unit of the cache is a *slice*: a fixed number of bytes of one L2 table (QEMU's
``l2-cache-entry-size``; blockd's default is 4 KiB, or the cluster when that is
smaller). Only the slices that requests use are read, kept, changed and written back:
a 64 MiB image with 64 KiB clusters maps its guest with 8 KiB of its one 64 KiB table.

An L2 slice may reach the disk only after the refcounts of every cluster it points to
(and of its table) are stable, so evicting a dirty slice first makes the refcount cache
write back (see :mod:`blockd.block.qcow2.refcount`). Slices are native ``array('Q')``
objects shared with the driver; a slice changed after an eviction is put back by
:meth:`L2Cache.changed`, so no change is lost.

References:
    - qemu/qemu: block/qcow2-cache.c (``qcow2_cache_set_dependency``: the L2 cache
      depends on the refcount cache); docs/qcow2-cache.txt (L2 cache entry size).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from blockd.block.qcow2 import format as fmt

if TYPE_CHECKING:
    from blockd.block.node import BlockNode
    from blockd.block.qcow2.refcount import Refcounts


class L2Cache:
    """At most ``limit`` L2 slices of ``slice_size`` bytes, by host offset; the caller
    serialises all calls and passes only offsets inside an L2 table, aligned to a slice."""

    def __init__(self, file: BlockNode, refcounts: Refcounts, slice_size: int, limit: int):
        self.file = file
        self.refcounts = refcounts
        self.slice_size = slice_size
        self.limit = max(2, limit)
        self._slices: OrderedDict[int, array[int]] = OrderedDict()
        self._dirty: set[int] = set()
        #: slices were written by eviction and not flushed yet
        self._unflushed = False

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    async def get(self, offset: int) -> array[int]:
        """The L2 slice at host ``offset``, from the cache or the file."""
        slice_ = self._slices.get(offset)
        if slice_ is not None:
            self._slices.move_to_end(offset)
            return slice_
        self.file.debug_event("l2_load")
        slice_ = fmt.decode_table(await self.file.pread(offset, self.slice_size))
        await self._insert(offset, slice_)
        return slice_

    def forget(self, start: int, length: int) -> None:
        """Drop the cached slices of host bytes ``[start, start + length)``: a table
        that is no longer in use (only tables never changed here are replaced, so none
        of these is dirty; a dirty one would be kept)."""
        for offset in range(start, start + length, self.slice_size):
            if offset not in self._dirty:
                self._slices.pop(offset, None)

    def changed(self, offset: int, slice_: array[int]) -> None:
        """Mark ``slice_`` (the slice at ``offset``) dirty, re-caching it if it was
        evicted."""
        if offset not in self._slices:
            self._slices[offset] = slice_
        self._dirty.add(offset)

    async def _insert(self, offset: int, slice_: array[int]) -> None:
        self._slices[offset] = slice_
        self._slices.move_to_end(offset)
        while len(self._slices) > self.limit:
            victim = next(iter(self._slices))
            if victim in self._dirty:
                await self.refcounts.write_back()
                await self.file.flush()  # the data the slice points at is stable first
                self.file.debug_event("l2_update")
                await self.file.write(victim, fmt.encode_table(self._slices[victim]))
                self._dirty.discard(victim)
                self._unflushed = True
            del self._slices[victim]

    async def write_back(self) -> None:
        """Write every dirty slice, then flush. Call after the refcounts' write-back."""
        if not (self._dirty or self._unflushed):
            return
        for offset in sorted(self._dirty):
            self.file.debug_event("l2_update")
            await self.file.write(offset, fmt.encode_table(self._slices[offset]))
            self._dirty.discard(offset)
        await self.file.flush()
        self._unflushed = False
