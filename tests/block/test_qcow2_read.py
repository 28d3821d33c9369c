"""Reading qcow2 images made by qemu-img/qemu-io: byte-identical to ``qemu-img convert``."""

from __future__ import annotations

import hashlib
import importlib
import random
from array import array
from pathlib import Path

import pytest
import trio
from kit.chains import close, open_qcow2, read_all
from kit.qemu import assert_clean, io_script, qemu_img, qemu_img_json, to_raw

from blockd.block.driver import Status
from blockd.block.qcow2 import format as fmt
from blockd.block.qcow2.create import create_qcow2
from blockd.block.qcow2.format import ClusterKind
from blockd.block.qcow2.read import _continuing
from blockd.errors import QMPError

CLUSTER_SIZES = [512, 1024, 4096, 65536, 2 * 1024 * 1024]

# writes that hit cluster and L2 boundaries for every cluster size above
PATTERN_WRITES = [
    "write -P 0x11 0 1536",
    "write -P 0x22 70000 200000",
    "write -P 0x33 1048064 1024",
    "write -P 0x44 3145728 1048576",
    "write -z 3276800 131072",
    "write -z -u 3670016 65536",
    "write -P 0x55 4194304 4096",
]


def make_patterned(path: Path, cluster_size: int, compat: str, size: str = "6M") -> None:
    opts = f"cluster_size={cluster_size},compat={compat}"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)
    io_script(path, *PATTERN_WRITES)


async def assert_reads_like_qemu(path: Path, tmp_path: Path) -> None:
    expected = to_raw(path, tmp_path / "expected.raw")
    with trio.fail_after(60):
        node = await open_qcow2(path, read_only=True)
        try:
            assert await read_all(node) == expected
            # odd-sized reads across cluster boundaries
            for off, length in [(1, 700), (65535, 3), (70000 - 5, 10), (len(expected) - 513, 513)]:
                buf = bytearray(length)
                await node.read(off, buf)
                assert bytes(buf) == expected[off : off + length]
        finally:
            await close(node)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
async def test_read_patterned(tmp_path: Path, cluster_size: int, compat: str) -> None:
    path = tmp_path / "img.qcow2"
    make_patterned(path, cluster_size, compat)
    before = hashlib.sha256(path.read_bytes()).digest()
    await assert_reads_like_qemu(path, tmp_path)
    assert hashlib.sha256(path.read_bytes()).digest() == before  # read-only: untouched


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * 1024 * 1024])
async def test_read_compressed(tmp_path: Path, cluster_size: int) -> None:
    src = tmp_path / "src.qcow2"
    make_patterned(src, 65536, "1.1")
    io_script(src, "write -P 0x66 5M 12345")
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", src, path)
    await assert_reads_like_qemu(path, tmp_path)


async def test_read_with_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "snap.qcow2"
    make_patterned(path, 65536, "1.1")
    qemu_img("snapshot", "-c", "s1", path)
    io_script(path, "write -P 0x77 0 100000", "write -z 3145728 65536")
    qemu_img("snapshot", "-c", "s2", path)
    io_script(path, "write -P 0x88 65536 65536")
    await assert_reads_like_qemu(path, tmp_path)


async def test_read_chain_mixed_cluster_sizes(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "2M")
    io_script(base, "write -P 0xa1 0 2M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
        "-b", "base.qcow2", "-F", "qcow2", mid, "4M")  # fmt: skip
    io_script(mid, "write -P 0xb2 1M 1536", "write -z 1536k 8k", "write -P 0xb3 3M 100k")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
        "-b", str(mid), "-F", "qcow2", top, "5M")  # fmt: skip
    io_script(top, "write -P 0xc4 4096 1000", "write -z 0 512", "write -P 0xc5 4607k 2k")
    await assert_reads_like_qemu(top, tmp_path)


async def test_read_raw_backing_shorter(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * 700_000)  # not even a multiple of the cluster size
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "2M")
    io_script(top, "write -P 0x01 600000 1000")
    await assert_reads_like_qemu(top, tmp_path)


async def test_backing_null_reads_zeros(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    io_script(base, "write -P 0x42 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    node = await open_qcow2(top, read_only=True, backing=None)
    try:
        assert node.backing is None
        assert node.driver.header_backing() == ("base.qcow2", "qcow2")
        assert await read_all(node) == bytes(1 << 20)
    finally:
        await close(node)


@pytest.mark.parametrize("cluster_size", [512, 65536])
async def test_block_status_matches_qemu_img_map(tmp_path: Path, cluster_size: int) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "6M")
    io_script(base, "write -P 1 0 6M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "-o", f"cluster_size={cluster_size}", top)  # fmt: skip
    io_script(top, *PATTERN_WRITES)
    entries = qemu_img_json("map", top)
    node = await open_qcow2(top, read_only=True)
    try:
        for entry in entries:
            pos, end = entry["start"], entry["start"] + entry["length"]
            while pos < end:
                st = await node.block_status(pos, end - pos)
                assert st.length > 0
                if entry["depth"] == 0:
                    assert st.allocated
                    assert (Status.ZERO in st.status) == entry["zero"]
                    assert (Status.DATA in st.status) == entry["data"]
                    if "offset" in entry and Status.OFFSET_VALID in st.status:
                        assert st.offset_in_file == entry["offset"] + (pos - entry["start"])
                else:
                    assert st.status == Status.NONE
                pos += st.length
    finally:
        await close(node)


async def test_zstd_compressed(tmp_path: Path) -> None:
    """zstd clusters read like qemu-img's when the zstandard package is installed; else
    the image is refused at open with a clear error and left untouched."""
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", path, "4M")
    io_script(path, "write -c -P 0x12 0 64k", "write -c -P 0x13 1M 64k", "write -P 0x14 2M 4k")
    try:
        importlib.import_module("zstandard")
    except ImportError:
        before = path.read_bytes()
        with pytest.raises(QMPError, match="zstandard"):
            await open_qcow2(path, read_only=True)
        assert path.read_bytes() == before
        return
    await assert_reads_like_qemu(path, tmp_path)
    node = await open_qcow2(path)
    try:
        info = node.driver.image_info()
        assert info["format-specific"]["data"]["compression-type"] == "zstd"
        await node.write(1000, b"\x77" * 100)  # COW out of a zstd cluster
    finally:
        await close(node)
    expected = bytearray(b"\x12" * 65536)
    expected[1000:1100] = b"\x77" * 100
    assert to_raw(path, tmp_path / "out.raw")[:65536] == expected
    assert_clean(path)


async def test_block_status_skips_empty_tables(tmp_path: Path) -> None:
    """1 TiB, one cluster written in the middle: two status calls, no per-cluster walk."""
    path = tmp_path / "sparse.qcow2"
    create_qcow2(path, 1 << 40)
    io_script(path, "write -P 9 512G 64k")
    node = await open_qcow2(path, read_only=True)
    try:
        with trio.fail_after(5):
            first = await node.block_status(0, 1 << 40)
            assert first.status == Status.NONE
            assert first.length == 512 << 30
            second = await node.block_status(512 << 30, 1 << 40)
            assert Status.DATA in second.status
            assert second.length == 65536
            third = await node.block_status((512 << 30) + 65536, 1 << 40)
            assert third.status == Status.NONE
            assert third.length == (512 << 30) - 65536
    finally:
        await close(node)


def naive_continuing(table: list[int], idx: int, last: int, zero_run: bool, want: int) -> int:
    n = 0
    while idx + n <= last and table[idx + n] == (0 if zero_run else want + n * 65536):
        n += 1
    return n


@pytest.mark.parametrize("seed", range(40))
def test_run_scan_counts_the_entries_that_go_on(seed: int) -> None:
    """The slice scan of block status (``_continuing``) finds, in a few comparisons, as
    many entries continuing a run as a look at each entry does."""
    rng = random.Random(seed)
    cs, flags = 65536, fmt.OFLAG_COPIED
    table: list[int] = []
    while len(table) < 512:  # runs of unallocated and of contiguous normal entries
        n = rng.choice([1, 2, 15, 16, 100, 300])
        host = rng.randrange(1, 1 << 20) * cs
        table += [0] * n if rng.random() < 0.5 else [flags | host + i * cs for i in range(n)]
    arr = array("Q", table[:512])
    for _ in range(50):
        idx = rng.randrange(512)
        last = rng.randrange(idx, 512)
        entry = arr[idx]
        zero_run = entry == 0
        kind = ClusterKind.UNALLOCATED if zero_run else ClusterKind.NORMAL
        got = _continuing(arr, idx, last, kind, entry, cs)
        assert got == naive_continuing(list(arr), idx, last, zero_run, entry)
