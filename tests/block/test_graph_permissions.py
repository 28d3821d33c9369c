"""The pure permission rules (blockd.block.permissions), from tables; no trio, no files."""

from __future__ import annotations

import pytest

from blockd.block.host.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.node import BlockNode, NodeUser
from blockd.block.permissions import COPY_ON_READ, METADATA, PASSTHROUGH, check, link_perms, plan
from blockd.errors import RequestError

R, W, WU, RS = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE

# (role, parent perm, parent shared, kind, writable) -> (child perm, child shared)
LINKS = [
    # a read-write qcow2 with no users: QEMU 10 locks 100,101,103 and 201,203 on its file
    (("file", PERM_NONE, PERM_ALL, METADATA, True), (R | W | RS, R | WU)),
    (("file", PERM_NONE, PERM_ALL, METADATA, False), (R, R | WU)),
    # raw and filters pass through
    (("file", R | W, R | WU, PASSTHROUGH, True), (R | W, R | WU)),
    (("image", R, PERM_ALL, PASSTHROUGH, False), (R, PERM_ALL)),
    # copy-on-read writes back what it reads (QEMU 10 locks byte 102 during a stream)
    (("file", R, PERM_ALL & ~RS, COPY_ON_READ, True), (R | WU, R | W | WU)),
    (("file", PERM_NONE, PERM_ALL, COPY_ON_READ, True), (WU, PERM_ALL)),
    # backing: at most consistent read, writes shared only if the parents share them
    (("backing", R | W | RS, R | WU, METADATA, True), (R, R | WU)),
    (("backing", R, PERM_ALL, METADATA, True), (R, PERM_ALL)),
    (("backing", PERM_NONE, PERM_ALL, METADATA, False), (PERM_NONE, PERM_ALL)),
]


@pytest.mark.parametrize(("given", "expected"), LINKS)
def test_link_rules(given: tuple[str, Perm, Perm, str, bool], expected: tuple[Perm, Perm]) -> None:
    role, perm, shared, kind, writable = given
    assert link_perms(role, perm, shared, kind=kind, writable=writable) == expected


def chain() -> tuple[BlockNode, BlockNode, BlockNode]:
    """qcow2 ``top`` (rw) over ``top-file``, with backing ``base`` (ro)."""
    top, file, base = BlockNode("top", {}), BlockNode("top-file", {}), BlockNode("base", {}, True)
    for role, child in (("file", file), ("backing", base)):
        top.children[role] = child
        child.parents.append(top)
    return top, file, base


def test_cumulative_permissions_of_a_chain() -> None:
    top, file, base = chain()
    result = check(plan([top, file, base], lambda node: METADATA if node is top else PASSTHROUGH))
    assert result[top] == (PERM_NONE, PERM_ALL)
    assert result[file] == (R | W | RS, R | WU)
    assert result[base] == (PERM_NONE, PERM_ALL)


def test_writer_on_read_only_node_and_conflicts() -> None:
    top, file, base = chain()
    base.users.append(NodeUser("stream job 'j'", "intermediate node", W, R))
    with pytest.raises(RequestError, match="Block node is read-only"):
        check(plan([top, file, base], lambda node: METADATA if node is top else PASSTHROUGH))
    base.users.clear()
    top.users.append(NodeUser("stream job 'a'", "active node", R | W, R))
    top.users.append(NodeUser("stream job 'b'", "active node", R | W, R | W))
    with pytest.raises(RequestError) as info:
        check(plan([top, file, base], lambda node: METADATA if node is top else PASSTHROUGH))
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
        check(plan([node], lambda _: PASSTHROUGH))
    node.users[1] = NodeUser("b", "x", R, PERM_NONE)
    assert check(plan([node], lambda _: PASSTHROUGH))[node] == (R, PERM_ALL)
