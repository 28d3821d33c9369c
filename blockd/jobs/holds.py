"""What a block job holds on the graph: its users of nodes, with their blockers.

QEMU's ``block_job_add_bdrv``: a job takes a node with the permissions it uses and
shares (a :class:`~blockd.block.node.NodeUser`) and puts an operation blocker on it
(``block device is in use by block job: <type>``), so that other jobs and
``blockdev-del`` refuse it. A job's front ends (QEMU's ``BlockBackend`` readers and
writers) are held the same way, without a blocker. :class:`Holds` keeps the list in the
order taken and gives it back: all of it, or the holds on one node (a filter's, before
the filter leaves the graph).

A node held twice is blocked once; releasing is idempotent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockd.block.graph import Graph
    from blockd.block.node import BlockNode, NodeUser


class Holds:
    """A job's holds on nodes.

    Args:
        graph: the graph the users are added to.
        blocker: the reason put on every node held with ``block``.
    """

    def __init__(self, graph: Graph, blocker: str) -> None:
        self.graph = graph
        self.blocker = blocker
        self._holds: list[tuple[BlockNode, NodeUser, bool]] = []

    def take(self, node: BlockNode, user: NodeUser, *, block: bool = True) -> None:
        """Add ``user`` to ``node`` and, with ``block``, block the node.

        Raises:
            RequestError, HostError: a permission conflict; nothing was taken.
        """
        self.graph.add_user(node, user)
        blocked = any(held is node and b for held, _, b in self._holds)
        self._holds.append((node, user, block))
        if block and not blocked:
            node.block(self.blocker)

    async def release(self, only: BlockNode | None = None, skip: BlockNode | None = None) -> None:
        """Give back the holds (on ``only``, or on every node but ``skip``), newest
        first, lifting each node's blocker once."""
        mine = [
            h
            for h in self._holds
            if (only is None or h[0] is only) and (skip is None or h[0] is not skip)
        ]
        self._holds = [h for h in self._holds if not any(h is m for m in mine)]
        unblocked: list[BlockNode] = []
        for node, user, block in reversed(mine):
            if block and not any(n is node for n in unblocked):
                node.unblock(self.blocker)
                unblocked.append(node)
            await self.graph.remove_user(node, user)
