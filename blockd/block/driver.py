"""The block driver interface: what every driver implements and nothing more.

A driver gives one node its behaviour: a protocol driver (``file``) talks to the host, a
format driver (``raw``, ``qcow2``) interprets its ``file`` child's bytes, a filter
(``copy-on-read``, ``blkdebug``) shows its one child's data unchanged while acting on the
requests that pass.

Division of labour (mirrors the contract of QEMU's ``struct BlockDriver``):

* :class:`~blockd.block.node.BlockNode` checks every request once before a driver sees
  it: bounds against the node's length, read-only, the driver's alignment. A driver may
  assume ``0 <= offset`` and ``offset + len <= length()`` for reads and writes of format
  and filter nodes; protocol nodes may be written past their end (the file grows) and read
  past it (the node fills with zeros).
* Only :mod:`blockd.block.graph` opens, attaches or detaches children. A driver reaches
  its children through ``self.node.file`` and ``self.node.backing`` (``BlockNode`` or
  ``None``), calling the node's public methods, never another driver directly.
* :meth:`block_status` answers for this node's own layer only; walking a backing chain
  (``is_allocated_above``) is the graph's job.
* I/O failures are raised as ``OSError`` with the errno (error policies depend on it);
  broken image metadata as :class:`~blockd.errors.ImageError` (QEMU's text for the
  corruption, naming the offending offsets). The node turns an ``ImageError`` met by a
  request into a corruption report and ``EIO`` for the caller, as QEMU's
  ``qcow2_signal_corruption`` does (:meth:`BlockNode.read`).

Buffers: reads fill a caller-provided ``memoryview`` so the copy path can reuse one large
buffer; writes take any bytes-like object.
"""

from __future__ import annotations

import enum
import errno
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


class Status(enum.Flag):
    """Block status flags of one layer, with QEMU's meaning (``BDRV_BLOCK_*``)."""

    NONE = 0
    #: reads return data (not necessarily non-zero) that this layer or the layers
    #: below it store; without DATA and without ZERO the range is unallocated here
    DATA = enum.auto()
    #: reads return zeros
    ZERO = enum.auto()
    #: this layer decides the contents (data or a zero cluster that shadows the backing
    #: file); the range is "allocated" in the sense of ``bdrv_is_allocated``
    ALLOCATED = enum.auto()
    #: ``offset_in_file`` below is valid: the bytes live at that offset of ``file_node``
    OFFSET_VALID = enum.auto()


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """The status of the run ``[offset, offset + length)`` of one layer.

    ``length`` is at least 1 and at most what was asked for; the whole run shares the
    same status. When ``OFFSET_VALID`` is set, the run is stored contiguously in
    ``file_node`` from ``offset_in_file`` on (the copy path uses this to copy file extents
    directly).
    """

    status: Status
    length: int
    offset_in_file: int = 0
    file_node: BlockNode | None = None

    @property
    def allocated(self) -> bool:
        return Status.ALLOCATED in self.status


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes stored at ``offset`` of the protocol node ``node``: one piece
    of a copy offloaded to the host (see :mod:`blockd.block.host.offload`)."""

    node: BlockNode
    offset: int
    length: int


def split_extents(extents: Sequence[Extent], length: int) -> tuple[list[Extent], list[Extent]]:
    """The first ``length`` bytes of ``extents`` and the rest, splitting one extent
    where the boundary falls inside it."""
    head: list[Extent] = []
    rest = list(extents)
    while length and rest:
        first = rest.pop(0)
        if first.length <= length:
            head.append(first)
            length -= first.length
            continue
        head.append(Extent(first.node, first.offset, length))
        rest.insert(0, Extent(first.node, first.offset + length, first.length - length))
        length = 0
    return head, rest


class OffloadNotSupported(OSError):
    """Raised by :meth:`Driver.copy_in`, before anything is written, when a node
    cannot take part in an offloaded copy; the caller copies through buffers."""

    def __init__(self) -> None:
        super().__init__(errno.ENOTSUP, "copy offload not supported")


class Driver(ABC):
    """One node's behaviour. Subclasses set the class attributes and the methods below.

    A driver instance is created by :meth:`open` for one node and lives as long as the
    node is open. ``node.file``/``node.backing`` are attached before :meth:`open` runs,
    except the backing of a format driver whose image header names it: the graph opens
    that after :meth:`open`, from :meth:`header_backing`.
    """

    #: the QMP driver name, also ``drv`` in query-named-block-nodes
    format_name: ClassVar[str]
    #: set for protocol drivers (``file``): the node talks to the host directly
    protocol_name: ClassVar[str | None] = None
    #: filters forward reads and writes to their one child with the data unchanged
    is_filter: ClassVar[bool] = False
    #: format drivers that can have a ``backing`` child (qcow2)
    supports_backing: ClassVar[bool] = False
    #: the role name of the child a format or filter driver sits on
    child_role: ClassVar[str] = "file"
    #: how the driver uses its non-backing child, a kind of
    #: :func:`blockd.block.permissions.link_perms` (formats with a backing use
    #: ``metadata`` whatever this says); an open driver may change it (a filter that
    #: stops forwarding), then the graph refreshes the permissions
    link_kind: str = "passthrough"
    #: the node is named by its child's filename, whatever its options (QEMU drivers
    #: whose ``bdrv_refresh_filename`` copies the child's name: the commit filters)
    names_as_child: ClassVar[bool] = False
    #: the prefix of the legacy filenames :meth:`parse_filename` understands
    #: (``blkdebug:``), found in image headers; ``None`` for none
    filename_prefix: ClassVar[str | None] = None

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    @classmethod
    def parse_filename(cls, filename: str, base_dir: str) -> dict[str, Any]:
        """Blockdev options of a legacy ``filename`` that starts with
        :attr:`filename_prefix`, relative paths taken from ``base_dir`` (QEMU's
        ``bdrv_parse_filename``).

        Raises:
            RequestError: the filename is malformed.
        """
        raise NotImplementedError(f"{cls.format_name} has no legacy filenames")

    @classmethod
    @abstractmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> Driver:
        """Open the driver for ``node`` with the blockdev ``options`` of its driver.

        Raises:
            RequestError, ImageError, HostError: with QEMU's text; nothing was written.
        """

    @abstractmethod
    def length(self) -> int:
        """The node's size in bytes (virtual size for formats)."""

    @property
    def request_alignment(self) -> int:
        """Requests are aligned to this many bytes (the node splits or pads for it)."""
        return 1

    @abstractmethod
    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the node's contents at ``offset``."""

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``; stable only after :meth:`flush`."""
        raise OSError(13, "Permission denied")  # EACCES: the driver cannot write

    async def discard(self, offset: int, length: int) -> None:  # noqa: B027 - advice
        """The bytes ``[offset, offset + length)`` are no longer needed: give their space
        back to the host if the driver can (QEMU's ``bdrv_co_pdiscard``). Advice only:
        afterwards the range reads as zeros or as before."""

    async def flush(self) -> None:  # noqa: B027 - nothing to flush by default
        """Make every completed write stable on disk, in this node and its children."""

    @abstractmethod
    async def block_status(self, offset: int, length: int) -> BlockStatus:
        """The status of this layer at ``offset`` for a run of at most ``length`` bytes."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Write back cached metadata and release the node's resources."""

    def debug_event(self, name: str) -> None:  # noqa: B027 - optional hook
        """A format driver above reached debug point ``name`` (a BlkdebugEvent) on its
        way to this node; only ``blkdebug`` reacts (QEMU's ``bdrv_co_debug_event``)."""

    async def copy_in(self, offset: int, extents: Sequence[Extent]) -> None:
        """Store at ``offset`` the bytes of the host ``extents``, one after the other,
        without passing them through Python (QEMU's ``bdrv_co_copy_range_to``).

        Raises:
            OffloadNotSupported: this node (or one below it) cannot; nothing was
                written.
            OSError: the copy failed part-way.
        """
        raise OffloadNotSupported

    @property
    def offloads(self) -> bool:
        """Whether this node's data can be the source of an offloaded copy (a protocol
        node whose bytes sit in a host file that :meth:`copy_in` can read)."""
        return False

    def file_identity(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the host file a protocol driver has open, else None:
        the same file under any name (the graph refuses backing chains that loop)."""
        return None

    # -- image headers (format drivers only) ---------------------------------------

    def header_backing(self) -> tuple[str, str | None] | None:
        """The backing file name and format recorded in the image header, if any."""
        return None

    async def change_backing_file(self, backing_file: str | None, backing_fmt: str | None) -> None:
        """Rewrite the header's backing file name and format (``None`` clears both).

        Raises:
            OSError: ``ENOTSUP`` when the format has no backing file, ``EINVAL`` or
                ``ENOSPC`` when the name does not fit (QEMU's limits).
        """
        raise OSError(95, "Operation not supported")

    def image_info(self) -> dict[str, Any]:
        """Driver-specific members of ImageInfo (``cluster-size``, ``format-specific``,
        ``dirty-flag``, ...) for query-named-block-nodes."""
        return {}

    @property
    def filename(self) -> str:
        """The node's filename as QEMU reports it (a plain path or a ``json:`` name)."""
        child = self.node.file
        return child.filename if child is not None else ""
