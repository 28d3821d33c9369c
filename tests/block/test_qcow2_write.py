"""Writes through the qcow2 driver, mirrored on a raw reference and judged by qemu-img."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.chains import TINY_CACHES, close, graph_of, open_qcow2, read_all
from kit.qemu import assert_clean, image_info, io_script, qemu_img, to_raw

from blockd.block.qcow2.create import create_qcow2
from blockd.errors import QMPError

SIZE = 3 * 1024 * 1024 + 4096  # not a multiple of the L2 span of 64 KiB clusters

# one write: (offset, length, seed); offsets biased to cluster boundaries
_offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.integers(0, SIZE // 512 - 1).map(lambda s: s * 512),
)
_writes = st.lists(
    st.tuples(_offsets, st.integers(1, 300_000), st.integers(0, 2**32)), min_size=1, max_size=12
)
_ops = st.lists(
    st.one_of(
        _writes.map(lambda w: ("writes", w)), st.just(("flush", [])), st.just(("reopen", []))
    ),
    min_size=1,
    max_size=5,
)

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


#: qcow2 options per set-up: caches of two entries (tables, or 512-byte slices of them)
CACHES: dict[str, dict[str, Any]] = {
    "tiny-caches": TINY_CACHES,
    "tiny-slices": {**TINY_CACHES, "l2-cache-entry-size": 512},
}


async def apply(
    path: Path,
    ref: bytearray,
    ops: list[tuple[str, list[tuple[int, int, int]]]],
    extra: dict[str, Any],
) -> None:
    node = await open_qcow2(path, **extra)
    try:
        for kind, writes in ops:
            if kind == "flush":
                await node.flush()
            elif kind == "reopen":
                await close(node)
                node = await open_qcow2(path, **extra)
            for off, length, seed in writes:
                length = min(length, SIZE - off)
                data = random.Random(seed).randbytes(length)
                await node.write(off, data)
                ref[off : off + length] = data
        assert await read_all(node) == ref
    finally:
        await close(node)


def judge(path: Path, ref: bytes, work: Path) -> None:
    raw = work / "ref.raw"
    raw.write_bytes(ref)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw)
    assert_clean(path)


def run_case(
    setup: str, cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "img.qcow2"
        if setup in ("fresh", "tiny-caches", "tiny-slices"):
            create_qcow2(path, SIZE, cluster_size=cluster_size)
        elif setup == "backing":
            base = work / "base.qcow2"
            create_qcow2(base, SIZE - 700_000, cluster_size=65536)
            io_script(base, "write -P 0x5a 0 1M", "write -P 0x5b 1200k 1M")
            create_qcow2(path, SIZE, cluster_size=cluster_size, backing_file="base.qcow2",
                         backing_fmt="qcow2")  # fmt: skip
            io_script(path, "write -P 0x61 64k 64k", "write -z 1M 64k", "write -z 64k 32k")
        elif setup == "snapshot":
            create_qcow2(path, SIZE, cluster_size=cluster_size)
            io_script(path, "write -P 0x71 0 2M", "write -z 2M 128k")
            qemu_img("snapshot", "-c", "s1", path)
            io_script(path, "write -P 0x72 512k 64k")
        elif setup == "compressed":
            src = work / "src.raw"
            src.write_bytes(random.Random(7).randbytes(SIZE // 2) + b"\x33" * (SIZE - SIZE // 2))
            qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                f"cluster_size={cluster_size}", src, path)  # fmt: skip
        ref = bytearray(to_raw(path, work / "before.raw"))
        snap_before = None
        if setup == "snapshot":
            snap_before = to_raw_snapshot(path, work / "snap.raw")
        trio.run(apply, path, ref, ops, CACHES.get(setup, {}))
        judge(path, bytes(ref), work)
        if snap_before is not None:
            assert to_raw_snapshot(path, work / "snap2.raw") == snap_before
            # QEMU can still drop the snapshot: every refcount we left is exact
            qemu_img("snapshot", "-d", "s1", path)
            assert_clean(path)
            qemu_img("compare", "-f", "qcow2", "-F", "raw", path, work / "ref.raw")


def to_raw_snapshot(path: Path, out: Path) -> bytes:
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", path, out)
    return out.read_bytes()


@SETTINGS
@given(cluster_size=st.sampled_from([512, 4096, 65536]), ops=_ops)
def test_random_writes_fresh(
    cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    run_case("fresh", cluster_size, ops)


@SETTINGS
@given(cluster_size=st.sampled_from([512, 1024]), ops=_ops)
def test_random_writes_tiny_caches(
    cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    """Two L2 tables and two refcount blocks cached: every request evicts."""
    run_case("tiny-caches", cluster_size, ops)


@SETTINGS
@given(cluster_size=st.sampled_from([4096, 65536]), ops=_ops)
def test_random_writes_tiny_slices(
    cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    """Two 512-byte L2 slices cached: requests cross slices of one table and evict."""
    run_case("tiny-slices", cluster_size, ops)


@SETTINGS
@given(cluster_size=st.sampled_from([1024, 65536]), ops=_ops)
def test_random_writes_backing(
    cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    run_case("backing", cluster_size, ops)


@SETTINGS
@given(cluster_size=st.sampled_from([4096, 65536]), ops=_ops)
def test_random_writes_snapshot(
    cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    run_case("snapshot", cluster_size, ops)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_size=st.sampled_from([4096, 65536]), ops=_ops)
def test_random_writes_compressed(
    cluster_size: int, ops: list[tuple[str, list[tuple[int, int, int]]]]
) -> None:
    run_case("compressed", cluster_size, ops)


@pytest.mark.parametrize("refcount_bits", [16, 64])
async def test_refcount_table_grows(tmp_path: Path, refcount_bits: int) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB (2 MiB with 64-bit
    refcounts, so the table moves three times); write 12 MiB with two-table caches."""
    path = tmp_path / "small.qcow2"
    size = 16 * 1024 * 1024
    create_qcow2(path, size, cluster_size=512, refcount_bits=refcount_bits)
    ref = bytearray(size)
    node = await open_qcow2(path, **TINY_CACHES)
    try:
        for i, off in enumerate(range(0, 12 * 1024 * 1024, 256 * 1024)):
            data = bytes([i % 251 + 1]) * (200 * 1024)
            await node.write(off + 1000, data)
            ref[off + 1000 : off + 1000 + len(data)] = data
    finally:
        await close(node)
    (tmp_path / "ref.raw").write_bytes(ref)
    qemu_img("compare", "-F", "raw", path, tmp_path / "ref.raw")
    assert_clean(path)
    info = qemu_img("info", path).stdout
    assert "virtual size: 16 MiB" in info


async def test_v2_and_refcount_widths(tmp_path: Path) -> None:
    for compat, bits in [("0.10", 16), ("1.1", 1), ("1.1", 2), ("1.1", 8), ("1.1", 64)]:
        path = tmp_path / f"img-{compat}-{bits}.qcow2"
        create_qcow2(path, 2 * 1024 * 1024, cluster_size=4096, compat=compat, refcount_bits=bits)
        node = await open_qcow2(path)
        try:
            await node.write(5000, b"\x99" * 100_000)
        finally:
            await close(node)
        assert_clean(path)
        assert to_raw(path, tmp_path / "out.raw")[5000:105000] == b"\x99" * 100_000


async def test_lazy_refcounts_image_written_eagerly(tmp_path: Path) -> None:
    """The lazy-refcounts compat bit allows, but does not require, stale refcounts:
    blockd keeps them exact and never sets the dirty bit."""
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "2M")
    node = await open_qcow2(path)
    try:
        await node.write(4096, b"\x31" * 200_000)
        assert node.driver.image_info()["format-specific"]["data"]["lazy-refcounts"] is True
    finally:
        await close(node)
    assert_clean(path)
    got = image_info(path, force_share=False)
    assert got["dirty-flag"] is False


async def test_read_only_node_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    create_qcow2(path, 1 << 20)
    before = path.read_bytes()
    node = await open_qcow2(path, read_only=True)
    try:
        try:
            await node.write(0, b"x")
        except OSError as exc:
            assert exc.errno == 1  # EPERM
        else:
            raise AssertionError("write to a read-only node succeeded")
        await read_all(node)
        await node.flush()
    finally:
        await close(node)
    assert path.read_bytes() == before


async def test_reopen_read_write_and_back(tmp_path: Path) -> None:
    path = tmp_path / "top.qcow2"
    create_qcow2(path, 1 << 20)
    node = await open_qcow2(path, read_only=True)
    graph = graph_of(node)
    try:
        await graph.reopen(node, read_only=False)
        await node.write(1000, b"\x42" * 70_000)
        await graph.reopen(node, read_only=True)
        # everything cached is on disk once the node is read-only again
        assert_clean(path)
        assert to_raw(path, tmp_path / "out.raw")[1000:71000] == b"\x42" * 70_000
    finally:
        await close(node)


async def test_reopen_dirty_image_read_write_refused(tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    create_qcow2(path, 1 << 20)
    data = bytearray(path.read_bytes())
    data[72:80] = (1).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    node = await open_qcow2(path, read_only=True)
    graph = graph_of(node)
    try:
        with pytest.raises(QMPError, match="dirty bit"):
            await graph.reopen(node, read_only=False)
        assert node.read_only
    finally:
        await close(node)
    assert path.read_bytes() == bytes(data)


@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 * 1024 * 1024])
async def test_large_unaligned_writes_over_backing(tmp_path: Path, cluster_size: int) -> None:
    """Multi-MiB requests with partial first and last clusters: copy-on-write of both
    ends from the backing file, the middle written straight from the caller's buffer."""
    size = 12 * 1024 * 1024
    base = tmp_path / "base.qcow2"
    create_qcow2(base, size)
    io_script(base, "write -P 0x5c 0 12M")
    path = tmp_path / "top.qcow2"
    create_qcow2(path, size, cluster_size=cluster_size, backing_file="base.qcow2",
                 backing_fmt="qcow2")  # fmt: skip
    ref = bytearray(b"\x5c" * size)
    rnd = random.Random(cluster_size)
    node = await open_qcow2(path)
    try:
        for off, length in [(1000, 3 << 20), (5 << 20, (2 << 20) + 777), (9 << 20, 1 << 20),
                            ((4 << 20) - 1, 3)]:  # fmt: skip
            data = rnd.randbytes(length)
            await node.write(off, data)
            ref[off : off + length] = data
        assert await read_all(node) == ref
    finally:
        await close(node)
    judge(path, bytes(ref), tmp_path)
