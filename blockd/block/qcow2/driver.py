"""The ``qcow2`` format driver: versions 2 and 3, reads and allocating writes.

Reads and block status are :class:`~blockd.block.qcow2.read.Qcow2Reads`; this
module opens images, writes, copies in offloaded extents and writes metadata back.

Theory of operation:

* Open reads the header cluster, the active L1 table and the refcount table, and refuses
  (``ImageError``, nothing written) anything it does not fully understand: see
  :func:`~blockd.block.qcow2.format.validate_header` and
  :func:`~blockd.block.qcow2.format.check_tables`.
* Guest requests are split per L2 table. Clusters whose L2 entry is a normal cluster with
  the COPIED flag (refcount 1) are rewritten in place; every other cluster touched by a
  write (unallocated, zero, compressed, or shared with an internal snapshot) gets a new
  host cluster. All new clusters of one request and one L2 table are allocated as one
  contiguous run and written with one file write; partial clusters at its ends are
  completed from the old contents (copy-on-write from the old cluster or the backing node).
* Metadata lives in write-back caches (L2 tables in
  :class:`~blockd.block.qcow2.cache.L2Cache`, refcount blocks in
  :class:`~blockd.block.qcow2.refcount.Refcounts`) and reaches the disk in QEMU's
  dependency order: data and refcount increments, flush; L2 tables, flush; L1 entries,
  flush; then the decrements of clusters the new tables no longer reference. A crash at
  any point can leak clusters but never leaves a reference without its refcount.
* Every request holds the driver's lock while it looks at or changes the caches, so they
  are never seen half-updated. An offloaded copy (:meth:`Qcow2Driver.copy_in`) allocates
  and links under the lock but copies without it; a write-back therefore flushes the
  data before any table that points at it.

References:
    - qemu/qemu: docs/interop/qcow2.txt; block/qcow2.c (``qcow2_do_open``,
      ``qcow2_co_preadv_part``, ``qcow2_co_block_status``, ``qcow2_change_backing_file``);
      block/qcow2-cluster.c (``qcow2_alloc_host_offset``, ``l2_allocate``,
      ``perform_cow``); block/qcow2-cache.c.
"""

from __future__ import annotations

import errno
import importlib
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from blockd.block.driver import (
    Driver,
    Extent,
    OffloadNotSupported,
    split_extents,
)
from blockd.block.qcow2 import format as fmt
from blockd.block.qcow2.cache import L2Cache
from blockd.block.qcow2.format import ClusterKind, Extension, Header
from blockd.block.qcow2.read import Qcow2Reads
from blockd.block.qcow2.refcount import Refcounts
from blockd.block.qcow2.snapshots import MAX_TABLE_BYTES, ShortTable, Snapshot, parse_table
from blockd.block.request_lock import RequestLock
from blockd.errors import ImageError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

#: bytes of L2 tables kept in the cache
L2_CACHE_BYTES = 32 * 1024 * 1024
#: bytes of one L2 cache entry (a slice of a table; never more than the cluster)
L2_SLICE_BYTES = 4096

_KIND = fmt.cluster_kind
_NORMAL = ClusterKind.NORMAL
_UNALLOCATED = ClusterKind.UNALLOCATED
_COMPRESSED = ClusterKind.COMPRESSED

#: allocating runs up to this size are completed in one buffer and written at once
_MERGE_LIMIT = 1 << 20


def _zstd_module() -> Any:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        return None


class Qcow2Driver(Qcow2Reads, Driver):
    """A qcow2 image on the node's ``file`` child, with an optional ``backing`` node."""

    format_name: ClassVar[str] = "qcow2"
    supports_backing: ClassVar[bool] = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self._lock = RequestLock()
        self.header: Header
        self.extensions: list[Extension] = []
        self.backing_name: str | None = None
        self.backing_format: str | None = None
        self.l1: array[int] = array("Q")
        self._l1_dirty: set[int] = set()
        self._l2: L2Cache
        self.refcounts: Refcounts
        self._geometry: fmt.CompressedGeometry
        self._header_area_len = 0
        self._prepared = False
        self._zstd: Any = None
        self._last_compressed: tuple[int, bytes] | None = None
        #: host clusters of the active metadata (header, L1, L2, refcount structures):
        #: in-place data writes must never land there (QEMU's overlap check)
        self._metadata: set[int] = set()
        #: the internal snapshot table (listed in ImageInfo, never changed)
        self.snapshots: list[Snapshot] = []

    # -- open ----------------------------------------------------------------------

    @classmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> Qcow2Driver:
        drv = cls(node)
        await drv._open(options)
        return drv

    async def _open(self, options: Mapping[str, Any]) -> None:
        file = self._file
        flen = file.length()
        first = await file.pread(0, min(max(flen, 0), fmt.V3_HEADER_LENGTH_QEMU))
        header = fmt.parse_header(first)
        if not fmt.MIN_CLUSTER_BITS <= header.cluster_bits <= fmt.MAX_CLUSTER_BITS:
            raise ImageError(f"Unsupported cluster size: 2^{header.cluster_bits}")
        cs = header.cluster_size
        cluster0 = await file.pread(0, cs)
        header = fmt.parse_header(cluster0)
        fmt.validate_header(header, flen)
        if header.compression_type == fmt.COMPRESSION_ZSTD:
            self._zstd = _zstd_module()
            if self._zstd is None:
                raise ImageError(
                    "qcow2: zstd compressed images need the 'zstandard' Python package"
                )
        ext_end = header.backing_file_offset or cs
        self.extensions = fmt.parse_extensions(cluster0, header.header_length, ext_end)
        for ext in self.extensions:
            if ext.type == fmt.EXT_BACKING_FORMAT:
                if len(ext.data) >= 16:
                    raise ImageError(
                        f"ERROR: ext_backing_format: len={len(ext.data)} too large (>=16)"
                    )
                self.backing_format = ext.data.decode("utf-8", "replace")
            elif ext.type in (fmt.EXT_CRYPTO, fmt.EXT_DATA_FILE):
                raise ImageError("qcow2: unsupported header extension (encryption/data file)")
        if header.backing_file_offset:
            raw = cluster0[
                header.backing_file_offset : header.backing_file_offset + header.backing_file_size
            ]
            self.backing_name = raw.decode("utf-8", "surrogateescape")
        self.header = header
        if not self.node.read_only:
            self._refuse_dirty()
        self._header_area_len = self._used_header_len(cluster0, header)
        self._geometry = fmt.CompressedGeometry.for_cluster_bits(header.cluster_bits)
        # QEMU's l2-cache-size / refcount-cache-size options (bytes), at least 2 entries
        slice_bytes = self._l2_slice_bytes(options, cs)
        self._slice_bits = (slice_bytes >> 3).bit_length() - 1
        self._slice_mask = (1 << self._slice_bits) - 1
        l2_limit = int(options.get("l2-cache-size") or L2_CACHE_BYTES) // slice_bytes
        refcount_cache = options.get("refcount-cache-size")
        refcount_bytes = int(refcount_cache) if refcount_cache else None
        if header.l1_size:
            self.l1 = fmt.decode_table(await file.pread(header.l1_table_offset, header.l1_size * 8))
        table = Refcounts.decode_table(
            await file.pread(header.refcount_table_offset, header.refcount_table_clusters * cs)
        )
        self.refcounts = Refcounts(
            file,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            table,
            flen,
            refcount_bytes,
        )
        self._l2 = L2Cache(file, self.refcounts, slice_bytes, l2_limit)
        self._metadata = fmt.check_tables(header, self.l1, table, flen)
        if header.nb_snapshots:
            self.snapshots = await self._read_snapshots(header, flen)

    @staticmethod
    def _l2_slice_bytes(options: Mapping[str, Any], cluster_size: int) -> int:
        """Bytes of one L2 cache entry: ``l2-cache-entry-size`` (checked as QEMU
        checks it), else :data:`L2_SLICE_BYTES` or the cluster when that is smaller."""
        size = options.get("l2-cache-entry-size")
        if size is None:
            return min(L2_SLICE_BYTES, cluster_size)
        size = int(size)
        if not 1 << fmt.MIN_CLUSTER_BITS <= size <= cluster_size or size & (size - 1):
            raise ImageError(
                "L2 cache entry size must be a power of two between "
                f"{1 << fmt.MIN_CLUSTER_BITS} and the cluster size ({cluster_size})"
            )
        return size

    async def _read_snapshots(self, header: Header, flen: int) -> list[Snapshot]:
        """The snapshot table, read in growing pieces up to QEMU's 64 MiB limit."""
        start = header.snapshots_offset
        limit = min(MAX_TABLE_BYTES, max(0, flen - start))
        want = min(limit, 64 * 1024)
        while True:
            data = await self._file.pread(start, want)
            try:
                return parse_table(data, header.nb_snapshots, cluster_size=header.cluster_size)
            except ShortTable as short:
                if want >= limit or short.needed > limit:
                    raise ImageError(
                        "qcow2: snapshot table is beyond the end of the image file"
                    ) from None
                want = min(limit, max(short.needed, want * 2))

    @staticmethod
    def _used_header_len(cluster0: bytes, header: Header) -> int:
        end = header.header_length + len(
            fmt.serialize_extensions(
                fmt.parse_extensions(cluster0, header.header_length, header.cluster_size)
            )
        )
        if header.backing_file_offset:
            end = max(end, header.backing_file_offset + header.backing_file_size)
        return end

    # -- simple queries --------------------------------------------------------------

    def length(self) -> int:
        return self.header.size

    def header_backing(self) -> tuple[str, str | None] | None:
        if not self.backing_name:
            return None
        return self.backing_name, self.backing_format

    def image_info(self) -> dict[str, Any]:
        h = self.header
        return {
            "cluster-size": h.cluster_size,
            "dirty-flag": bool(h.incompatible_features & fmt.INCOMPAT_DIRTY),
            "format-specific": fmt.format_specific(h),
        } | ({"snapshots": [s.info() for s in self.snapshots]} if self.snapshots else {})

    # -- write -----------------------------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.node.read_only:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        # a request that started changing metadata finishes (cancellation waits for it):
        # a half-applied allocation would leave the caches inconsistent
        async with self._lock:
            # no deadline of its own (stopping half-way would leave the caches half-applied):
            # a disk that stops answering is bounded by the shutdown watchdog (blockd.run)
            with trio.CancelScope(shield=True):
                await self._write(offset, data)

    async def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._prepare_write()
        view = memoryview(data).cast("B")
        span = 1 << (self.header.cluster_bits + self._slice_bits)
        pos = 0
        while pos < len(view):
            cur = offset + pos
            step = min(span - (cur & (span - 1)), len(view) - pos)
            await self._write_in_slice(cur, view[pos : pos + step])
            pos += step

    async def _prepare_write(self) -> None:
        """Before the first write: clear autoclear bits we do not maintain (bitmaps)."""
        if self._prepared:
            return
        self._refuse_dirty()
        if self.header.autoclear_features:
            await self._rewrite_header(
                replace(self.header, autoclear_features=0),
                self.extensions,
                (self.backing_name or "").encode("utf-8", "surrogateescape"),
            )
        self._prepared = True

    async def _table_for_write(self, l1i: int) -> int:
        """The host offset of the L2 table of ``l1i``, made writable (allocated, or
        copied when shared)."""
        entry = self.l1[l1i]
        old = entry & fmt.OFFSET_MASK
        cs = self.header.cluster_size
        if old and entry & fmt.OFLAG_COPIED:
            return old
        if old:
            # a shared table is never changed here, so the file holds all of it
            if old & (cs - 1):
                raise ImageError(fmt.unaligned_l2(old, l1i))
            content = await self._file.pread(old, cs)
        else:
            content = bytes(cs)
        self._file.debug_event("cluster_alloc")
        cluster = await self.refcounts.allocate(1)
        new = cluster << self.header.cluster_bits
        # Written at once, as QEMU's l2_allocate does: the space is taken now, so a full
        # disk fails this request instead of a later flush of the cached table. Its
        # slices are read back from the file as they are used.
        try:
            self._file.debug_event("l2_alloc_write")
            await self._file.write(new, content)
        except BaseException:
            self.refcounts.release(cluster)
            raise
        self._metadata.add(cluster)
        self.l1[l1i] = new | fmt.OFLAG_COPIED
        self._l1_dirty.add(l1i)
        if old:
            self._l2.forget(old, cs)
            self.refcounts.release(old >> self.header.cluster_bits)
        return new

    async def _write_in_slice(self, offset: int, data: memoryview) -> None:
        """Write ``data`` (within the span of one L2 slice) at guest ``offset``."""
        h = self.header
        cb = h.cluster_bits
        cs = h.cluster_size
        mask = self._slice_mask
        l2off = await self._table_for_write(offset >> (cb + h.l2_bits))
        at, table = await self._slice(l2off, offset)
        end = offset + len(data)
        first = offset >> cb
        last = (end - 1) >> cb
        c = first
        while c <= last:
            entry = table[c & mask]
            in_place = entry & fmt.OFLAG_COPIED and _KIND(entry) is _NORMAL
            d = c + 1
            if in_place:
                nxt = (entry & fmt.OFFSET_MASK) + cs
                while d <= last:
                    e = table[d & mask]
                    if not (e & fmt.OFLAG_COPIED and _KIND(e) is _NORMAL) or (
                        e & fmt.OFFSET_MASK != nxt
                    ):
                        break
                    nxt += cs
                    d += 1
                g0 = max(offset, c << cb)
                g1 = min(end, d << cb)
                self._check_data_run(entry, d - c)
                host = (entry & fmt.OFFSET_MASK) + (g0 & (cs - 1))
                self._file.debug_event("write_aio")
                await self._file.write(host, data[g0 - offset : g1 - offset])
            else:
                while d <= last:
                    e = table[d & mask]
                    if e & fmt.OFLAG_COPIED and _KIND(e) is _NORMAL:
                        break
                    d += 1
                await self._allocating_write(at, table, c, d, offset, data)
            c = d

    def _check_data_run(self, entry: int, count: int) -> None:
        """Refuse to overwrite in place clusters that are unaligned or hold metadata."""
        cs = self.header.cluster_size
        host = entry & fmt.OFFSET_MASK
        if host & (cs - 1):
            raise ImageError(f"Cluster allocation offset {host:#x} unaligned")
        first = host >> self.header.cluster_bits
        if not self._metadata.isdisjoint(range(first, first + count)):
            raise ImageError(
                f"qcow2: data cluster at {host:#x} overlaps image metadata; refusing to write"
            )

    async def _allocating_write(
        self, at: int, table: array[int], c0: int, c1: int, offset: int, data: memoryview
    ) -> None:
        """Give guest clusters ``[c0, c1)`` new host clusters holding ``data``'s part,
        completed from the old contents, then point the L2 entries (of the slice
        ``table`` at host offset ``at``) at them."""
        h = self.header
        cb = h.cluster_bits
        count = c1 - c0
        self._file.debug_event("cluster_alloc")
        host = (await self.refcounts.allocate(count)) << cb
        try:
            await self._fill_new_clusters(table, c0, c1, offset, data, host)
        except BaseException:
            # no L2 entry points at the new clusters yet: give them back (QEMU frees
            # them too), so a failed write (ENOSPC, EIO) leaks nothing. The release
            # is applied at the next write-back and the allocator never goes back
            # below ``next_free``, so they are not handed out again before then.
            await self._free_new_clusters(host, count)
            raise
        self._link_clusters(at, table, c0, count, host)

    async def _free_new_clusters(self, host: int, count: int) -> None:
        """Give back ``count`` new clusters from ``host`` on that a failed write may have
        partly filled: their refcounts, and their space on the host (QEMU frees them
        too; on a full disk the retry needs that space)."""
        cb = self.header.cluster_bits
        for k in range(count):
            self.refcounts.release((host >> cb) + k)
        await self._file.discard(host, count << cb)

    def _link_clusters(self, at: int, table: array[int], c0: int, count: int, host: int) -> None:
        """Point guest clusters ``[c0, c0 + count)`` of the slice ``table`` (at host
        offset ``at``) at the new host clusters from ``host`` on, once their data is
        written; the old ones go."""
        cb = self.header.cluster_bits
        mask = self._slice_mask
        for k in range(count):
            i = (c0 + k) & mask
            old = table[i]
            table[i] = (host + (k << cb)) | fmt.OFLAG_COPIED
            self._release_entry(old)
        self._l2.changed(at, table)

    async def copy_in(self, offset: int, extents: Sequence[Extent]) -> None:
        """Take host extents into the guest range they cover (an offloaded copy).

        The guest range must start on a cluster boundary and end on one or at the end
        of the image, and be either all unallocated here (as a copy from the backing
        chain finds it) or all normal clusters written in place (as a commit finds an
        allocated base; :meth:`_copy_in_place`). For an unallocated range, under the
        lock, one contiguous run of new clusters per L2 table is allocated; the
        ``file`` node copies the data there without the lock, so other requests (the
        next copies among them) go on meanwhile, and reads of the range still see the
        backing chain's identical data; then, under the lock again, the L2 entries
        point at the new clusters.

        Raises:
            OffloadNotSupported: the range does not qualify, or the ``file`` node
                cannot offload; no data or L2 entry was written.
        """
        if self.node.read_only:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        h = self.header
        cb = h.cluster_bits
        span_bits = cb + h.l2_bits
        end = offset + sum(e.length for e in extents)
        if offset & (h.cluster_size - 1) or (end & (h.cluster_size - 1) and end != h.size):
            raise OffloadNotSupported
        # no deadline of its own (stopping half-way would leave the caches half-applied):
        # a disk that stops answering is bounded by the shutdown watchdog (blockd.run)
        with trio.CancelScope(shield=True):
            runs: list[tuple[int, int, int, list[Extent]]] = []  # guest, count, host, data
            async with self._lock:
                first, run = await self._status_run(offset, end)
                if _KIND(first) is _NORMAL and run == end - offset:
                    await self._copy_in_place(offset, end, extents)
                    return
                if _KIND(first) is not _UNALLOCATED or run != end - offset:
                    raise OffloadNotSupported
                await self._prepare_write()
                rest = list(extents)
                pos = offset
                while pos < end:
                    stop = min(end, (pos | ((1 << span_bits) - 1)) + 1)
                    part, rest = split_extents(rest, stop - pos)
                    await self._table_for_write(pos >> span_bits)
                    count = (stop - pos + h.cluster_size - 1) >> cb
                    self._file.debug_event("cluster_alloc")
                    runs.append((pos, count, (await self.refcounts.allocate(count)) << cb, part))
                    pos = stop
            try:
                for _guest, _count, host, part in runs:
                    self._file.debug_event("write_aio")
                    await self._file.copy_in(host, part)
            except BaseException:
                async with self._lock:
                    for _guest, count, host, _part in runs:
                        await self._free_new_clusters(host, count)
                raise
            async with self._lock:
                for guest, count, host, _part in runs:
                    await self._link_copied(guest, count, host)

    async def _copy_in_place(self, offset: int, end: int, extents: Sequence[Extent]) -> None:
        """The copy into ``[offset, end)`` (under the lock, as an in-place :meth:`write`
        is): when every cluster there is a normal one written in place (``COPIED``, not
        shared), each L2 slice's part with the same flags and the host clusters
        following each other (what :meth:`_status_run` found contiguous), the ``file``
        node copies the extents over them; no metadata changes.

        Raises:
            OffloadNotSupported: a cluster does not qualify; nothing was written.
        """
        h = self.header
        cb = h.cluster_bits
        cs = h.cluster_size
        span_bits = cb + self._slice_bits
        mask = self._slice_mask
        entry = 0
        pos = offset
        while pos < end:
            l2off = self._l2_table(pos >> (cb + h.l2_bits))
            span_end = min(((pos >> span_bits) + 1) << span_bits, end)
            _, table = await self._slice(l2off, pos)
            idx, last = (pos >> cb) & mask, ((span_end - 1) >> cb) & mask
            if not entry:
                entry = table[idx]
                if not entry & fmt.OFLAG_COPIED:
                    raise OffloadNotSupported
            want = entry + (pos - offset)
            if table[idx : last + 1] != array("Q", range(want, want + (last - idx + 1) * cs, cs)):
                raise OffloadNotSupported
            pos = span_end
        self._check_data_run(entry, (end - offset + cs - 1) >> cb)
        await self._prepare_write()
        self._file.debug_event("write_aio")
        await self._file.copy_in(entry & fmt.OFFSET_MASK, extents)

    async def _link_copied(self, guest: int, count: int, host: int) -> None:
        """Point the unallocated guest clusters from ``guest`` on (within one L2 table)
        at the copied host clusters from ``host`` on, slice by slice (re-reading each:
        the cache may have dropped it). A cluster some other request allocated
        meanwhile keeps its data; its copy is freed."""
        cb = self.header.cluster_bits
        per_slice = 1 << self._slice_bits
        l2off = await self._table_for_write(guest >> (cb + self.header.l2_bits))
        done = 0
        while done < count:
            c0 = (guest >> cb) + done
            n = min(count - done, per_slice - (c0 & (per_slice - 1)))
            at, table = await self._slice(l2off, c0 << cb)
            self._link_unallocated(at, table, c0, n, host + (done << cb))
            done += n

    def _link_unallocated(self, at: int, table: array[int], c0: int, count: int, host: int) -> None:
        """:meth:`_link_clusters` for the entries of ``[c0, c0 + count)`` that are still
        unallocated; the copies meant for the others are freed."""
        cb = self.header.cluster_bits
        mask = self._slice_mask
        start = 0
        for k in range(count + 1):
            if k < count and _KIND(table[(c0 + k) & mask]) is _UNALLOCATED:
                continue
            if k > start:
                self._link_clusters(at, table, c0 + start, k - start, host + (start << cb))
            if k < count:
                self.refcounts.release((host >> cb) + k)
            start = k + 1

    async def _fill_new_clusters(
        self, table: array[int], c0: int, c1: int, offset: int, data: memoryview, host: int
    ) -> None:
        """Write guest clusters ``[c0, c1)`` to the new host clusters at ``host``: the
        part of ``data`` that falls there, completed from the old contents."""
        h = self.header
        cb = h.cluster_bits
        mask = self._slice_mask
        count = c1 - c0
        g0, g1 = c0 << cb, c1 << cb
        d0, d1 = max(offset, g0), min(offset + len(data), g1)
        cs = 1 << cb
        file = self._file
        if d0 == g0 and d1 == g1:
            file.debug_event("write_aio")
            await file.write(host, data[d0 - offset : d1 - offset])
        elif count == 1 or g1 - g0 <= _MERGE_LIMIT:
            # small run: complete it in one buffer, one file write
            buf = bytearray(g1 - g0)
            mv = memoryview(buf)
            head_zero = d0 == g0 or self._zero_source(table[c0 & mask], g0)
            tail_zero = d1 == g1 or self._zero_source(table[(c1 - 1) & mask], d1)
            if not head_zero:
                await self._old_cluster(g0, table[c0 & mask], mv[: d0 - g0])
            if not tail_zero:
                await self._old_cluster(d1, table[(c1 - 1) & mask], mv[d1 - g0 :])
            mv[d0 - g0 : d1 - g0] = data[d0 - offset : d1 - offset]
            # the data merged into its copy-on-write areas: one COW write; QEMU writes
            # zeros and then the data when the COW areas read as zeros (write_aio)
            file.debug_event("write_aio" if head_zero and tail_zero else "cow_write")
            await file.write(host, buf)
        else:
            # large run: only the partial end clusters are copied, the middle goes as is
            head_end = min(g1, ((d0 + cs - 1) >> cb) << cb) if d0 > g0 else g0
            tail_start = max(head_end, (d1 >> cb) << cb) if d1 < g1 else g1
            if head_end > g0:
                head = memoryview(bytearray(head_end - g0))
                zero = self._zero_source(table[c0 & mask], g0)
                if not zero:
                    await self._old_cluster(g0, table[c0 & mask], head[: d0 - g0])
                head[d0 - g0 :] = data[: head_end - d0]
                file.debug_event("write_aio" if zero else "cow_write")
                await file.write(host, head)
            if tail_start > head_end:
                file.debug_event("write_aio")
                await file.write(
                    host + head_end - g0, data[head_end - offset : tail_start - offset]
                )
            if g1 > tail_start:
                tail = memoryview(bytearray(g1 - tail_start))
                zero = self._zero_source(table[(c1 - 1) & mask], d1)
                if not zero:
                    await self._old_cluster(d1, table[(c1 - 1) & mask], tail[d1 - tail_start :])
                tail[: d1 - tail_start] = data[tail_start - offset : d1 - offset]
                file.debug_event("write_aio" if zero else "cow_write")
                await file.write(host + tail_start - g0, tail)

    def _zero_source(self, entry: int, guest: int) -> bool:
        """The old contents of the cluster of ``entry`` from ``guest`` on read as zeros
        without any I/O (a zero cluster, or unallocated with no backing data there)."""
        kind = _KIND(entry)
        if kind is ClusterKind.ZERO_PLAIN or kind is ClusterKind.ZERO_ALLOC:
            return True
        if kind is _UNALLOCATED:
            backing = self.node.backing
            return backing is None or guest >= backing.length()
        return False

    def _release_entry(self, entry: int) -> None:
        kind = _KIND(entry)
        if kind is _NORMAL or kind is ClusterKind.ZERO_ALLOC:
            self.refcounts.release((entry & fmt.OFFSET_MASK) >> self.header.cluster_bits)
        elif kind is _COMPRESSED:
            for cluster in self._geometry.host_clusters(entry, self.header.cluster_bits):
                self.refcounts.release(cluster)

    # -- flush and close -------------------------------------------------------------

    async def flush(self) -> None:
        async with self._lock:
            # no deadline of its own (stopping half-way would leave the caches half-applied):
            # a disk that stops answering is bounded by the shutdown watchdog (blockd.run)
            with trio.CancelScope(shield=True):
                await self._write_back()
                await self._file.flush()

    async def _write_back(self) -> None:
        """Metadata to disk in dependency order (see the module docstring)."""
        file = self._file
        flushed = await self.refcounts.write_back()
        if self._l2.dirty and not flushed:
            # Data copied without the lock may have completed, and been linked, after
            # the refcounts' last flush: it is stable before a table points at it.
            await file.flush()
        await self._l2.write_back()
        if self._l1_dirty:
            per_sector = 64
            l1off = self.header.l1_table_offset
            for chunk in sorted({i // per_sector for i in self._l1_dirty}):
                file.debug_event("l1_update")
                part = self.l1[chunk * per_sector : (chunk + 1) * per_sector]
                await file.write(l1off + chunk * per_sector * 8, fmt.encode_table(part))
            self._l1_dirty.clear()
            await file.flush()
        if self.refcounts.has_releases:
            await self.refcounts.apply_releases()
            await self.refcounts.write_back()

    def _refuse_dirty(self) -> None:
        if self.header.incompatible_features & fmt.INCOMPAT_DIRTY:
            raise ImageError(
                "qcow2: image has the dirty bit set (lazy refcounts need a repair: "
                "run 'qemu-img check -r all'); cannot be opened read/write"
            )

    async def reopen(self, read_only: bool) -> None:
        """Called by the graph before the mode changes: going read-only writes every
        cached change back; going read-write refuses images we may not write."""
        if read_only:
            async with self._lock:
                # no deadline of its own (stopping half-way would leave the caches half-applied):
                # a disk that stops answering is bounded by the shutdown watchdog (blockd.run)
                with trio.CancelScope(shield=True):
                    await self._write_back()
                    await self._file.flush()
        else:
            self._refuse_dirty()

    async def close(self) -> None:
        if self.node.read_only or not self._prepared:
            return
        await self.flush()

    # -- header rewrite --------------------------------------------------------------

    async def _rewrite_header(self, header: Header, exts: list[Extension], name: bytes) -> None:
        """Rewrite header, extensions and backing name with one write at offset 0."""
        header = replace(
            header,
            refcount_table_offset=self.refcounts.table_offset,
            refcount_table_clusters=self.refcounts.table_clusters,
        )
        new_header, area = fmt.build_header_area(header, exts, name)
        padded = area + bytes(max(0, self._header_area_len - len(area)))
        await self._file.write(0, padded)
        await self._file.flush()
        self.header = new_header
        self.extensions = list(exts)
        self._header_area_len = len(area)

    async def change_backing_file(self, backing_file: str | None, backing_fmt: str | None) -> None:
        """Record a new backing file name and format in the header (``None`` clears both).

        Raises:
            OSError: ``EINVAL`` when the name is longer than 1023 bytes, ``ENOSPC`` when
                header, extensions and name do not fit in the first cluster, ``EPERM`` on
                a read-only node. The image is unchanged then.
        """
        if self.node.read_only:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        name = (backing_file or "").encode("utf-8", "surrogateescape")
        if len(name) > fmt.MAX_BACKING_NAME:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        exts = [e for e in self.extensions if e.type != fmt.EXT_BACKING_FORMAT]
        if name and backing_fmt:
            exts.insert(0, Extension(fmt.EXT_BACKING_FORMAT, backing_fmt.encode()))
        else:
            backing_fmt = None
        async with self._lock:
            # no deadline of its own (stopping half-way would leave the caches half-applied):
            # a disk that stops answering is bounded by the shutdown watchdog (blockd.run)
            with trio.CancelScope(shield=True):
                await self._rewrite_header(self.header, exts, name)
        self.backing_name = backing_file if name else None
        self.backing_format = backing_fmt
