"""Copy offload: copy a guest range from one node to another as host file extents.

The copy-on-read path (and so ``block-stream``) copies data that some image below the
destination stores. Instead of reading it into Python and writing it back out, the source
range is mapped down to the host files that hold it, and the destination is asked to
take those extents: a ``qcow2`` destination allocates clusters for the range and has its
``file`` node copy the extents into them with ``copy_file_range(2)``, so the bytes move
kernel to kernel in one worker-thread call. (The shape follows QEMU's
``bdrv_co_copy_range``; its stream job does not use it, blockd's does.)

The offload is an optimisation only: whenever a layer cannot take part (a filter such as
``blkdebug`` whose events must fire, compressed or zero clusters, ``O_DIRECT`` files, a
range past a backing file's end) :func:`copy_range` answers ``False`` with nothing
written, and the caller copies through buffers as before.
"""

from __future__ import annotations

from blockd.block.driver import Extent, OffloadNotSupported, Status
from blockd.block.node import BlockNode

_MAPPED = Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID


async def _map_run(node: BlockNode, offset: int, length: int) -> Extent | None:
    """The host extent holding the start of ``node``'s ``[offset, offset + length)``:
    at most ``length`` bytes, contiguous in one protocol node; ``None`` when that part
    is not plain data in a host file (zeros, compressed, a filter, past an end)."""
    while not node.is_protocol:
        if node.is_filter:
            return None
        status = await node.block_status(offset, length)
        if status.length == 0:
            return None
        if status.allocated:
            if status.status & _MAPPED != _MAPPED or status.file_node is None:
                return None
            node, offset, length = status.file_node, status.offset_in_file, status.length
            continue
        below = node.backing
        if below is None or offset + status.length > below.length():
            return None
        node, length = below, status.length
    if offset + length > node.length():
        return None
    return Extent(node, offset, length)


async def map_extents(node: BlockNode, offset: int, length: int) -> list[Extent] | None:
    """The host extents that hold ``node``'s guest range ``[offset, offset + length)``,
    in order (adjacent pieces merged), or ``None`` when some part of it is not plain
    data in a host file."""
    extents: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        extent = await _map_run(node, pos, end - pos)
        if extent is None:
            return None
        pos += extent.length
        if extents:
            last = extents[-1]
            if last.node is extent.node and last.offset + last.length == extent.offset:
                extent = Extent(last.node, last.offset, last.length + extent.length)
                extents.pop()
        extents.append(extent)
    return extents


async def copy_range(source: BlockNode, offset: int, length: int, dest: BlockNode) -> bool:
    """Copy ``source``'s ``[offset, offset + length)`` to the same range of ``dest``
    without passing the bytes through Python.

    Returns:
        ``True`` when copied; ``False`` when some node cannot offload the copy, with
        nothing written to ``dest``'s data (an empty L2 table may have been added).

    Raises:
        OSError: the copy failed part-way (the range may be partly copied).
    """
    extents = await map_extents(source, offset, length)
    if extents is None:
        return False
    try:
        await dest.copy_in(offset, extents)
    except OffloadNotSupported:
        return False
    return True
