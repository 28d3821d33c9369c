"""Queries on backing chains: allocation across layers and base lookup by file name.

Theory of operation (mirrors QEMU's ``bdrv_co_common_block_status_above``,
``bdrv_is_allocated``, ``bdrv_is_allocated_above`` and ``bdrv_find_backing_image``):

* A chain is walked through :attr:`BlockNode.filtered`: the filtered child of a filter,
  the ``backing`` child of a format node. Filters show their child's data unchanged and
  have no layer of their own, so the walk steps over them.
* A layer is *allocated* for a range when it decides the contents there: it stores data,
  or it stores a zero cluster that shadows the layers below. An unallocated range shows
  the data of the layer underneath.
* Each answer carries the length of the run that shares it, which is at most what was
  asked for; the next question starts where that run ends.
* Short layers. When the first layer examined ends before ``offset`` the answer is "not
  allocated" with a run of 0 bytes: the caller has reached the end of a shorter backing
  file (``stream`` skips the rest of the image then). When a deeper layer ends before
  ``offset`` the zeros it shows count as allocated there, since reads return them.

Nothing here changes the graph; only block-status requests are made.
"""

from __future__ import annotations

import os

from blockd.block.node import BlockNode


async def is_allocated_above(
    top: BlockNode | None,
    base: BlockNode | None,
    include_base: bool,
    offset: int,
    length: int,
) -> tuple[bool, int]:
    """Whether ``[offset, offset + length)`` is allocated in a layer from ``top`` down.

    The walk goes from ``top`` through filters and backing links and stops above
    ``base`` (or at it, when ``include_base``), or at the end of the chain when ``base``
    is ``None`` or not met.

    Returns:
        ``(allocated, n)``: the status of the run ``[offset, offset + n)``. ``n`` is 0
        only when ``top`` (its first real layer) ends before ``offset``.

    Raises:
        OSError: a layer failed its block-status request.
    """
    node = top
    first = True
    while node is not None:
        if node is base and not include_base:
            break
        if node.is_filter:
            if node is base:
                # include_base on a filter: its data are its child's; look there, stop.
                below = node.skip_filters()
                if below is node:
                    break
                node, base = below, below
            else:
                node = node.file
            continue
        status = await node.block_status(offset, length)
        if status.length == 0:
            if first:
                return False, 0
            # A short layer below an unallocated one: reads give its EOF zeros.
            return True, length
        if status.allocated:
            return True, status.length
        length = status.length
        if node is base:
            break
        first = False
        node = node.backing
    return False, length


async def is_allocated(node: BlockNode, offset: int, length: int) -> tuple[bool, int]:
    """Whether ``node`` itself (filters skipped) decides ``[offset, offset + length)``.

    Returns:
        ``(allocated, n)`` for the run ``[offset, offset + n)``; ``n`` is 0 past the end.
    """
    layer = node.skip_filters()
    return await is_allocated_above(layer, layer, True, offset, length)


def backing_chain_next(node: BlockNode) -> BlockNode | None:
    """The next image below ``node``: its COW child with filters skipped."""
    below = node.skip_filters().backing
    return below.skip_filters() if below is not None else None


def find_overlay(top: BlockNode, base: BlockNode | None) -> BlockNode | None:
    """The image above ``base`` on ``top``'s chain (QEMU's ``bdrv_find_overlay``).

    Filters are skipped on both sides. With ``base`` ``None`` this is the lowest image of
    the chain. Returns ``None`` when ``base`` is not below ``top``.
    """
    wanted = base.skip_filters() if base is not None else None
    node: BlockNode | None = top.skip_filters()
    while node is not None:
        below = backing_chain_next(node)
        if below is wanted:
            return node
        node = below
    return None


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    """Whether ``node`` is ``top`` or lies below it on the filter/backing chain."""
    walk: BlockNode | None = top
    while walk is not None:
        if walk is node:
            return True
        walk = walk.filtered
    return False


def path_has_protocol(path: str) -> bool:
    """QEMU's test for a ``proto:`` prefix: a colon before any slash."""
    for char in path:
        if char == ":":
            return True
        if char == "/":
            return False
    return False


def _image_dir(node: BlockNode) -> str | None:
    name = node.filename
    if not name or name.startswith("json:") or path_has_protocol(name):
        return None
    return os.path.dirname(name)


def _resolve(node: BlockNode, name: str) -> str | None:
    """``name`` made absolute relative to ``node``'s image directory."""
    if path_has_protocol(name):
        return name
    if os.path.isabs(name):
        return name
    directory = _image_dir(node)
    if directory is None:
        return None
    return os.path.join(directory, name)


def _header_string(node: BlockNode) -> str | None:
    """What QEMU calls ``bs->backing_file``: the backing node's filename when the link
    was set explicitly, otherwise the image header's string."""
    if node.backing is not None and not node.implicit_backing:
        return node.backing.skip_filters().filename
    header = node.driver.header_backing()
    if header is not None:
        return header[0]
    if node.backing is not None:
        return node.backing.skip_filters().filename
    return None


def find_backing_image(top: BlockNode, backing_file: str) -> BlockNode | None:
    """The image below ``top`` whose overlay names it ``backing_file``
    (docs/qemu-behaviour/block-stream.md §3, step 5).

    Layers are examined from ``top`` (filters skipped) down, each one that has a COW
    child. A layer matches when its backing file name equals ``backing_file``: compared
    as strings (as written and after resolving the layer's name) when either carries a
    protocol prefix, otherwise as canonical absolute paths, both resolved relative to
    that layer's directory.

    Returns:
        The image below the matching layer (filters skipped), or ``None``.
    """
    wanted_protocol = path_has_protocol(backing_file)
    node: BlockNode | None = top.skip_filters()
    while node is not None and node.backing is not None:
        below = backing_chain_next(node)
        stored = _header_string(node)
        if stored is not None:
            if wanted_protocol or path_has_protocol(stored):
                if backing_file == stored or backing_file == _resolve(node, stored):
                    return below
            else:
                wanted_full = _resolve(node, backing_file)
                stored_full = _resolve(node, stored)
                if (
                    wanted_full is not None
                    and stored_full is not None
                    and os.path.exists(wanted_full)
                    and os.path.exists(stored_full)
                    and os.path.realpath(wanted_full) == os.path.realpath(stored_full)
                ):
                    return below
        node = below
    return None
