"""The qcow2 L2 table cache: LRU, write-back, and the one ordering rule it must keep.

An L2 table may reach the disk only after the refcounts of every cluster it points to
(and of itself) are stable, so evicting a dirty table first makes the refcount cache
write back (see :mod:`blockd.block.qcow2_refcount`). Tables are native ``array('Q')``
objects shared with the driver; a table changed after an eviction is put back by
:meth:`L2Cache.changed`, so no change is lost.

References:
    - qemu/qemu: block/qcow2-cache.c (``qcow2_cache_set_dependency``: the L2 cache
      depends on the refcount cache).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from blockd.block import qcow2_format as fmt
from blockd.errors import ImageError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode
    from blockd.block.qcow2_refcount import Refcounts


class L2Cache:
    """At most ``limit`` L2 tables by host offset; the caller serialises all calls."""

    def __init__(self, file: BlockNode, refcounts: Refcounts, cluster_size: int, limit: int):
        self.file = file
        self.refcounts = refcounts
        self.cluster_size = cluster_size
        self.limit = max(2, limit)
        self._tables: OrderedDict[int, array[int]] = OrderedDict()
        self._dirty: set[int] = set()
        #: tables were written by eviction and not flushed yet
        self._unflushed = False

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    async def get(self, offset: int) -> array[int]:
        """The L2 table at host ``offset``, from the cache or the file."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        if offset % self.cluster_size:
            raise ImageError(f"L2 table offset {offset:#x} unaligned")
        self.file.debug_event("l2_load")
        table = fmt.decode_table(await self.file.pread(offset, self.cluster_size))
        await self._insert(offset, table)
        return table

    async def add_new(self, offset: int, table: array[int]) -> None:
        """Cache a table that exists only in memory so far (dirty)."""
        await self._insert(offset, table)
        self._dirty.add(offset)

    def changed(self, offset: int, table: array[int]) -> None:
        """Mark ``table`` (at ``offset``) dirty, re-caching it if it was evicted."""
        if offset not in self._tables:
            self._tables[offset] = table
        self._dirty.add(offset)

    async def _insert(self, offset: int, table: array[int]) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self.limit:
            victim = next(iter(self._tables))
            if victim in self._dirty:
                await self.refcounts.write_back()
                await self.file.flush()  # the data the table points at is stable first
                self.file.debug_event("l2_update")
                await self.file.write(victim, fmt.encode_table(self._tables[victim]))
                self._dirty.discard(victim)
                self._unflushed = True
            del self._tables[victim]

    async def write_back(self) -> None:
        """Write every dirty table, then flush. Call after the refcounts' write-back."""
        if not (self._dirty or self._unflushed):
            return
        for offset in sorted(self._dirty):
            self.file.debug_event("l2_update")
            await self.file.write(offset, fmt.encode_table(self._tables[offset]))
            self._dirty.discard(offset)
        await self.file.flush()
        self._unflushed = False
