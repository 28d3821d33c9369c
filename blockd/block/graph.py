"""The block graph: every open node by name, and the only code that opens, links and
closes nodes."""

from __future__ import annotations

from blockd.block.node import BlockNode
from blockd.events import EventBus


class Graph:
    """All nodes of the daemon, newest last."""

    def __init__(self, events: EventBus) -> None:
        self.events = events
        self.nodes: dict[str, BlockNode] = {}

    def find(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    async def close_all(self) -> None:
        """Flush and close every node, parents before their children."""
        for node in reversed(list(self.nodes.values())):
            await node.driver.close()
        self.nodes.clear()
