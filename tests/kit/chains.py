"""Image chains: made on disk by ``qemu-img``/``qemu-io``, described to a daemon as
``blockdev-add`` arguments, and opened in-process through a :class:`~blockd.block.graph.Graph`.

On disk: :func:`build` makes a chain from :class:`Layer` descriptions, bottom first (each
layer backed by the one before it); :func:`mixed_chain` and :func:`base_and_top` are the
chains several test areas share. As arguments: :func:`file_ref`, :func:`qcow2` and
:func:`raw` (:func:`format_node`) give the options of one node, :func:`blockdev_args` the
``--blockdev`` command-line options of a list of them, :func:`blkdebug_030` the rules of
iotest 030.
In-process: :func:`open_qcow2`, :func:`read_all`, :func:`graph_of`, :func:`close`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockd.block.graph import Graph
from blockd.block.node import BlockNode
from kit.qemu import create, io_script

# --- blockdev-add arguments ----------------------------------------------------------------


def file_ref(path: Path | str, **options: Any) -> dict[str, Any]:
    """Inline options of a ``file`` node over ``path``."""
    return {"driver": "file", "filename": str(path), **options}


def format_node(
    driver: str, path: Path | str, name: str | None = None, **options: Any
) -> dict[str, Any]:
    """Options of a ``driver`` node named ``name`` (None: unnamed) over a ``file`` node of
    ``path``; ``options`` follow as given (wire names: ``**{"read-only": True}``)."""
    opts: dict[str, Any] = {"driver": driver}
    if name is not None:
        opts["node-name"] = name
    return {**opts, "file": file_ref(path), **options}


def qcow2(path: Path | str, name: str | None = "top", **options: Any) -> dict[str, Any]:
    """:func:`format_node` of a qcow2 node, named ``top`` unless told otherwise."""
    return format_node("qcow2", path, name, **options)


def raw(path: Path | str, name: str | None = None, **options: Any) -> dict[str, Any]:
    """:func:`format_node` of a raw node."""
    return format_node("raw", path, name, **options)


def blockdev_args(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """``--blockdev JSON`` for each of ``nodes``, in order (QSD's and blockd's option)."""
    return [arg for node in nodes for arg in ("--blockdev", json.dumps(node))]


#: iotest 030 TestEIO's blkdebug config file: fail the read covering sector 1024 once, in
#: state 1, while every ``read_aio`` flips the state 1 <-> 2.
BLKDEBUG_030_CONF = """
[inject-error]
event = "read_aio"
errno = "5"
sector = "1024"
state = "1"
once = "on"
immediately = "off"

[set-state]
event = "read_aio"
state = "1"
new_state = "2"

[set-state]
event = "read_aio"
state = "2"
new_state = "1"
"""


def blkdebug_030(errno: int, **inject: Any) -> dict[str, Any]:
    """The blkdebug options of iotest 030 (:data:`BLKDEBUG_030_CONF`) as QMP arguments,
    failing with ``errno``; ``inject`` adds members to the inject-error rule."""
    return {
        "inject-error": [
            {"event": "read_aio", "errno": errno, "sector": 1024, "state": 1, "once": True,
             **inject},
        ],
        "set-state": [
            {"event": "read_aio", "state": 1, "new_state": 2},
            {"event": "read_aio", "state": 2, "new_state": 1},
        ],
    }  # fmt: skip


# --- chains on disk ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One image of a chain made by :func:`build`.

    Args:
        name: its file name in the chain's folder; ``.raw`` images are raw, others qcow2.
        size: its virtual size (None: its backing file's).
        writes: ``qemu-io`` commands run on it once it exists (``"write -P 1 0 64k"``).
        options: ``qemu-img create -o`` options (``"cluster_size=4096"``).
        absolute: name the backing file in the header by its absolute path (else by
            ``name`` relative to the folder, as QEMU resolves it).
    """

    name: str
    size: int | str | None = None
    writes: Sequence[str] = ()
    options: Sequence[str] = ()
    absolute: bool = False

    @property
    def fmt(self) -> str:
        return "raw" if self.name.endswith(".raw") else "qcow2"


def build(directory: Path, *layers: Layer) -> list[Path]:
    """Make ``layers`` in ``directory``, bottom first, each backed by the one before it
    (its format recorded in the header); their paths, bottom first."""
    paths: list[Path] = []
    below: Layer | None = None
    for layer in layers:
        path = directory / layer.name
        backing: Path | str | None = None
        if below is not None:
            backing = paths[-1] if layer.absolute else below.name
        create(path, layer.size, backing, below.fmt if below else None, layer.fmt,
               *layer.options)  # fmt: skip
        if layer.writes:
            io_script(path, *layer.writes, fmt=layer.fmt)
        paths.append(path)
        below = layer
    return paths


def mixed_chain(directory: Path) -> dict[str, Path]:
    """``base.raw`` (2 MiB, 0x01 in its first 64 KiB) <- ``mid.qcow2`` (0x02 in the
    second 64 KiB, backing named relative) <- ``top.qcow2`` (4 KiB clusters, backing
    named by absolute path)."""
    base, mid, top = build(
        directory,
        Layer("base.raw", "2M", ["write -P 1 0 65536"]),
        Layer("mid.qcow2", writes=["write -P 2 65536 65536"]),
        Layer("top.qcow2", options=["cluster_size=4096"], absolute=True),
    )
    return {"base": base, "mid": mid, "top": top}


def base_and_top(directory: Path, size: str = "64M", pattern: int = 0x5A) -> tuple[Path, Path]:
    """``base.qcow2`` (``size``, all ``pattern``) <- ``top.qcow2`` (empty, backing named
    by absolute path): a stream has the whole base to copy."""
    base, top = build(
        directory,
        Layer("base.qcow2", size, [f"write -P {pattern} 0 {size}"]),
        Layer("top.qcow2", absolute=True),
    )
    return base, top


# --- opened in-process ---------------------------------------------------------------------

_GRAPHS: dict[BlockNode, Graph] = {}


async def open_qcow2(
    path: Path,
    *,
    read_only: bool = False,
    backing: Any = "header",
    graph: Graph | None = None,
    **extra: Any,
) -> BlockNode:
    """Open ``path`` as qcow2 node ``top`` over a file node, in ``graph`` (default: a new
    one, closed by :func:`close`); the backing chain comes from the header unless
    ``backing`` says otherwise (None: no backing)."""
    graph = graph or Graph()
    options = qcow2(path, "top", **{"read-only": read_only}, **extra)
    if backing != "header":
        options["backing"] = backing
    node = await graph.open_node(options, top_level=True)
    _GRAPHS[node] = graph
    return node


def graph_of(node: BlockNode) -> Graph:
    """The graph :func:`open_qcow2` opened ``node`` in."""
    return _GRAPHS[node]


async def close(node: BlockNode) -> None:
    """Close the graph :func:`open_qcow2` opened ``node`` in, and everything in it."""
    await _GRAPHS.pop(node).close_all()


async def read_all(node: BlockNode, chunk: int = 1 << 20) -> bytes:
    """The whole guest view of ``node``, read ``chunk`` bytes at a time."""
    out = bytearray(node.length())
    view = memoryview(out)
    for off in range(0, len(out), chunk):
        await node.read(off, view[off : off + chunk])
    return bytes(out)


#: qcow2 options that shrink both metadata caches to two tables (forces evictions)
TINY_CACHES: dict[str, Any] = {"l2-cache-size": 1024, "refcount-cache-size": 1024}
