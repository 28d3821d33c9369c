"""Copy offload: copy a guest range from one node to another as host file extents.

The copy-on-read path (and so ``block-stream``) copies data that some image below the
destination stores. Instead of reading it into Python and writing it back out, the source
range is mapped down to the host files that hold it, and the destination is asked to
take those extents: a ``qcow2`` destination allocates clusters for the range and has its
``file`` node copy the extents into them with ``copy_file_range(2)``, so the bytes move
kernel to kernel in one worker-thread call. (The shape follows QEMU's
``bdrv_co_copy_range``; its stream job does not use it, blockd's does.)

The offload is an optimisation only: :func:`map_prefix` maps the longest start of a
range that is plain data in host files, and where a layer cannot take part (a filter
such as ``blkdebug`` whose events must fire, compressed or zero clusters, ``O_DIRECT``
files, a range past a backing file's end, a destination range that is not whole
clusters) the caller copies that part through buffers as before;
:func:`copy_extents` then answers ``False`` with nothing written.
"""

from __future__ import annotations

from blockd.block.driver import Extent, OffloadNotSupported, Status
from blockd.block.node import BlockNode

_MAPPED = Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID


async def _map_run(node: BlockNode, offset: int, length: int) -> tuple[Extent | None, int]:
    """The host extent holding the start of ``node``'s ``[offset, offset + length)`` and
    its length ``n`` (contiguous in one protocol node); ``(None, n)`` when those ``n``
    bytes are not plain data in a host file (zeros, compressed, a filter, past an end).
    """
    while not node.is_protocol:
        if node.is_filter:
            return None, length
        status = await node.block_status(offset, length)
        if status.length == 0:
            return None, length
        if status.allocated:
            if status.status & _MAPPED != _MAPPED or status.file_node is None:
                return None, status.length
            node, offset, length = status.file_node, status.offset_in_file, status.length
            continue
        below = node.backing
        if below is None or offset + status.length > below.length():
            return None, status.length
        node, length = below, status.length
    if offset + length > node.length():
        return None, length
    return Extent(node, offset, length), length


def _host_file(node: BlockNode | None) -> bool:
    """Whether ``node`` is a protocol node that takes part in offloaded copies."""
    return node is not None and node.driver.offloads


def chain_offloads(dest: BlockNode, bottom: BlockNode | None) -> bool:
    """Whether copies from ``dest``'s backing chain (down to ``bottom``, or all of it)
    into ``dest`` can be offloaded at all: images straight on host files, no filter in
    between. (Single ranges may still not be, e.g. compressed clusters; a ``True``
    only says nothing on the way rules it out.)"""
    node: BlockNode | None = dest
    while node is not None:
        if node.is_filter or not _host_file(node.file):
            return False
        if node is bottom:
            break
        node = node.backing
    return True


async def map_prefix(node: BlockNode, offset: int, length: int) -> tuple[list[Extent] | None, int]:
    """The longest start of ``node``'s ``[offset, offset + length)`` that is plain data in
    host files: its extents in order (adjacent pieces merged) and its length; or
    ``(None, n)`` when the first ``n`` bytes are not (they are copied through buffers)."""
    extents: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        extent, n = await _map_run(node, pos, end - pos)
        if extent is None:
            if not extents:
                return None, n
            break
        pos += n
        if extents:
            last = extents[-1]
            if last.node is extent.node and last.offset + last.length == extent.offset:
                extent = Extent(last.node, last.offset, last.length + extent.length)
                extents.pop()
        extents.append(extent)
    return extents, pos - offset


async def copy_extents(dest: BlockNode, offset: int, extents: list[Extent]) -> bool:
    """Store ``extents`` (from :func:`map_prefix`) at ``dest``'s ``offset``, offloaded.

    Returns:
        ``True`` when copied; ``False`` when some node cannot offload the copy, with
        nothing written to ``dest``'s data (an empty L2 table may have been added).

    Raises:
        OSError: the copy failed part-way (the range may be partly copied).
    """
    try:
        await dest.copy_in(offset, extents)
    except OffloadNotSupported:
        return False
    return True
