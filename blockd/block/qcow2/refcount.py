"""qcow2 reference counts: the refcount table, a write-back cache of refcount-block
slices, and cluster allocation.

Theory of operation (the crash-consistency rules ``qemu-img check`` judges):

* A cluster's on-disk refcount must never be lower than the number of on-disk references
  to it (that is corruption); a higher refcount is only a leak.
* So increments (allocations) reach the disk *before* any table that points at the new
  cluster: :meth:`Refcounts.write_back` writes dirty refcount slices, flushes, then the
  changed refcount-table entries, and flushes again. The driver calls it before it writes
  any L2 table or L1 entry.
* Decrements (a cluster replaced by copy-on-write) are only queued with
  :meth:`Refcounts.release`; :meth:`Refcounts.apply_releases` applies them after the driver
  has made the tables that dropped the reference stable. Cached slices therefore never
  hold a decrement that could reach the disk too early, and any dirty slice may be written
  at any time (cache eviction).
* New clusters come from the end of the file and freed clusters are never reused while
  the image is open, so a cluster is never handed out twice before the tables settle.

Slices: the cache unit is a slice of a refcount block, :data:`SLICE_BYTES` on disk (the
whole block when the cluster is smaller), decoded to one native array. A slice is read,
kept, dirtied and written back on its own, at ``block offset + slice index * slice
bytes``. QEMU's refcount cache always holds whole refcount blocks (its
``l2-cache-entry-size`` option only cuts L2 tables into slices); blockd slices both caches
because an image typically uses a few thousand entries of a block that holds 32768, and a
daemon streaming many images at once would otherwise keep mostly unused blocks in memory.
``refcount-cache-size`` keeps its meaning in bytes: it is divided by the slice size. No
operation holds a slice across a lookup of another, so two cached slices are enough for
any allocation: a run that spans several slices is checked and then claimed one slice at
a time, and a slice evicted in between is written (if dirty) and read again.

References:
    - qemu/qemu: block/qcow2-refcount.c (``alloc_refcount_block``, ``qcow2_refcount_area``,
      ``update_refcount``), block/qcow2-cache.c (dependencies between the two caches),
      docs/qcow2-cache.txt (cache sizes; L2 slices).
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blockd.block.qcow2.format import (
    REFTABLE_OFFSET_MASK,
    c_hex,
    decode_refblock,
    decode_table,
    encode_refblock,
    encode_table,
    refblock_typecode,
)
from blockd.errors import ImageError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

#: header offset of refcount_table_offset (u64) followed by refcount_table_clusters (u32)
_HEADER_REFTABLE_AT = 48
#: total decoded entries kept in the slice cache by default (as many as 128 blocks of
#: 16-bit refcounts in 64 KiB clusters: bounded memory for any cluster size)
_CACHE_ENTRIES = 1 << 22
#: bytes of a refcount block read, cached and written as one slice
SLICE_BYTES = 4096


class RefcountTable:
    """The refcount table: ``len()`` entries (its capacity), kept sparse. A table is
    sized in clusters while a small image uses one or two entries; a dense list would
    cost 64 KiB per open image for nothing.
    """

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int, entries: dict[int, int]) -> None:
        self._capacity = capacity
        self._entries = entries

    @classmethod
    def decode(cls, data: bytes) -> RefcountTable:
        """The table in ``data`` (big-endian entries, reserved bits cleared)."""
        raw = decode_table(data)
        used = {i: e & REFTABLE_OFFSET_MASK for i, e in enumerate(raw) if e & REFTABLE_OFFSET_MASK}
        return cls(len(raw), used)

    def __len__(self) -> int:
        return self._capacity

    def __getitem__(self, index: int) -> int:
        return self._entries.get(index, 0)

    def __setitem__(self, index: int, offset: int) -> None:
        if offset:
            self._entries[index] = offset
        else:
            self._entries.pop(index, None)

    def __iter__(self) -> Iterator[int]:
        dense = [0] * self._capacity
        for index, offset in self._entries.items():
            dense[index] = offset
        return iter(dense)

    def chunk(self, start: int, stop: int) -> array[int]:
        """Entries ``[start, stop)`` as a table to write."""
        return array("Q", (self._entries.get(i, 0) for i in range(start, stop)))

    def grown(self, capacity: int) -> RefcountTable:
        """A copy with room for ``capacity`` entries."""
        return RefcountTable(max(capacity, self._capacity), dict(self._entries))


class Refcounts:
    """Refcounts of one open image. The caller serialises all calls (the driver's lock).

    Args:
        file: the image's file node.
        cluster_bits: log2 of the cluster size.
        refcount_order: log2 of the refcount width in bits.
        table_offset: refcount table offset from the header.
        table_clusters: refcount table size in clusters from the header.
        table: the decoded refcount table (entry offsets, reserved bits cleared).
        file_length: the image file's length at open; allocation starts at its end.
        cache_bytes: QEMU's ``refcount-cache-size``: on-disk bytes of the slices kept in
            the cache, at least two slices (default: a few million entries).
    """

    def __init__(
        self,
        file: BlockNode,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        table: RefcountTable,
        file_length: int,
        cache_bytes: int | None = None,
    ) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.block_bits = cluster_bits + 3 - refcount_order
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table = table
        self.next_free = -(-file_length // self.cluster_size)
        self._code = refblock_typecode(refcount_order)
        self.slice_bytes = min(SLICE_BYTES, self.cluster_size)
        #: log2 of the entries in a slice; slice ``g`` covers clusters ``g << slice_bits``..
        self.slice_bits = self.slice_bytes.bit_length() + 2 - refcount_order
        self.slice_mask = (1 << self.slice_bits) - 1
        #: log2 of the slices in a block: slice ``g`` lies in block ``g >> _block_shift``
        self._block_shift = self.block_bits - self.slice_bits
        self._slice_in_block = (1 << self._block_shift) - 1
        self._slices: OrderedDict[int, array[int]] = OrderedDict()
        self._dirty_slices: set[int] = set()
        self._dirty_table: set[int] = set()
        self._releases: list[int] = []
        #: slices were written (cache eviction) and not flushed yet
        self._unflushed = False
        wanted = (
            cache_bytes // self.slice_bytes if cache_bytes else _CACHE_ENTRIES >> self.slice_bits
        )
        self._cache_limit = max(2, wanted)

    @classmethod
    def decode_table(cls, data: bytes) -> RefcountTable:
        return RefcountTable.decode(data)

    # -- the slice cache ---------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_slices or self._dirty_table)

    @property
    def has_releases(self) -> bool:
        return bool(self._releases)

    def _slice_offset(self, g: int) -> int:
        return self.table[g >> self._block_shift] + (g & self._slice_in_block) * self.slice_bytes

    async def _slice(self, g: int) -> array[int] | None:
        """Slice ``g`` (clusters ``g << slice_bits`` on), or ``None`` when its refcount
        block is not allocated."""
        sl = self._slices.get(g)
        if sl is not None:
            self._slices.move_to_end(g)
            return sl
        index = g >> self._block_shift
        if index >= len(self.table) or not self.table[index]:
            return None
        if self.table[index] % self.cluster_size:
            raise ImageError(
                f"Refblock offset {c_hex(self.table[index])} unaligned "
                f"(reftable index: {c_hex(index)})"
            )
        self.file.debug_event("refblock_load")
        # decoded at once: the raw bytes are dropped before anything else can run
        sl = decode_refblock(
            await self.file.pread(self._slice_offset(g), self.slice_bytes), self.order
        )
        await self._insert(g, sl)
        return sl

    async def _insert(self, g: int, sl: array[int]) -> None:
        self._slices[g] = sl
        self._slices.move_to_end(g)
        while len(self._slices) > self._cache_limit:
            victim = next(iter(self._slices))
            if victim in self._dirty_slices:
                await self._write_run([victim])
            del self._slices[victim]

    async def _insert_zero(self, cluster: int) -> None:
        """Cache the slice of ``cluster``, in a block just created, as zeros without
        reading it (the disk holds zeros there already)."""
        g = cluster >> self.slice_bits
        if g not in self._slices:
            await self._insert(g, array(self._code, [0]) * (1 << self.slice_bits))

    async def _write_run(self, run: list[int]) -> None:
        """Write the cached slices ``run`` (consecutive, in one block) in one write."""
        self.file.debug_event("refblock_update")
        data = b"".join(encode_refblock(self._slices[g], self.order) for g in run)
        await self.file.write(self._slice_offset(run[0]), data)
        self._dirty_slices.difference_update(run)
        self._unflushed = True

    async def get(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (0 when no block covers it)."""
        sl = await self._slice(cluster >> self.slice_bits)
        return 0 if sl is None else sl[cluster & self.slice_mask]

    async def _add(self, cluster: int, delta: int) -> None:
        g = cluster >> self.slice_bits
        sl = await self._slice(g)
        if sl is None:
            raise ImageError(f"qcow2: no refcount block for cluster {cluster:#x}")
        value = sl[cluster & self.slice_mask] + delta
        if not 0 <= value <= self.max_refcount:
            raise ImageError(f"qcow2: refcount of cluster {cluster:#x} out of range")
        sl[cluster & self.slice_mask] = value
        self._dirty_slices.add(g)

    # -- allocation --------------------------------------------------------------------

    async def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters with refcount 1; returns the first index.

        The clusters come after every cluster in use; new refcount blocks and a larger
        refcount table are created as needed (in the cache, or written at once for the
        table, see :meth:`_grow_table`).
        """
        while True:
            start = self.next_free
            index = start >> self.block_bits
            if index >= len(self.table):
                await self._grow_table(index)
                continue
            sl = await self._slice(start >> self.slice_bits)
            if sl is None:
                await self._new_block(index, start)
                continue
            if sl[start & self.slice_mask]:
                self.next_free = start + 1
                continue
            if await self._claim(start, count):
                self.next_free = start + count
                return start

    async def _claim(self, start: int, count: int) -> bool:
        """Set refcount 1 on ``[start, start+count)`` if all are free and covered.

        One slice at a time, in two passes (check, then claim), never holding a slice
        across the lookup of the next: a slice evicted between the passes was written
        if dirty and is read back the same, so the cache limit need not cover the run.
        """
        end = start + count
        sb, mask = self.slice_bits, self.slice_mask
        # first pass: every block exists and every entry is free
        cluster = start
        while cluster < end:
            g = cluster >> sb
            index = g >> self._block_shift
            stop = min(end, (g + 1) << sb)
            if index >= len(self.table):
                await self._grow_table(index)
                return False
            sl = await self._slice(g)
            if sl is None:
                # ``start`` is free and covered: it becomes the new block
                await self._new_block(index, start)
                return False
            a, b = cluster & mask, ((stop - 1) & mask) + 1
            if any(sl[a:b]):
                used = next(i for i in range(a, b) if sl[i])
                self.next_free = (g << sb) + used + 1
                return False
            cluster = stop
        cluster = start
        while cluster < end:
            g = cluster >> sb
            stop = min(end, (g + 1) << sb)
            sl = await self._slice(g)
            assert sl is not None
            a, b = cluster & mask, ((stop - 1) & mask) + 1
            sl[a:b] = array(self._code, [1]) * (b - a)
            self._dirty_slices.add(g)
            cluster = stop
        return True

    async def _new_block(self, index: int, at: int) -> None:
        """Create the refcount block for table ``index`` in the free cluster ``at``.

        The cluster is written (zeros) before anything changes: the space is taken now,
        so a full disk fails this allocation instead of a later flush. Only the slices
        later touched are cached and written again."""
        self.file.debug_event("refblock_alloc_write")
        await self.file.write(at << self.cluster_bits, bytes(self.cluster_size))
        self.table[index] = at << self.cluster_bits
        self._dirty_table.add(index)
        if at >> self.block_bits == index:  # the block covers itself
            await self._insert_zero(at)
        await self._add(at, 1)
        self.next_free = max(self.next_free, at + 1)

    async def _grow_table(self, needed: int) -> None:
        """Move the refcount table to a larger copy at the end of the file.

        Order (crash-safe): refcount blocks covering the new area, flush; the new table,
        flush; the header's two reftable fields in one write, flush; only then the old
        table's clusters are released. The new blocks are written whole (zeros) first,
        then their touched slices.
        """
        cs = self.cluster_size
        per_cluster = cs // 8
        start = self.next_free
        while True:
            tclusters, missing = self._table_layout(start, needed)
            end = start + tclusters + len(missing)
            free = await self._free_run_start(start, end - start)
            if free == start:
                break
            start = free
        if missing:
            await self.file.write(
                (start + tclusters) << self.cluster_bits, bytes(len(missing) * cs)
            )
        new_table = self.table.grown(tclusters * per_cluster)
        for k, t in enumerate(missing):
            new_table[t] = (start + tclusters + k) << self.cluster_bits
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        fresh = set(missing)
        for cluster in range(start, end):
            if cluster >> self.block_bits in fresh:
                await self._insert_zero(cluster)
            await self._add(cluster, 1)
        await self._write_slices()
        await self.file.flush()
        self._unflushed = False
        await self.file.write(
            start << self.cluster_bits, encode_table(new_table.chunk(0, len(new_table)))
        )
        await self.file.flush()
        await self.file.write(
            _HEADER_REFTABLE_AT, struct.pack(">QI", start << self.cluster_bits, tclusters)
        )
        await self.file.flush()
        self.table_offset, self.table_clusters = start << self.cluster_bits, tclusters
        self._dirty_table.clear()
        self.next_free = end
        first_old = old_offset >> self.cluster_bits
        for cluster in range(first_old, first_old + old_clusters):
            await self._add(cluster, -1)

    def _table_layout(self, start: int, needed: int) -> tuple[int, list[int]]:
        """Size (clusters) of a new refcount table placed at cluster ``start`` and the
        table indices that need new blocks right after it, so that the table covers
        ``needed`` and every block covers itself and the table (a fixpoint)."""
        per_cluster = self.cluster_size // 8
        entries = max(needed + 1, len(self.table) * 2)
        while True:
            tclusters = -(-entries // per_cluster)
            missing: list[int] = []
            while True:
                end = start + tclusters + len(missing)
                now = [
                    t
                    for t in range(start >> self.block_bits, ((end - 1) >> self.block_bits) + 1)
                    if t >= len(self.table) or not self.table[t]
                ]
                if len(now) == len(missing):
                    break
                missing = now
            if max([needed, *missing]) < tclusters * per_cluster:
                return tclusters, missing
            entries = max([needed, *missing]) + 1

    async def _free_run_start(self, start: int, count: int) -> int:
        """The first cluster from ``start`` on that begins ``count`` clusters which no
        existing refcount block marks as used (clusters leaked past the end of the file
        by an interrupted run keep their refcounts)."""
        cluster = start
        while cluster < start + count:
            if await self.get(cluster):
                start = cluster + 1
            cluster += 1
        return start

    # -- releases and write-back -------------------------------------------------------

    def release(self, cluster: int) -> None:
        """Queue a decrement of ``cluster``'s refcount, applied by :meth:`apply_releases`."""
        self._releases.append(cluster)

    async def apply_releases(self) -> None:
        """Apply queued decrements; call only once no stable table references them."""
        releases, self._releases = self._releases, []
        for cluster in releases:
            await self._add(cluster, -1)

    async def _write_slices(self) -> None:
        """Write every dirty slice, consecutive slices of a block in one write."""
        run: list[int] = []
        for g in sorted(self._dirty_slices):
            if run and (g != run[-1] + 1 or g >> self._block_shift != run[0] >> self._block_shift):
                await self._write_run(run)
                run = []
            run.append(g)
        if run:
            await self._write_run(run)

    async def write_back(self) -> bool:
        """Make every cached refcount change stable: slices, flush, table entries, flush.
        Returns whether the file was flushed (else nothing was dirty)."""
        flushed = False
        if self._dirty_slices or self._unflushed:
            await self._write_slices()
            await self.file.flush()
            self._unflushed = False
            flushed = True
        if self._dirty_table:
            cs = self.cluster_size
            per_cluster = cs // 8
            for tc in sorted({i // per_cluster for i in self._dirty_table}):
                chunk = self.table.chunk(tc * per_cluster, (tc + 1) * per_cluster)
                await self.file.write(self.table_offset + tc * cs, encode_table(chunk))
            self._dirty_table.clear()
            await self.file.flush()
            flushed = True
        return flushed
