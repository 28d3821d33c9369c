"""``query-named-block-nodes``: BlockDeviceInfo and ImageInfo of the graph's nodes.

The members are those QEMU fills for nodes without a BlockBackend
(docs/qemu-behaviour/node-info.md §2, §3):
throttling values are 0, ``cache.writeback`` is true, ``backing-image`` nests through
filters and backing links unless ``flat`` is asked for, and ``backing_file_depth`` counts
those levels (0 when flat).
"""

from __future__ import annotations

import os
from typing import Any

from blockd.block.graph import Graph
from blockd.block.names.backing import image_path, resolve_backing_path
from blockd.block.node import BlockNode


def actual_size(node: BlockNode) -> int | None:
    """Bytes the host allocates for the node's file (``st_blocks * 512``), if known.

    As QEMU: a ``file`` node knows; formats and filters ask their ``file`` child (not
    the backing); other drivers (blkdebug) do not know.
    """
    below: BlockNode | None = node
    while below is not None and below.drv != "file":
        if below.drv == "blkdebug":
            return None
        below = below.file
    fd = getattr(getattr(below, "driver", None), "fd", -1)
    if below is None or fd < 0:
        return None
    return os.fstat(fd).st_blocks * 512


def image_info(node: BlockNode, *, flat: bool) -> dict[str, Any]:
    """The ImageInfo of ``node``; ``backing-image`` nests the chain below unless
    ``flat`` (built in a loop: a chain of any length)."""
    top = _one_image_info(node)
    level, below = top, node.filtered
    while not flat and below is not None:
        level["backing-image"] = _one_image_info(below)
        level, below = level["backing-image"], below.filtered
    return top


def _one_image_info(node: BlockNode) -> dict[str, Any]:
    info: dict[str, Any] = {
        "filename": node.filename,
        "format": node.drv,
        "virtual-size": node.length(),
        "dirty-flag": False,
    }
    size = actual_size(node)
    if size is not None:
        info["actual-size"] = size
    if node.is_filter and node.file is not None:
        # QEMU's bdrv_get_info forwards through filters (cluster size, dirty flag)
        forwarded = node.file.driver.image_info()
        info.update({k: forwarded[k] for k in ("cluster-size", "dirty-flag") if k in forwarded})
    info.update(node.driver.image_info())
    header = node.driver.header_backing()
    if header is not None and header[0]:
        name, fmt = header
        info["backing-filename"] = name
        info["full-backing-filename"] = resolve_backing_path(image_path(node), name)
        if fmt:
            info["backing-filename-format"] = fmt
    return info


def block_device_info(node: BlockNode, *, flat: bool) -> dict[str, Any]:
    """The BlockDeviceInfo of ``node`` (one entry of query-named-block-nodes)."""
    image = image_info(node, flat=flat)
    depth = 0
    level = image
    while "backing-image" in level:
        depth += 1
        level = level["backing-image"]
    cache = node.options.get("cache") or {}
    info: dict[str, Any] = {
        "file": node.filename,
        "node-name": node.name,
        "ro": node.read_only,
        "drv": node.drv,
    }
    if node.backing is not None and not node.is_filter:
        # a filter on a backing child (a commit's) has no backing file name of its own
        info["backing_file"] = node.backing.filename
    info.update(
        {
            "backing_file_depth": depth,
            "encrypted": False,
            "detect_zeroes": node.options.get("detect-zeroes", "off"),
            "bps": 0,
            "bps_rd": 0,
            "bps_wr": 0,
            "iops": 0,
            "iops_rd": 0,
            "iops_wr": 0,
            "image": image,
            "cache": {
                "writeback": True,
                "direct": bool(cache.get("direct", False)),
                "no-flush": bool(cache.get("no-flush", False)),
            },
            "write_threshold": 0,
            "active": bool(node.options.get("active", True)),
            "children": [
                {"child": role, "node-name": child.name} for role, child in node.children.items()
            ],
        }
    )
    if node.dirty_bitmaps:  # a job's (an active commit's filter has one)
        info["dirty-bitmaps"] = [bitmap.info() for bitmap in node.dirty_bitmaps]
    return info


def query_named_block_nodes(graph: Graph, *, flat: bool = False) -> list[dict[str, Any]]:
    """Every node's BlockDeviceInfo, newest node first."""
    return [block_device_info(node, flat=flat) for node in graph.newest_first()]
