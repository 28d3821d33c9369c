"""Random sequences of blockdev-add/blockdev-del keep the graph consistent (hypothesis).

After every step: each node is held (by the monitor, a parent or a user), links are
symmetric and point at open nodes, failed adds leave nothing behind, every node's
permissions are those a recomputation over the whole graph gives (changes recompute only
the part of the graph they touch), and the lock bytes on every image are exactly those
its file nodes' permissions call for. At the end, closing everything leaves no lock byte
held. The second test mixes in what jobs do: users that come and go, and filters
inserted above a node and removed again.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Final

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.chains import Layer, build
from kit.host import held_bytes
from kit.qemu import qemu_img

from blockd.block import permissions
from blockd.block.graph import Graph
from blockd.block.host.locking import PERM_ALL, PERM_NONE, Perm
from blockd.block.node import BlockNode, NodeUser
from blockd.errors import QMPError

NAMES = ["a", "b", "c", "d"]
STATS = {"nodes": 0}  # open nodes the checks saw (measured: 420 over the 40 examples)
FILES = ["base.raw", "mid.qcow2", "top.qcow2"]

file_node = st.builds(lambda f: {"driver": "file", "filename": f}, st.sampled_from(FILES))
ref = st.one_of(st.sampled_from(NAMES), file_node)
add = st.one_of(
    st.builds(lambda n, f: {"node-name": n, **f}, st.sampled_from(NAMES), file_node),
    st.builds(
        lambda n, r, ro: {"driver": "raw", "node-name": n, "file": r, "read-only": ro},
        st.sampled_from(NAMES),
        ref,
        st.booleans(),
    ),
    st.builds(
        lambda n, r, b, ro: {
            "driver": "qcow2",
            "node-name": n,
            "file": r,
            "read-only": ro,
            **({} if b == "header" else {"backing": b}),
        },
        st.sampled_from(NAMES),
        ref,
        st.one_of(st.just("header"), st.none(), st.sampled_from(NAMES)),
        st.booleans(),
    ),
)
step = st.one_of(st.tuples(st.just("add"), add), st.tuples(st.just("del"), st.sampled_from(NAMES)))
perm = st.sampled_from(list(Perm)).map(Perm) | st.just(PERM_NONE) | st.just(PERM_ALL)
job_step = st.one_of(
    step,
    st.tuples(st.just("user"), st.tuples(st.sampled_from(NAMES), perm, perm)),
    st.tuples(st.just("unuser"), st.sampled_from(NAMES)),
    # above a named node, or above its file or backing child (a filter with parents)
    st.tuples(
        st.just("filter"),
        st.tuples(st.sampled_from(NAMES), st.sampled_from([None, "file", "backing"])),
    ),
    st.just(("unfilter", None)),
    # a stream's end: the node's backing link goes (to nothing, or to its backing's)
    st.tuples(st.just("rebase"), st.tuples(st.sampled_from(NAMES), st.booleans())),
)


def check(graph: Graph, work: Path) -> None:
    nodes = list(graph.nodes.values())
    for node in nodes:
        assert node.monitor_owned or node.parents or node.users, node.name
        for child in node.children.values():
            assert graph.nodes.get(child.name) is child
            assert node in child.parents
        for parent in node.parents:
            assert node in parent.children.values()
    whole = permissions.check(permissions.plan(nodes, graph.link_kind))
    for node in nodes:
        assert (node.perm, node.shared) == whole[node], node.name
    expected: dict[str, set[int]] = {name: set() for name in FILES}
    for node in nodes:
        if node.drv == "file":
            path = Path(node.options["filename"]).name
            perm_bytes = {100 + i for i in range(4) if node.perm & (1 << i)}
            unshared = PERM_ALL & ~node.shared
            shared_bytes = {200 + i for i in range(4) if unshared & (1 << i)}
            expected[path] = expected.get(path, set()) | perm_bytes | shared_bytes
    for name, held in expected.items():
        assert held_bytes(work / name) == held, name


async def run_steps(steps: list[tuple[str, Any]], work: Path) -> None:
    graph = Graph()
    users: list[tuple[BlockNode, NodeUser]] = []
    filters: list[tuple[BlockNode, NodeUser]] = []
    try:
        for kind, argument in steps:
            await job_step_on(graph, kind, argument, users, filters)
            if kind == "add":
                options = dict(argument)
                if isinstance(options.get("file"), dict):
                    options["file"] = {
                        **options["file"],
                        "filename": str(work / options["file"]["filename"]),
                    }
                if options.get("driver") == "file":
                    options["filename"] = str(work / options["filename"])
                before = set(graph.nodes)
                try:
                    await graph.open_node(options, top_level=True)
                except QMPError:
                    assert set(graph.nodes) == before
            elif kind == "del":
                with contextlib.suppress(QMPError):
                    await graph.delete(argument)
            check(graph, work)
            STATS["nodes"] += len(graph.nodes)
        # the jobs end: each filter goes, then the remaining users, newest first
        while filters or users:
            if filters:
                await job_step_on(graph, "unfilter", None, users, filters)
            else:
                node, user = users.pop()
                await graph.remove_user(node, user)
            check(graph, work)
    finally:
        await graph.close_all()
    assert all(held_bytes(work / name) == set() for name in FILES)
    assert all(node.perm == PERM_NONE for node in graph.nodes.values())


async def job_step_on(
    graph: Graph,
    kind: str,
    argument: Any,
    users: list[tuple[BlockNode, NodeUser]],
    filters: list[tuple[BlockNode, NodeUser]],
) -> None:
    """What jobs do to the graph: a user that comes or goes, a ``copy-on-read`` filter
    inserted above a node and held (as a stream job holds its filter), or removed again
    (refusals leave the graph as it was)."""
    if kind == "user":
        name, use, share = argument
        node = graph.find(name)
        if node is not None:
            user = NodeUser("test user", "main node", use, share)
            try:
                graph.add_user(node, user)
                users.append((node, user))
            except QMPError:
                assert user not in node.users
    elif kind == "unuser":
        for node, user in reversed(users):
            if node.name == argument:
                users.remove((node, user))
                await graph.remove_user(node, user)
                break
    elif kind == "filter":
        name, role = argument
        node = graph.find(name)
        if node is not None and role is not None:
            node = node.children.get(role)
        if node is not None:
            with contextlib.suppress(QMPError):
                options = {"driver": "copy-on-read", "file": node.name}
                filt = await graph.insert_filter(options, node)
                holder = NodeUser("test filter holder", "main node", PERM_NONE, PERM_ALL)
                graph.add_user(filt, holder)
                filters.append((filt, holder))
    elif kind == "rebase":
        name, to_next = argument
        node = graph.find(name)
        old = node.children.get("backing") if node is not None else None
        if node is not None and old is not None:
            new = old.children.get("backing") if to_next else None
            with contextlib.suppress(QMPError):
                await graph.set_child(node, "backing", new)
    elif kind == "unfilter" and filters:
        filt, holder = filters.pop()  # in a stream job's order: its hold, then the filter
        await graph.remove_user(filt, holder)
        with contextlib.suppress(QMPError):
            await graph.remove_filter(filt)


def make_images(work: Path) -> None:
    build(work, Layer("base.raw", "1M"), Layer("mid.qcow2"), Layer("top.qcow2"))


def run_case(steps: list[tuple[str, Any]]) -> None:
    """``steps`` on fresh images; the images stay consistent."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work)
        trio.run(run_steps, steps, work)
        for name in ("mid.qcow2", "top.qcow2"):
            assert "No errors" in qemu_img("check", work / name).stdout


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=12))
def test_random_add_del_sequences(steps: list[tuple[str, Any]]) -> None:
    run_case(steps)


#: every sequence of the second test starts with a whole chain open: node ``a`` is top's
#: qcow2 node (its file node and its backing chain from the header below it)
CHAIN: Final = ("add", {"driver": "qcow2", "node-name": "a", "file": {"driver": "file",
                "filename": "top.qcow2"}})  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(job_step, min_size=1, max_size=16))
def test_random_sequences_with_users_and_filters(steps: list[tuple[str, Any]]) -> None:
    run_case([CHAIN, *steps])


async def test_a_closed_backing_gives_back_what_it_held(tmp_path: Path) -> None:
    """A stream's end drops the top's backing node; once that closes, the named node it
    used as its file keeps nothing of what it took (lock bytes included)."""
    make_images(tmp_path)
    lone = tmp_path / "lone.qcow2"  # no backing name in its header
    qemu_img("create", "-q", "-f", "qcow2", lone, "1M")
    graph = Graph()
    try:
        mid = str(tmp_path / "mid.qcow2")
        options = {"driver": "file", "node-name": "f", "filename": mid, "read-only": True}
        f = await graph.open_node(options, top_level=True)
        top = await graph.open_node(
            {
                "driver": "qcow2",
                "node-name": "a",
                "file": {"driver": "file", "filename": str(lone)},
                "backing": {"driver": "qcow2", "file": "f", "backing": None},
            },
            top_level=True,
        )
        # a qcow2 node keeps its metadata in its file: it reads it and lets nobody write
        assert (f.perm, f.shared) == (Perm.CONSISTENT_READ, PERM_ALL & ~(Perm.WRITE | Perm.RESIZE))
        check(graph, tmp_path)
        await graph.set_child(top, "backing", None)
        assert (f.perm, f.shared) == (PERM_NONE, PERM_ALL)
        check(graph, tmp_path)
    finally:
        await graph.close_all()
