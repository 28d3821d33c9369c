"""The ``raw`` format driver: the bytes of its ``file`` child, optionally a window of them.

``offset`` and ``size`` select ``[offset, offset + size)`` of the child; without ``size``
the node ends where the child ends. A raw layer has no backing file and decides all of its
contents, so every range is allocated here; the child says whether it is data or zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from blockd.block.driver import BlockStatus, Driver, Extent, Status
from blockd.block.node import BlockNode
from blockd.errors import RequestError

SECTOR = 512


class RawDriver(Driver):
    """A raw image (QMP driver ``raw``) over any protocol or format node."""

    format_name: ClassVar[str] = "raw"

    def __init__(self, node: BlockNode, offset: int, size: int | None) -> None:
        super().__init__(node)
        self.offset = offset
        self.size = size

    @property
    def _child(self) -> BlockNode:
        child = self.node.file
        assert child is not None, "the graph attaches 'file' before open"
        return child

    @classmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> RawDriver:
        """Check ``offset``/``size`` against the child's length (QEMU's texts).

        Raises:
            RequestError: a negative value, a window past the end of the child, or a size
                that is not a multiple of 512.
        """
        # reference: QEMU raw-format.c raw_apply_options
        for key in ("offset", "size"):
            value = options.get(key)
            if value is not None and value < 0:
                raise RequestError(f"Value '{value}' is out of range for parameter '{key}'")
        offset = int(options.get("offset", 0))
        size = options.get("size")
        child = node.file
        assert child is not None, "the graph attaches 'file' before open"
        real = child.length()
        if offset > real:
            raise RequestError(
                f"Offset ({offset}) cannot be greater than size of the containing file ({real})"
            )
        if size is not None and real - offset < size:
            raise RequestError(
                f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal"
                f" to the  actual size of the containing file ({real})"
            )
        if size is not None and size % SECTOR:
            raise RequestError(f"Specified size is not multiple of {SECTOR}")
        return cls(node, offset, None if size is None else int(size))

    def length(self) -> int:
        if self.size is not None:
            return self.size
        return max(0, self._child.length() - self.offset)

    @property
    def request_alignment(self) -> int:
        return self._child.driver.request_alignment

    async def read(self, offset: int, buf: memoryview) -> None:
        self._child.debug_event("read_aio")
        await self._child.read(self.offset + offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._child.debug_event("write_aio")
        await self._child.write(self.offset + offset, data)

    async def copy_in(self, offset: int, extents: Sequence[Extent]) -> None:
        self._child.debug_event("write_aio")
        await self._child.copy_in(self.offset + offset, extents)

    async def flush(self) -> None:
        await self._child.flush()

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # A raw layer owns every byte: allocated, data or zeros as the child stores them.
        below = await self._child.block_status(self.offset + offset, length)
        if below.length == 0:  # past the child's end: zeros
            return BlockStatus(
                Status.ZERO | Status.ALLOCATED, length, self.offset + offset, self._child
            )
        status = (below.status & (Status.DATA | Status.ZERO)) | Status.ALLOCATED
        return BlockStatus(
            status | Status.OFFSET_VALID, below.length, self.offset + offset, self._child
        )
