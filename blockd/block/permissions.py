"""Who may do what to a node: QEMU's block permissions, computed over the whole graph.

Pure rules, no I/O (the graph applies the result to lock bytes). Every link from a parent
node and every :class:`~blockd.block.node.NodeUser` *uses* some permissions and *shares*
some with the other users of the same node (docs/qemu-behaviour/blockdev.md §6). Per link the
rules are QEMU's defaults (``bdrv_default_perms``):

* a filter's or ``raw``'s child: the parent's needs pass through unchanged, except that
  ``copy-on-read`` always adds ``write unchanged`` (it writes back what it reads);
* a format's ``file`` (its metadata lives there): ``consistent read`` always, ``write``
  and ``resize`` when the format node is writable, and neither shared with others;
* a ``backing`` link: at most ``consistent read``; writes shared only if the parents
  share them; ``consistent read`` and ``write unchanged`` always shared;
* the filters a commit job inserts: ``commit_top`` takes nothing of its child and shares
  everything (it gives its parents consistent reads the chain below no longer grants);
  ``mirror_top`` of an active commit passes its parents' needs on without ``consistent
  read`` and shares ``write`` (the job writes into the node below).

A node with ``force-share`` lets its users share everything. The check then refuses a
writer on a read-only node (``Block node is read-only``) and two users that disagree
(QEMU's ``Permission conflict on node ...`` text, first pair found).

The sets are computed as plain ``int`` bit masks (the values of :class:`Perm`): a graph
change recomputes every node of its part of the graph, and ``enum`` arithmetic would cost
most of a ``block-stream`` command. Only the results are :class:`Perm` again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Final

from blockd.block.host.locking import PERM_ALL, Perm, perm_names
from blockd.block.node import BlockNode
from blockd.errors import RequestError

_READ: Final = int(Perm.CONSISTENT_READ)
_WRITE: Final = int(Perm.WRITE)
_WRITE_UNCHANGED: Final = int(Perm.WRITE_UNCHANGED)
_RESIZE: Final = int(Perm.RESIZE)
_ALL: Final = int(PERM_ALL)
WRITES: Final = _WRITE | _WRITE_UNCHANGED


@dataclass(frozen=True)
class Use:
    """One user of a node in the check: a parent link or a NodeUser (bit masks)."""

    description: str
    child_name: str
    perm: int
    shared: int


#: how a parent uses its non-backing child, by the parent's driver
METADATA: Final = "metadata"  # a format keeping its metadata there (qcow2's ``file``)
COPY_ON_READ: Final = "copy-on-read"  # writes back what it reads: ``write unchanged``
PASSTHROUGH: Final = "passthrough"  # raw, blkdebug: the parents' needs unchanged
COMMIT_TOP: Final = "commit-top"  # a non-active commit's filter: nothing taken
MIRROR_COMMIT: Final = "mirror-commit"  # an active commit's filter

_PASSED: Final = _READ | _WRITE | _RESIZE


def link_perms(role: str, perm: int, shared: int, *, kind: str, writable: bool) -> tuple[int, int]:
    """What a parent whose users need ``perm``/``shared`` takes on its ``role`` child.

    ``kind``: :data:`METADATA`, :data:`COPY_ON_READ` or :data:`PASSTHROUGH` (how the
    parent's driver uses a non-backing child), or a commit filter's kind
    (:data:`COMMIT_TOP`, :data:`MIRROR_COMMIT`: their one child is a ``backing`` link);
    ``writable``: the parent is read-write.
    """
    # reference: QEMU bdrv_default_perms (filter / storage / cow), cor_child_perm,
    # bdrv_commit_top_child_perm, bdrv_mirror_top_child_perm
    if kind == COMMIT_TOP:
        return 0, _ALL
    if kind == MIRROR_COMMIT:
        return perm & ~_READ, shared | _WRITE
    if role == "backing":
        cow_shared = (_WRITE | _RESIZE) if shared & _WRITE else 0
        return perm & _READ, cow_shared | _READ | _WRITE_UNCHANGED
    if kind == COPY_ON_READ:
        return (perm & _PASSED) | _WRITE_UNCHANGED, (shared & _PASSED) | _WRITE_UNCHANGED
    if kind == METADATA:
        need = perm | _READ
        if writable:
            need |= _WRITE | _RESIZE
        return need, shared & ~(_WRITE | _RESIZE)
    return perm, shared


def plan(
    nodes: Iterable[BlockNode], link_kind: Callable[[BlockNode], str]
) -> dict[BlockNode, list[Use]]:
    """The users of every node in ``nodes``, parents' needs propagated downwards.

    ``link_kind(parent)`` tells how ``parent`` uses its non-backing child (a ``kind``
    of :func:`link_perms`).
    """
    uses: dict[BlockNode, list[Use]] = {}
    done: dict[BlockNode, tuple[int, int]] = {}

    def cumulative(node: BlockNode) -> None:
        """Record ``node``'s uses; its parents' are recorded already."""
        mine = [Use(u.description, u.child_name, int(u.perm), int(u.shared)) for u in node.users]
        for parent in dict.fromkeys(node.parents):
            p_perm, p_shared = done[parent]
            for role, child in parent.children.items():
                if child is node:
                    perm, shared = link_perms(
                        role,
                        p_perm,
                        p_shared,
                        kind=link_kind(parent),
                        writable=not parent.read_only,
                    )
                    mine.append(Use(f"node '{parent.name}'", role, perm, shared))
        if node.options.get("force-share"):
            mine = [replace(use, shared=_ALL) for use in mine]
        uses[node] = mine
        done[node] = totals(mine)

    # parents before children, depth first in the order given: a loop, not a recursion,
    # so that a backing chain of any length is planned (the graph has no cycles)
    for start in nodes:
        stack: list[tuple[BlockNode, bool]] = [(start, False)]
        while stack:
            node, parents_done = stack.pop()
            if node in done:
                continue
            if parents_done:
                cumulative(node)
                continue
            stack.append((node, True))
            stack.extend((p, False) for p in reversed(dict.fromkeys(node.parents)) if p not in done)
    return uses


def totals(uses: Iterable[Use]) -> tuple[int, int]:
    """The cumulative ``(perm, shared)`` of ``uses``."""
    perm, shared = 0, _ALL
    for use in uses:
        perm |= use.perm
        shared &= use.shared
    return perm, shared


def check(planned: dict[BlockNode, list[Use]]) -> dict[BlockNode, tuple[Perm, Perm]]:
    """Each node's cumulative permissions, once every node passed the check.

    Raises:
        RequestError: ``Block node is read-only``, or a permission conflict
            (docs/qemu-behaviour/blockdev.md §6).
    """
    result: dict[BlockNode, tuple[Perm, Perm]] = {}
    for node, uses in planned.items():
        perm, shared = totals(uses)
        if perm & WRITES and node.read_only:
            raise RequestError("Block node is read-only")
        for a in uses:
            for b in uses:
                if a is not b and b.perm & ~a.shared:
                    raise RequestError(
                        f"Permission conflict on node '{node.name}': permissions "
                        f"'{perm_names(Perm(b.perm & ~a.shared))}' are both required by "
                        f"{b.description} (uses node '{node.name}' as '{b.child_name}' "
                        f"child) and unshared by {a.description} (uses node "
                        f"'{node.name}' as '{a.child_name}' child)."
                    )
        result[node] = (Perm(perm), Perm(shared))
    return result
