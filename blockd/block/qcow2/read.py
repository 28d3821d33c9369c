"""The read side of the ``qcow2`` driver: guest reads, block status, cluster lookups.

:class:`Qcow2Reads` is a part of :class:`~blockd.block.qcow2.driver.Qcow2Driver`, which
sets the attributes declared here when it opens an image; the write side (allocation,
copy-on-write, offloaded copies) builds on these lookups. Requests are split per L2
table; runs of clusters of the same kind (and contiguous host clusters) are read with one
request to the ``file`` node; unallocated runs read the backing node (zeros past its end
or without one), zero clusters read as zeros, compressed clusters are inflated (zlib or
zstd) and the last one is kept.
"""

from __future__ import annotations

import errno
import os
import zlib
from array import array
from typing import TYPE_CHECKING, Any

from blockd.block.driver import BlockStatus, Status
from blockd.block.qcow2 import format as fmt
from blockd.block.qcow2.format import ClusterKind, Header
from blockd.errors import ImageError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode
    from blockd.block.qcow2.cache import L2Cache
    from blockd.block.request_lock import RequestLock

_KIND = fmt.cluster_kind
_NORMAL = ClusterKind.NORMAL
_UNALLOCATED = ClusterKind.UNALLOCATED
_COMPRESSED = ClusterKind.COMPRESSED

_ZEROS = bytes(1 << 20)


def _fill_zeros(view: memoryview) -> None:
    """Zero ``view`` in place without allocating a buffer of its size."""
    for start in range(0, len(view), len(_ZEROS)):
        part = view[start : start + len(_ZEROS)]
        part[:] = _ZEROS[: len(part)]


def _continuing(
    table: array[int], idx: int, last: int, kind: ClusterKind, want: int, cs: int
) -> int:
    """How many of the entries ``idx .. last`` surely go on with a run of ``kind`` whose
    next entry would be ``want``: zero entries of an unallocated run of them, or normal
    entries for the host clusters from ``want`` on with its flags. Fewer than go on
    only means "look at the next entry by itself"."""
    if kind is _UNALLOCATED and want == 0:
        raw = table[idx : last + 1].tobytes()
        return (len(raw) - len(raw.lstrip(b"\0"))) >> 3
    if kind is not _NORMAL:
        return 0
    n = last - idx + 1
    if _matches(table, idx, 0, n, want, cs):
        return n
    # the longest matching prefix: galloping from 1 (runs are often short), then halving;
    # each comparison covers only entries not compared yet
    lo, k = 0, 1
    while k < n and _matches(table, idx, lo, k, want, cs):
        lo, k = k, k << 1
    hi = min(k, n) - 1
    while lo < hi:
        k = (lo + hi + 1) >> 1
        if _matches(table, idx, lo, k, want, cs):
            lo = k
        else:
            hi = k - 1
    return lo


def _matches(table: array[int], idx: int, start: int, stop: int, want: int, cs: int) -> bool:
    """Whether entries ``idx + start .. idx + stop - 1`` are ``want + i * cs``."""
    first = want + start * cs
    return table[idx + start : idx + stop] == array("Q", range(first, want + stop * cs, cs))


class Qcow2Reads:
    """Reads and block status of a qcow2 image (see the module docstring)."""

    node: BlockNode
    header: Header
    l1: array[int]
    _l2: L2Cache
    #: log2 of the entries in one L2 cache slice, and the mask of an entry's index in it
    _slice_bits: int
    _slice_mask: int
    _lock: RequestLock
    _geometry: fmt.CompressedGeometry
    _zstd: Any
    _last_compressed: tuple[int, bytes] | None

    @property
    def _file(self) -> BlockNode:
        file = self.node.file
        if file is None:
            raise ImageError("qcow2 node has no file child")
        return file

    def _l2_table(self, l1i: int) -> int:
        """The host offset of L1 entry ``l1i``'s L2 table; 0 when it has none (also past
        the end of the L1 table)."""
        return self.l1[l1i] & fmt.OFFSET_MASK if l1i < len(self.l1) else 0

    async def _slice(self, l2off: int, guest: int) -> tuple[int, array[int]]:
        """The L2 slice of the table at host ``l2off`` that maps guest offset ``guest``,
        and its host offset; entry ``(guest >> cluster_bits) & _slice_mask``."""
        h = self.header
        if l2off & (h.cluster_size - 1):
            raise ImageError(fmt.unaligned_l2(l2off, guest >> (h.cluster_bits + h.l2_bits)))
        sb = self._slice_bits
        index = (guest >> (h.cluster_bits + sb)) & ((1 << (h.l2_bits - sb)) - 1)
        at = l2off + (index << (sb + 3))
        return at, await self._l2.get(at)

    def _unaligned(self, entry: int, l2off: int, guest: int) -> str:
        """QEMU's message for the unaligned data cluster ``entry`` mapping ``guest``."""
        h = self.header
        index = (guest >> h.cluster_bits) & ((1 << h.l2_bits) - 1)
        return fmt.unaligned_cluster(entry & fmt.OFFSET_MASK, l2off, index)

    # -- read ------------------------------------------------------------------------

    async def read(self, offset: int, buf: memoryview) -> None:
        async with self._lock:
            await self._read(offset, buf)

    async def _read(self, offset: int, buf: memoryview) -> None:
        h = self.header
        cb = h.cluster_bits
        cs = h.cluster_size
        table_bits = cb + h.l2_bits
        span_bits = cb + self._slice_bits
        mask = self._slice_mask
        n = len(buf)
        pos = 0
        while pos < n:
            cur = offset + pos
            l1i = cur >> table_bits
            l2off = self._l2_table(l1i)
            if not l2off:
                span_end = min(((l1i + 1) << table_bits) - offset, n)
                await self._read_backing(cur, buf[pos:span_end])
                pos = span_end
                continue
            span_end = min((((cur >> span_bits) + 1) << span_bits) - offset, n)
            _, table = await self._slice(l2off, cur)
            while pos < span_end:
                cur = offset + pos
                idx = (cur >> cb) & mask
                entry = table[idx]
                kind = _KIND(entry)
                # extend the run over following clusters of the same kind
                run_end = min(((cur >> cb) + 1) << cb, offset + span_end)
                if kind is _NORMAL:
                    if entry & fmt.OFFSET_MASK & (cs - 1):
                        raise ImageError(self._unaligned(entry, l2off, cur))
                    host = (entry & fmt.OFFSET_MASK) + (cur & (cs - 1))
                    nxt = (entry & fmt.OFFSET_MASK) + cs
                    while run_end < offset + span_end:
                        e = table[(run_end >> cb) & mask]
                        if _KIND(e) is not _NORMAL or e & fmt.OFFSET_MASK != nxt:
                            break
                        nxt += cs
                        run_end = min(run_end + cs, offset + span_end)
                    self._file.debug_event("read_aio")
                    await self._file.read(host, buf[pos : run_end - offset])
                elif kind is _COMPRESSED:
                    data = await self._decompress(entry)
                    intra = cur & (cs - 1)
                    buf[pos : run_end - offset] = data[intra : intra + run_end - cur]
                else:
                    while (
                        run_end < offset + span_end and _KIND(table[(run_end >> cb) & mask]) is kind
                    ):
                        run_end = min(run_end + cs, offset + span_end)
                    if kind is _UNALLOCATED:
                        await self._read_backing(cur, buf[pos : run_end - offset])
                    else:
                        _fill_zeros(buf[pos : run_end - offset])
                pos = run_end - offset

    async def _read_backing(self, offset: int, view: memoryview) -> None:
        """Unallocated data: the backing node's, zeros past its end or without one."""
        backing = self.node.backing
        avail = 0
        if backing is not None:
            self._file.debug_event("read_backing_aio")
            avail = max(0, min(len(view), backing.length() - offset))
            if avail:
                await backing.read(offset, view[:avail])
        if avail < len(view):
            _fill_zeros(view[avail:])

    async def _decompress(self, entry: int) -> bytes:
        cached = self._last_compressed
        if cached is not None and cached[0] == entry:
            return cached[1]
        cs = self.header.cluster_size
        coffset, csize = self._geometry.parse(entry)
        self._file.debug_event("read_compressed")
        raw = await self._file.pread(coffset, csize)
        try:
            # at most one cluster comes out, whatever the compressed bytes claim (as
            # QEMU's qcow2_co_decompress, whose output buffer is one cluster)
            if self.header.compression_type == fmt.COMPRESSION_ZSTD:
                data = self._zstd_cluster(raw, cs)
            else:
                data = zlib.decompressobj(-12).decompress(raw, cs)
        except Exception as exc:
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from exc
        if len(data) < cs:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data = bytes(data[:cs])
        self._last_compressed = (entry, data)
        return data

    def _zstd_cluster(self, raw: bytes, cs: int) -> bytes:
        """The first ``cs`` bytes ``raw`` decompresses to (fewer if it holds less)."""
        reader = self._zstd.ZstdDecompressor().stream_reader(raw)
        parts: list[bytes] = []
        got = 0
        while got < cs:
            piece = reader.read(cs - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    async def _old_cluster(self, guest: int, entry: int, out: memoryview) -> None:
        """Fill ``out`` with the current contents of the guest bytes at ``guest``
        (inside one cluster whose L2 entry is ``entry``): the COW source."""
        kind = _KIND(entry)
        cs = self.header.cluster_size
        self._file.debug_event("cow_read")
        if kind is _NORMAL:
            self._file.debug_event("read_aio")
            await self._file.read((entry & fmt.OFFSET_MASK) + (guest & (cs - 1)), out)
        elif kind is _COMPRESSED:
            data = await self._decompress(entry)
            intra = guest & (cs - 1)
            out[:] = data[intra : intra + len(out)]
        elif kind is _UNALLOCATED:
            await self._read_backing(guest, out)
        else:
            _fill_zeros(out)

    # -- block status ----------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        async with self._lock:
            first, run = await self._status_run(offset, offset + length)
        cs = self.header.cluster_size
        kind = _KIND(first)
        if kind is _NORMAL:
            return BlockStatus(
                Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID,
                run,
                (first & fmt.OFFSET_MASK) + (offset & (cs - 1)),
                self.node.file,
            )
        if kind is _COMPRESSED:
            return BlockStatus(Status.DATA | Status.ALLOCATED, run)
        if kind is _UNALLOCATED:
            return BlockStatus(Status.NONE, run)
        return BlockStatus(Status.ZERO | Status.ALLOCATED, run)

    async def _status_run(self, offset: int, end: int) -> tuple[int, int]:
        """The L2 entry at ``offset`` and the length of the run of clusters up to ``end``
        with the same kind (and contiguous host clusters for normal ones). Unallocated
        L2 tables are skipped whole, so an empty terabyte costs one step per table."""
        h = self.header
        cb = h.cluster_bits
        cs = h.cluster_size
        table_bits = cb + h.l2_bits
        span_bits = cb + self._slice_bits
        mask = self._slice_mask
        first: int | None = None
        kind = _UNALLOCATED
        nxt = last_entry = 0
        pos = offset
        while pos < end:
            l1i = pos >> table_bits
            l2off = self._l2_table(l1i)
            if not l2off:
                if first is None:
                    first, kind = 0, _UNALLOCATED
                elif kind is not _UNALLOCATED:
                    break
                pos = min((l1i + 1) << table_bits, end)
                continue
            span_end = min(((pos >> span_bits) + 1) << span_bits, end)
            _, table = await self._slice(l2off, pos)
            last = ((span_end - 1) >> cb) & mask
            while pos < span_end:
                idx = (pos >> cb) & mask
                if first is None:
                    e = first = table[idx]
                    kind = _KIND(e)
                    if kind is _NORMAL and e & fmt.OFFSET_MASK & (cs - 1):
                        raise ImageError(self._unaligned(e, l2off, pos))
                    nxt = (e & fmt.OFFSET_MASK) + cs
                else:
                    # the entries that surely go on with the run, in one comparison
                    want = (last_entry + cs) if kind is _NORMAL else first
                    k = _continuing(table, idx, last, kind, want, cs)
                    if k:
                        nxt += k * cs
                        last_entry += k * cs
                        pos = min(((pos >> cb) + k) << cb, span_end)
                        continue
                    e = table[idx]
                    if _KIND(e) is not kind:
                        return first, pos - offset
                    if kind is _NORMAL:
                        if e & fmt.OFFSET_MASK != nxt:
                            return first, pos - offset
                        nxt += cs
                last_entry = e
                pos = min(((pos >> cb) + 1) << cb, span_end)
        assert first is not None
        return first, min(pos, end) - offset
