"""The pure permission rules (blockd.block.permissions), from tables; no trio, no files."""

from __future__ import annotations

import pytest

from blockd.block.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.node import BlockNode, NodeUser
from blockd.block.permissions import check, link_perms, plan
from blockd.errors import RequestError

R, W, WU, RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE

# (role, parent perm, parent shared, metadata, writable) -> (child perm, child shared)
LINKS = [
    # a read-write qcow2 with no users: QEMU 10 locks 100,101,103 and 201,203 on its file
    (("file", PERM_NONE, PERM_ALL, True, True), (R | W | RS, R | WU)),
    (("file", PERM_NONE, PERM_ALL, True, False), (R, R | WU)),
    # raw and filters pass through
    (("file", R | W, R | WU, False, True), (R | W, R | WU)),
    (("image", R, PERM_ALL, False, False), (R, PERM_ALL)),
    # backing: at most consistent read, writes shared only if the parents share them
    (("backing", R | W | RS, R | WU, True, True), (R, R | WU)),
    (("backing", R, PERM_ALL, True, True), (R, PERM_ALL)),
    (("backing", PERM_NONE, PERM_ALL, True, False), (PERM_NONE, PERM_ALL)),
]


@pytest.mark.parametrize(("given", "expected"), LINKS)
def test_link_rules(given: tuple[str, Perm, Perm, bool, bool], expected: tuple[Perm, Perm]) -> None:
    role, perm, shared, metadata, writable = given
    assert link_perms(role, perm, shared, metadata=metadata, writable=writable) == expected


def chain() -> tuple[BlockNode, BlockNode, BlockNode]:
    """qcow2 ``top`` (rw) over ``top-file``, with backing ``base`` (ro)."""
    top, file, base = BlockNode("top", {}), BlockNode("top-file", {}), BlockNode("base", {}, True)
    for role, child in (("file", file), ("backing", base)):
        top.children[role] = child
        child.parents.append(top)
    return top, file, base


def test_cumulative_permissions_of_a_chain() -> None:
    top, file, base = chain()
    result = check(plan([top, file, base], lambda node: node is top))
    assert result[top] == (PERM_NONE, PERM_ALL)
    assert result[file] == (R | W | RS, R | WU)
    assert result[base] == (PERM_NONE, PERM_ALL)


def test_writer_on_read_only_node_and_conflicts() -> None:
    top, file, base = chain()
    base.users.append(NodeUser("stream job 'j'", "intermediate node", W, R))
    with pytest.raises(RequestError, match="Block node is read-only"):
        check(plan([top, file, base], lambda node: node is top))
    base.users.clear()
    top.users.append(NodeUser("stream job 'a'", "active node", R | W, R))
    top.users.append(NodeUser("stream job 'b'", "active node", R | W, R | W))
    with pytest.raises(RequestError) as info:
        check(plan([top, file, base], lambda node: node is top))
    assert info.value.desc.startswith(
        "Permission conflict on node 'top': permissions 'write' are both required by "
        "stream job 'b' (uses node 'top' as 'active node' child) and unshared by "
        "stream job 'a'"
    )


def test_force_share_shares_everything() -> None:
    node = BlockNode("n", {"force-share": True}, True)
    node.users.append(NodeUser("a", "x", R, R))
    node.users.append(NodeUser("b", "x", R | W, PERM_ALL))
    with pytest.raises(RequestError, match="read-only"):
        check(plan([node], lambda _: False))
    node.users[1] = NodeUser("b", "x", R, PERM_NONE)
    assert check(plan([node], lambda _: False))[node] == (R, PERM_ALL)
