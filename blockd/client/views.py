"""Turn QMP query results into terminal views (rich renderables); no I/O here.

The node graph comes from ``query-named-block-nodes`` (docs/qemu-behaviour/node-info.md §2). QEMU
10.1 and later list each node's ``children``; older servers (QEMU 7.2 to 10.0) do not, so the
edges are rebuilt from filenames: a node's ``backing_file`` is the filename of its
backing node, and a protocol node with the same filename as a format node is its ``file``
child. A filter (``copy-on-read`` during a stream) has the node it sits on as its child.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from blockd.client.sizes import format_rate, format_size

#: Drivers that talk to storage directly (QEMU's protocol drivers).
PROTOCOL_DRIVERS: Final = frozenset(
    {"file", "host_device", "host_cdrom", "nbd", "null-co", "null-aio", "nvme", "ssh", "http",
     "https", "ftp", "ftps", "iscsi", "rbd", "gluster", "nfs", "io_uring"}
)  # fmt: skip
#: Filter drivers: they forward to one child and never change data.
FILTER_DRIVERS: Final = frozenset(
    {"copy-on-read", "throttle", "blkdebug", "blkverify", "preallocate", "compress",
     "blklogwrites", "snapshot-access"}
)  # fmt: skip

Node = Mapping[str, Any]


@dataclass(frozen=True)
class Edge:
    """``parent`` uses ``child`` as its child named ``role`` (``backing``, ``file``)."""

    parent: str
    role: str
    child: str


def graph_edges(nodes: Sequence[Node]) -> list[Edge]:
    """Every parent→child edge among ``nodes`` (see the module docstring)."""
    names = {n["node-name"] for n in nodes}
    if any("children" in n for n in nodes):
        return [
            Edge(n["node-name"], c["child"], c["node-name"])
            for n in nodes
            for c in n.get("children", [])
            if c.get("node-name") in names
        ]
    edges: list[Edge] = []
    # Oldest first, so that a node's children (opened before it) are found first.
    ordered = list(reversed(nodes))
    for n in ordered:
        name, drv, filename = n["node-name"], n.get("drv"), n.get("file")
        if drv in PROTOCOL_DRIVERS:
            continue
        taken = {e.child for e in edges}
        if drv in FILTER_DRIVERS:
            below = _find(ordered, filename, {name} | taken, protocol=False)
            if below is not None:
                edges.append(Edge(name, "file", below))
            continue
        proto = _find(ordered, filename, taken, protocol=True)
        if proto is not None:
            edges.append(Edge(name, "file", proto))
        backing = n.get("backing_file")
        if backing:
            # A backing node may be shared by several overlays, so "taken" is not checked.
            target = _find(ordered, backing, {name}, protocol=False, filters=False)
            if target is not None:
                edges.append(Edge(name, "backing", target))
    return edges


def _find(
    nodes: Iterable[Node], filename: Any, exclude: set[str], *, protocol: bool, filters: bool = True
) -> str | None:
    for m in nodes:
        drv = m.get("drv")
        if (
            m.get("file") == filename
            and m["node-name"] not in exclude
            and (drv in PROTOCOL_DRIVERS) == protocol
            and (filters or drv not in FILTER_DRIVERS)
        ):
            return str(m["node-name"])
    return None


def _label(node: Node, role: str | None) -> Text:
    text = Text()
    if role:
        text.append(f"{role}: ", style="dim")
    text.append(str(node["node-name"]), style="bold cyan")
    text.append(f"  {node.get('drv', '?')}", style="magenta")
    size = (node.get("image") or {}).get("virtual-size")
    if size is not None and node.get("drv") not in PROTOCOL_DRIVERS:
        text.append(f"  {format_size(size)}", style="green")
    if node.get("ro"):
        text.append("  ro", style="yellow")
    text.append(f"  {node.get('file', '')}", style="dim")
    return text


def node_tree(nodes: Sequence[Node], *, roles: frozenset[str] | None = None,
              start: str | None = None, title: str = "block nodes") -> Tree:  # fmt: skip
    """The node graph as a tree: one branch per root (a node nobody uses as a child).

    Args:
        nodes: the result of ``query-named-block-nodes``.
        roles: only follow edges with these roles (``{"backing"}`` for backing chains;
            filters' ``file`` edges are always followed so a stream's filter shows the
            chain under it); ``None`` follows every edge.
        start: show only the tree below this node name.
        title: the label of the tree's root.

    Raises:
        KeyError: ``start`` is not a node name.
    """
    by_name = {n["node-name"]: n for n in nodes}
    edges = graph_edges(nodes)
    kids: dict[str, list[Edge]] = {}
    for e in edges:
        if roles is None or e.role in roles or by_name[e.parent].get("drv") in FILTER_DRIVERS:
            kids.setdefault(e.parent, []).append(e)
    if start is not None:
        if start not in by_name:
            raise KeyError(start)
        roots = [start]
    else:
        children = {e.child for e in edges}
        roots = [n["node-name"] for n in reversed(nodes) if n["node-name"] not in children]
        if roles is not None:
            # Chains: hide protocol nodes, which are never part of a backing chain.
            roots = [r for r in roots if by_name[r].get("drv") not in PROTOCOL_DRIVERS]
    tree = Tree(Text(title, style="bold"), guide_style="dim")

    def add(branch: Tree, name: str, role: str | None, seen: frozenset[str]) -> None:
        sub = branch.add(_label(by_name[name], role))
        for e in sorted(kids.get(name, []), key=lambda e: (e.role != "file", e.role)):
            if e.child not in seen:
                add(sub, e.child, e.role, seen | {e.child})

    for root in roots:
        add(tree, root, None, frozenset({root}))
    return tree


def chain_names(nodes: Sequence[Node], top: str) -> list[str]:
    """The backing chain from ``top`` down, following ``backing`` edges (and filters)."""
    by_name = {n["node-name"]: n for n in nodes}
    step = {e.parent: e.child for e in graph_edges(nodes)
            if e.role == "backing" or by_name[e.parent].get("drv") in FILTER_DRIVERS}  # fmt: skip
    chain = [top]
    while chain[-1] in step and step[chain[-1]] not in chain:
        chain.append(step[chain[-1]])
    return chain


def chains(nodes: Sequence[Node]) -> list[list[str]]:
    """Every backing chain, top first: one per format or filter node that no other node
    uses as its backing or filtered child (newest chain first)."""
    by_name = {n["node-name"]: n for n in nodes}
    below = {e.child for e in graph_edges(nodes)
             if e.role == "backing" or by_name[e.parent].get("drv") in FILTER_DRIVERS}  # fmt: skip
    return [chain_names(nodes, n["node-name"]) for n in nodes
            if n.get("drv") not in PROTOCOL_DRIVERS and n["node-name"] not in below]  # fmt: skip


def _progress(done: int, total: int) -> str:
    if total <= 0:
        return f"{format_size(done)} / ?"
    return f"{format_size(done)} / {format_size(total)} ({100 * done / total:.0f}%)"


def jobs_table(jobs: Sequence[Mapping[str, Any]],
               block_jobs: Sequence[Mapping[str, Any]]) -> Table:  # fmt: skip
    """A table of ``query-jobs`` joined with ``query-block-jobs`` (speed, io-status)."""
    extra = {b["device"]: b for b in block_jobs}
    table = Table(title=None, header_style="bold", expand=False)
    for col in ("ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "IO", "ERROR"):
        table.add_column(col, no_wrap=col != "ERROR")
    style = {"concluded": "green", "aborting": "red", "paused": "yellow", "running": "cyan"}
    for job in jobs:
        b = extra.get(job["id"], {})
        status = str(job.get("status", "?"))
        error = job.get("error") or b.get("error") or ""
        table.add_row(
            str(job["id"]),
            str(job.get("type", "?")),
            Text(status, style="red" if error else style.get(status, "")),
            _progress(int(job.get("current-progress", 0)), int(job.get("total-progress", 0))),
            format_rate(b["speed"]) if "speed" in b else "-",
            str(b.get("io-status", "-")),
            Text(str(error), style="red"),
        )
    return table
