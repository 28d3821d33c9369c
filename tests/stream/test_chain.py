"""Chain queries (blockd.block.chain) on real images: allocation across layers with
QEMU's meaning, and the base lookup by backing file name
(docs/qemu-behaviour/block-stream.md §3, step 5)."""

from __future__ import annotations

import os
from pathlib import Path

from kit.chains import Layer, build, qcow2
from kit.qemu import KIB, MIB

from blockd.block import chain
from blockd.block.graph import Graph
from blockd.block.node import BlockNode


def relative_chain(tmp: Path) -> Path:
    """base (1 MiB, data at 0) <- mid (zero cluster at 64K, data at 512K) <- top (2 MiB,
    data at 1 MiB); backing names are written relative ("base.qcow2")."""
    return build(
        tmp,
        Layer("base.qcow2", 1 * MIB, ["write -P 1 0 128k"]),
        Layer("mid.qcow2", writes=["write -z 64k 64k", "write -P 2 512k 64k"]),
        Layer("top.qcow2", "2M", ["write -P 3 1M 64k"]),
    )[-1]


async def open_top(graph: Graph, path: Path) -> BlockNode:
    return await graph.open_node(qcow2(path), top_level=True)


async def test_allocation_with_qemu_meaning(graph: Graph, tmp_path: Path) -> None:
    top = await open_top(graph, relative_chain(tmp_path))
    mid = top.backing
    assert mid is not None and mid.backing is not None
    base = mid.backing
    # The top itself.
    assert await chain.is_allocated(top, 1 * MIB, 512 * KIB) == (True, 64 * KIB)
    allocated, n = await chain.is_allocated(top, 0, 512 * KIB)
    assert not allocated and n > 0
    # The zero cluster in mid shadows base's data: allocated in mid.
    assert await chain.is_allocated_above(mid, base, False, 64 * KIB, 64 * KIB) == (
        True,
        64 * KIB,
    )
    # base's data: not allocated above base, allocated when base is included.
    assert await chain.is_allocated_above(mid, base, False, 0, 64 * KIB) == (False, 64 * KIB)
    assert await chain.is_allocated_above(mid, base, True, 0, 64 * KIB) == (True, 64 * KIB)
    # Past the end of the 1 MiB chain below a 2 MiB top: the first layer is short.
    assert await chain.is_allocated_above(mid, None, True, 1536 * KIB, 64 * KIB) == (False, 0)
    # Overlay lookups.
    assert chain.find_overlay(top, base) is mid
    assert chain.find_overlay(top, None) is base
    assert chain.find_overlay(mid, top) is None
    assert chain.chain_contains(top, base) and not chain.chain_contains(mid, top)


async def test_find_backing_image_by_name(graph: Graph, tmp_path: Path) -> None:
    top = await open_top(graph, relative_chain(tmp_path))
    mid = top.backing
    assert mid is not None
    base = mid.backing
    # As written in the header, absolute, and through another spelling of the directory.
    assert chain.find_backing_image(top, "mid.qcow2") is mid
    assert chain.find_backing_image(top, str(tmp_path / "mid.qcow2")) is mid
    assert chain.find_backing_image(top, str(tmp_path / "." / "base.qcow2")) is base
    os.symlink(tmp_path, tmp_path / "link")
    assert chain.find_backing_image(top, str(tmp_path / "link" / "base.qcow2")) is base
    # Not in the chain, or the top itself.
    assert chain.find_backing_image(top, "top.qcow2") is None
    assert chain.find_backing_image(top, "nbd:localhost:10809") is None


def test_path_has_protocol() -> None:
    assert chain.path_has_protocol("nbd:host:1")
    assert chain.path_has_protocol("json:{}")
    assert not chain.path_has_protocol("/a/b:c")
    assert not chain.path_has_protocol("plain.qcow2")
