"""Node commands: ``blockdev-add``, ``blockdev-del``, ``query-named-block-nodes``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.commands.node_info import query_named_block_nodes as _query
from blockd.commands.registry import command

if TYPE_CHECKING:
    from blockd.daemon import Daemon


@command("blockdev-add", raw=True)
async def blockdev_add(d: Daemon, options: dict[str, Any]) -> dict[str, Any]:
    """Open the node tree ``options`` (BlockdevOptions) as a monitor-owned node."""
    await d.graph.open_node(options, top_level=True)
    return {}


@command("blockdev-del")
async def blockdev_del(d: Daemon, *, node_name: str) -> dict[str, Any]:
    """Close the monitor-owned node ``node_name`` and release its image
    (docs/qemu-behaviour/blockdev.md §5)."""
    await d.graph.delete(node_name)
    return {}


@command("query-named-block-nodes")
async def query_named_block_nodes(d: Daemon, *, flat: bool = False) -> list[dict[str, Any]]:
    """BlockDeviceInfo of every node, newest first (docs/qemu-behaviour/node-info.md §1)."""
    return _query(d.graph, flat=flat)
