"""Dirty bitmaps: which granules of a node were written since the bitmap was cleared.

QEMU's ``BdrvDirtyBitmap`` (``block/dirty-bitmap.c``) reduced to what a mirror needs: a
node keeps a list of bitmaps (:attr:`BlockNode.dirty_bitmaps
<blockd.block.node.BlockNode.dirty_bitmaps>`), and every write or discard that completes
on the node marks the granules it touched in each *recording* one, whoever sent it. A
bitmap that does not record is marked by its owner only (the active commit's, which its
``mirror_top`` filter marks, as QEMU's does). A job that keeps a copy in step takes the
dirty runs one after the other (:meth:`DirtyBitmap.next_dirty`), clears a run before it
copies it and counts what is left (:attr:`DirtyBitmap.dirty_bytes`).

Pure: one ``bytearray`` with a byte per granule; no I/O, no trio.
"""

from __future__ import annotations

__all__ = ["DirtyBitmap"]


class DirtyBitmap:
    """The dirty granules of a node ``length`` bytes long.

    Args:
        granularity: bytes per granule, a power of two (QEMU: the target's cluster
            size, at least 4 KiB and at most 64 MiB).
        length: the node's length; granules cover it, the last one may be partial.
        recording: every completed write on the node marks it (else only its owner).

    Raises:
        ValueError: a granularity that is not a power of two, or a negative length.
    """

    def __init__(self, granularity: int, length: int, *, recording: bool = True) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two")
        if length < 0:
            raise ValueError(f"length {length} is negative")
        self.granularity = granularity
        self.length = length
        self.recording = recording
        self._bits = bytearray(-(-length // granularity))
        self._count = 0

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.length)
        start = max(offset, 0)
        if end <= start:
            return 0, 0
        return start // self.granularity, -(-end // self.granularity)

    def set(self, offset: int, length: int) -> None:
        """Mark every granule that ``[offset, offset + length)`` touches."""
        first, last = self._span(offset, length)
        if first == last:
            return
        before = self._bits.count(1, first, last)
        self._bits[first:last] = b"\x01" * (last - first)
        self._count += (last - first) - before

    def reset(self, offset: int, length: int) -> None:
        """Clear every granule that ``[offset, offset + length)`` touches."""
        first, last = self._span(offset, length)
        if first == last:
            return
        before = self._bits.count(1, first, last)
        self._bits[first:last] = bytes(last - first)
        self._count -= before

    def is_dirty(self, offset: int) -> bool:
        """Whether the granule holding ``offset`` is dirty."""
        index = offset // self.granularity
        return 0 <= index < len(self._bits) and self._bits[index] == 1

    def next_dirty(self, offset: int, max_length: int) -> tuple[int, int] | None:
        """The first dirty run at or after ``offset``: its start and length (at most
        ``max_length``, rounded up to whole granules, clamped to the node), or ``None``
        when nothing from ``offset`` on is dirty."""
        start = self._bits.find(1, max(offset, 0) // self.granularity)
        if start < 0:
            return None
        end = self._bits.find(0, start)
        if end < 0:
            end = len(self._bits)
        granules = max(1, max_length // self.granularity)
        end = min(end, start + granules)
        begin = start * self.granularity
        return begin, min(end * self.granularity, self.length) - begin

    @property
    def dirty_bytes(self) -> int:
        """Bytes in dirty granules (the last granule counted as whole, as QEMU does)."""
        return self._count * self.granularity

    def __bool__(self) -> bool:
        return self._count > 0

    def info(self) -> dict[str, object]:
        """QAPI ``BlockDirtyInfo`` of this (unnamed, not persistent) bitmap."""
        return {
            "count": self.dirty_bytes,
            "granularity": self.granularity,
            "recording": self.recording,
            "busy": False,
            "persistent": False,
        }
