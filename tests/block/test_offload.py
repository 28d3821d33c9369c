"""Copy offload: guest ranges mapped to host extents and copied kernel to kernel.

Chains are made with qemu-img/qemu-io; every image blockd wrote is judged with
``qemu-img check`` and against qemu-img's own view of the data.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from kit.chains import Layer, build, close, open_qcow2, qcow2, read_all
from kit.qemu import assert_clean, io_script, qemu_img, qemu_img_json, to_raw

from blockd.block.driver import Extent, OffloadNotSupported, split_extents
from blockd.block.graph import Graph
from blockd.block.host import offload
from blockd.block.node import BlockNode

KIB = 1024
MIB = 1024 * KIB
SIZE = 4 * MIB


def chain(tmp_path: Path, *, cluster: str = "64k") -> tuple[Path, Path, Path]:
    """base (0x11 everywhere, a zero cluster at 3 MiB) <- mid (0x22 at 1-2 MiB) <- top
    (0x33 at its first 64 KiB)."""
    clusters = [f"cluster_size={cluster}"]
    base, mid, top = build(
        tmp_path,
        Layer("base.qcow2", "4M", [f"write -P 0x11 0 {SIZE}", "write -z 3M 64k"], clusters),
        Layer("mid.qcow2", None, ["write -P 0x22 1M 1M"], clusters, absolute=True),
        Layer("top.qcow2", None, ["write -P 0x33 0 64k"], clusters, absolute=True),
    )
    return base, mid, top


async def map_all(node: BlockNode, offset: int, length: int) -> list[Extent] | None:
    """The extents of the whole range, or ``None`` when some of it is not mappable."""
    extents, n = await offload.map_prefix(node, offset, length)
    return extents if n == length else None


async def copy_range(source: BlockNode, offset: int, length: int, dest: BlockNode) -> bool:
    """Offload the whole range, or report that it cannot be."""
    extents = await map_all(source, offset, length)
    return extents is not None and await offload.copy_extents(dest, offset, extents)


async def opened(top: Path, **options: Any) -> tuple[Graph, BlockNode, BlockNode]:
    """``top`` opened with its chain (and qcow2 ``options``): the graph, top's node and
    its backing node."""
    graph = Graph()
    node = await open_qcow2(top, graph=graph, **options)
    assert node.backing is not None
    return graph, node, node.backing


async def test_extents_follow_the_chain_down_to_host_files(tmp_path: Path) -> None:
    top = chain(tmp_path)[2]
    view = to_raw(top, tmp_path / "view.raw")
    graph, _node, below = await opened(top)
    try:
        # 1 MiB + 64 KiB .. 2 MiB + 64 KiB: mid's data, then base's
        extents = await map_all(below, MIB + 64 * KIB, MIB)
        assert extents is not None
        assert sum(e.length for e in extents) == MIB
        assert [Path(e.node.filename).name for e in extents] == ["mid.qcow2", "base.qcow2"]
        assert [e.length for e in extents] == [MIB - 64 * KIB, 64 * KIB]
        # every extent holds exactly the bytes qemu-img shows there
        got = b"".join(os.pread(e.node.driver.fd, e.length, e.offset) for e in extents)  # type: ignore[attr-defined]
        assert got == view[MIB + 64 * KIB : 2 * MIB + 64 * KIB]
    finally:
        await graph.close_all()


async def test_zero_compressed_and_filtered_ranges_are_not_offloaded(tmp_path: Path) -> None:
    base, _, top = chain(tmp_path)
    packed = tmp_path / "packed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", base, packed)
    graph, _node, below = await opened(top)
    try:
        assert await map_all(below, 3 * MIB, 64 * KIB) is None  # zero cluster
        c = await open_qcow2(packed, graph=graph, read_only=True, **{"node-name": "packed"})
        assert await map_all(c, 0, 64 * KIB) is None  # compressed
        debug = await graph.open_node(
            {
                "driver": "blkdebug",
                "node-name": "dbg",
                "image": {"driver": "file", "filename": str(base)},
            },
            top_level=True,
        )
        assert await map_all(debug, 0, 64 * KIB) is None  # a filter
    finally:
        await graph.close_all()


@pytest.mark.parametrize(
    ("cluster", "options"),
    [
        ("64k", {}),
        # 512-byte L2 slices of 4 KiB-cluster tables: each copy spans tables and slices
        ("4k", {"l2-cache-entry-size": 512, "l2-cache-size": 1024}),
    ],
)
async def test_qcow2_takes_extents_into_new_clusters(
    tmp_path: Path, cluster: str, options: dict[str, Any]
) -> None:
    top = chain(tmp_path, cluster=cluster)[2]
    before = to_raw(top, tmp_path / "before.raw")
    graph, node, below = await opened(top, **options)
    try:
        # the whole image except top's own first cluster, then the zero cluster's
        # neighbours: three offloaded copies across mid and base
        for start, length in ((64 * KIB, 3 * MIB - 64 * KIB), (3 * MIB + 64 * KIB, MIB - 64 * KIB)):
            assert await copy_range(below, start, length, node)
        assert await read_all(node) == before
    finally:
        await graph.close_all()
    assert_clean(top)
    assert to_raw(top, tmp_path / "after.raw") == before
    # every byte with data is top's own now; only base's zero cluster still shows through
    for entry in qemu_img_json("map", top):
        if entry["start"] == 3 * MIB:
            assert entry["depth"] == 2 and entry["zero"] and entry["length"] == 64 * KIB
        else:
            assert entry["depth"] == 0 and entry["data"], entry


async def test_allocated_or_unaligned_ranges_are_refused_untouched(tmp_path: Path) -> None:
    top = chain(tmp_path)[2]
    _, node, below = await opened(top)
    try:
        size = os.path.getsize(top)
        # top stores its first cluster: a copy would overwrite it
        assert not await copy_range(below, 0, 128 * KIB, node)
        # not on a cluster boundary
        assert not await copy_range(below, 64 * KIB + 512, 64 * KIB, node)
        assert not await copy_range(below, 64 * KIB, 64 * KIB - 512, node)
        assert os.path.getsize(top) == size
    finally:
        await close(node)
    assert_clean(top)


async def test_allocated_clusters_are_overwritten_in_place(tmp_path: Path) -> None:
    """A commit's copy into a base that stores the range: the extents go over the base's
    own clusters (no allocation, no table change); a range with a zero cluster in it is
    refused untouched."""
    base, mid, _ = chain(tmp_path)
    expected = bytearray(to_raw(base, tmp_path / "base.raw"))
    expected[MIB : 2 * MIB] = b"\x22" * MIB
    host_map = [(e["start"], e.get("offset")) for e in qemu_img_json("map", base)]
    size = os.path.getsize(base)
    graph = Graph()
    dest = await graph.open_node(qcow2(base, "base"), top_level=True)
    source = await graph.open_node(
        qcow2(mid, "mid", backing="base", **{"read-only": True}), top_level=True
    )
    try:
        assert await copy_range(source, MIB, MIB, dest)
        assert not await copy_range(source, 2 * MIB, 2 * MIB, dest)  # the zero cluster at 3M
        assert await read_all(dest) == expected
    finally:
        await graph.close_all()
    assert_clean(base)
    assert os.path.getsize(base) == size
    assert [(e["start"], e.get("offset")) for e in qemu_img_json("map", base)] == host_map
    assert to_raw(base, tmp_path / "after.raw") == expected


async def test_the_last_partial_cluster_of_an_image(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    size = MIB + 4 * KIB  # the last 64 KiB cluster is partly past the end
    qemu_img("create", "-q", "-f", "qcow2", base, str(size))
    io_script(base, f"write -P 0x5a 0 {size}")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    graph, node, below = await opened(top)
    try:
        assert await copy_range(below, MIB, 4 * KIB, node)
    finally:
        await graph.close_all()
    assert_clean(top)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, base)


async def test_file_copy_falls_back_to_a_buffer_when_the_kernel_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    payload = os.urandom(3 * MIB + 100)
    src.write_bytes(payload)
    dst.write_bytes(b"")

    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    graph = Graph()
    try:
        s = await graph.open_node(
            {"driver": "file", "node-name": "s", "filename": str(src), "read-only": True},
            top_level=True,
        )
        d = await graph.open_node(
            {"driver": "file", "node-name": "d", "filename": str(dst)}, top_level=True
        )
        # two pieces, the second running 412 bytes past the source's end: zeros there
        await d.copy_in(4096, [Extent(s, 0, MIB), Extent(s, 2 * MIB, MIB + 512)])
    finally:
        await graph.close_all()
    got = dst.read_bytes()
    assert got[:4096] == bytes(4096)
    assert got[4096 : 4096 + MIB] == payload[:MIB]
    assert got[4096 + MIB : 4096 + 2 * MIB + 100] == payload[2 * MIB :]
    assert got[4096 + 2 * MIB + 100 :] == bytes(412)


async def test_direct_io_files_are_not_offloaded(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(MIB))
    dst.write_bytes(bytes(MIB))
    graph = Graph()
    try:
        s = await graph.open_node(
            {"driver": "file", "node-name": "s", "filename": str(src), "cache": {"direct": True}},
            top_level=True,
        )
        d = await graph.open_node(
            {"driver": "file", "node-name": "d", "filename": str(dst)}, top_level=True
        )
        with pytest.raises(OffloadNotSupported):
            await d.copy_in(0, [Extent(s, 0, 4096)])
    finally:
        await graph.close_all()
    assert dst.read_bytes() == bytes(MIB)


def test_split_extents_cuts_inside_an_extent() -> None:
    node = object()
    a, b = Extent(node, 0, 100), Extent(node, 1000, 50)  # type: ignore[arg-type]
    assert split_extents([a, b], 120) == (
        [a, Extent(node, 1000, 20)],  # type: ignore[arg-type]
        [Extent(node, 1020, 30)],  # type: ignore[arg-type]
    )
    assert split_extents([a, b], 100) == ([a], [b])
    assert split_extents([a], 0) == ([], [a])


async def test_the_mappable_prefix_stops_at_a_zero_cluster(tmp_path: Path) -> None:
    top = chain(tmp_path)[2]
    graph, _node, below = await opened(top)
    try:
        # base's data up to its zero cluster at 3 MiB, then that cluster alone
        extents, n = await offload.map_prefix(below, 2 * MIB, 2 * MIB)
        assert extents is not None and n == MIB
        assert await offload.map_prefix(below, 3 * MIB, MIB) == (None, 64 * KIB)
    finally:
        await graph.close_all()


async def test_copied_data_is_stable_before_a_table_points_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy runs without the qcow2 lock, so a flush may pass while it is in flight
    (after its clusters were allocated): the next flush must still make the copied data
    stable before it writes the L2 table that now points at it."""
    top = chain(tmp_path)[2]
    graph, node, below = await opened(top)
    log: list[str] = []
    try:
        file = node.file
        assert file is not None
        driver = file.driver
        real_copy_in, real_write, real_flush = driver.copy_in, driver.write, driver.flush

        async def copy_in(offset: int, extents: list[Extent]) -> None:
            await node.flush()  # a flush while the copy is in flight
            await real_copy_in(offset, extents)
            log.append("copy")

        async def write(offset: int, data: bytes | bytearray | memoryview) -> None:
            log.append(f"write {offset}")
            await real_write(offset, data)

        async def flush() -> None:
            log.append("flush")
            await real_flush()

        monkeypatch.setattr(driver, "copy_in", copy_in)
        monkeypatch.setattr(driver, "write", write)
        monkeypatch.setattr(driver, "flush", flush)
        assert await copy_range(below, MIB, MIB, node)
        l2 = node.driver.l1[0] & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
        del log[:]
        await node.flush()
        monkeypatch.undo()
    finally:
        await graph.close_all()
    assert f"write {l2}" in log
    assert log.index("flush") < log.index(f"write {l2}"), log
    assert_clean(top)
