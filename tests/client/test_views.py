"""Tree and table rendering from real query results (captured from qemu-storage-daemon
7.2 and 10.0, paths made relative), and from QEMU 10.1's ``children`` lists."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console, RenderableType

from blockd.client.views import Edge, chain_names, chains, graph_edges, jobs_table, node_tree

DATA = Path(__file__).parent / "data"


def load(name: str) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = json.loads((DATA / name).read_text())
    return nodes


def render(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.splitlines())


def by_file(nodes: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(drv, file) → node name, to state expectations without generated names."""
    return {(n["drv"], n["file"]): n["node-name"] for n in nodes}


@pytest.mark.parametrize("capture", ["nodes-qsd72.json", "nodes-qsd10.json"])
def test_edges_rebuilt_from_filenames(capture: str) -> None:
    nodes = load(capture)
    name = by_file(nodes)
    expected = {
        Edge("top", "file", name["file", "top.qcow2"]),
        Edge("top", "backing", name["qcow2", "mid.qcow2"]),
        Edge(name["qcow2", "mid.qcow2"], "file", name["file", "mid.qcow2"]),
        Edge(name["qcow2", "mid.qcow2"], "backing", name["qcow2", "base.qcow2"]),
        Edge(name["qcow2", "base.qcow2"], "file", name["file", "base.qcow2"]),
    }
    assert set(graph_edges(nodes)) == expected
    assert chain_names(nodes, "top") == ["top", name["qcow2", "mid.qcow2"],
                                         name["qcow2", "base.qcow2"]]  # fmt: skip


@pytest.mark.parametrize("capture", ["nodes-qsd72-streaming.json", "nodes-qsd10-streaming.json"])
def test_stream_filter_sits_on_top(capture: str) -> None:
    nodes = load(capture)
    name = by_file(nodes)
    cor = name["copy-on-read", "top.qcow2"]
    assert Edge(cor, "file", "top") in graph_edges(nodes)
    assert chain_names(nodes, cor)[:2] == [cor, "top"]
    text = render(node_tree(nodes, roles=frozenset({"backing"}), title="backing chains"))
    lines = text.splitlines()
    assert lines[0] == "backing chains"
    assert lines[1].startswith(f"└── {cor}  copy-on-read")
    assert "file: top  qcow2  8 MiB  top.qcow2" in lines[2]
    assert "backing: " in lines[3] and "mid.qcow2" in lines[3]
    assert "backing: " in lines[4] and "base.qcow2" in lines[4]
    assert len(lines) == 5


def test_full_tree_layout() -> None:
    nodes = load("nodes-qsd72.json")
    name = by_file(nodes)
    text = render(node_tree(nodes))
    assert text.splitlines() == [
        "block nodes",
        "└── top  qcow2  8 MiB  top.qcow2",
        f"    ├── file: {name['file', 'top.qcow2']}  file  top.qcow2",
        f"    └── backing: {name['qcow2', 'mid.qcow2']}  qcow2  8 MiB  ro  mid.qcow2",
        f"        ├── file: {name['file', 'mid.qcow2']}  file  ro  mid.qcow2",
        f"        └── backing: {name['qcow2', 'base.qcow2']}  qcow2  8 MiB  ro  base.qcow2",
        f"            └── file: {name['file', 'base.qcow2']}  file  ro  base.qcow2",
    ]


def test_start_node_and_unknown_node() -> None:
    nodes = load("nodes-qsd10.json")
    mid = by_file(nodes)["qcow2", "mid.qcow2"]
    lines = render(node_tree(nodes, roles=frozenset({"backing"}), start=mid)).splitlines()
    assert lines[1].startswith(f"└── {mid}  qcow2") and "base.qcow2" in lines[2]
    assert len(lines) == 3
    with pytest.raises(KeyError):
        node_tree(nodes, start="nope")


def test_children_lists_win() -> None:
    """QEMU 10.1+ lists children; then no filename guessing happens (here the names
    would mislead it: two nodes share a filename)."""
    nodes: list[dict[str, Any]] = [
        {"node-name": "a", "drv": "qcow2", "file": "x.qcow2", "backing_file": "y.qcow2",
         "children": [{"child": "file", "node-name": "a-file"},
                      {"child": "backing", "node-name": "b"}]},
        {"node-name": "a-file", "drv": "file", "file": "x.qcow2", "children": []},
        {"node-name": "b", "drv": "raw", "file": "y.qcow2", "children": []},
        {"node-name": "decoy", "drv": "qcow2", "file": "y.qcow2", "children": []},
    ]  # fmt: skip
    assert set(graph_edges(nodes)) == {Edge("a", "file", "a-file"), Edge("a", "backing", "b")}
    assert chain_names(nodes, "a") == ["a", "b"]


def test_jobs_table() -> None:
    jobs = [
        {"id": "j1", "type": "stream", "status": "running", "current-progress": 3 * 2**20,
         "total-progress": 12 * 2**20},
        {"id": "j0", "type": "stream", "status": "concluded", "current-progress": 2**20,
         "total-progress": 2**21, "error": "Input/output error"},
    ]  # fmt: skip
    block_jobs = [{"device": "j1", "speed": 2**20, "io-status": "ok"},
                  {"device": "j0", "speed": 0, "io-status": "ok"}]  # fmt: skip
    text = render(jobs_table(jobs, block_jobs))
    j1 = next(line for line in text.splitlines() if "j1" in line)
    j0 = next(line for line in text.splitlines() if "j0" in line)
    for part in ("stream", "running", "3 MiB / 12 MiB (25%)", "1 MiB/s", "ok"):
        assert part in j1
    for part in ("concluded", "1 MiB / 2 MiB (50%)", "unlimited", "Input/output error"):
        assert part in j0
    assert text.index("j1") < text.index("j0")  # query-jobs order (newest first) is kept


@pytest.mark.parametrize(
    ("capture", "tops"),
    [("nodes-qsd72.json", ["top"]), ("nodes-qsd10-streaming.json", ["copy-on-read"])],
)
def test_chains(capture: str, tops: list[str]) -> None:
    nodes = load(capture)
    name = by_file(nodes)
    found = chains(nodes)
    assert len(found) == 1 and len(found[0]) == 3 + (tops == ["copy-on-read"])
    first = "top" if tops == ["top"] else name["copy-on-read", "top.qcow2"]
    assert found[0][0] == first and found[0][-1] == name["qcow2", "base.qcow2"]
