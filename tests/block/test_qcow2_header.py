"""change_backing_file read back by qemu-img, and images refused at open (file untouched)."""

from __future__ import annotations

import errno
import hashlib
import struct
from pathlib import Path

import pytest
from kit.chains import close, open_qcow2
from kit.qemu import assert_clean, image_info, io_script, qemu_img

from blockd.block.graph import Graph
from blockd.block.qcow2 import format as fmt
from blockd.block.qcow2.create import create_qcow2
from blockd.errors import ImageError, QMPError


async def change(path: Path, name: str | None, backing_fmt: str | None) -> None:
    node = await open_qcow2(path, backing=None)
    try:
        await node.driver.change_backing_file(name, backing_fmt)
    finally:
        await close(node)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_set_change_clear(tmp_path: Path, compat: str) -> None:
    create_qcow2(tmp_path / "base.qcow2", 1 << 20)
    (tmp_path / "other.raw").write_bytes(bytes(1 << 20))
    path = tmp_path / "top.qcow2"
    create_qcow2(path, 1 << 20, compat=compat)

    await change(path, "base.qcow2", "qcow2")
    got = image_info(path)
    assert got["backing-filename"] == "base.qcow2"
    assert got["backing-filename-format"] == "qcow2"
    assert got["full-backing-filename"] == str(tmp_path / "base.qcow2")
    assert_clean(path)

    await change(path, "a/much/longer/name/../../../../other.raw", "raw")
    got = image_info(path)
    assert got["backing-filename"] == "a/much/longer/name/../../../../other.raw"
    assert got["backing-filename-format"] == "raw"

    await change(path, "base.qcow2", None)
    got = image_info(path)
    assert got["backing-filename"] == "base.qcow2"
    assert "backing-filename-format" not in got

    node = await open_qcow2(path, backing=None)
    try:
        assert node.driver.header_backing() == ("base.qcow2", None)
    finally:
        await close(node)

    await change(path, None, None)
    got = image_info(path)
    assert "backing-filename" not in got
    assert "backing-filename-format" not in got
    assert_clean(path)
    # the header matches what qemu-img writes for the same settings
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", ref, "1M")
    assert path.read_bytes()[:4096] == ref.read_bytes()[:4096]


async def test_change_after_qemu_rebase_matches(tmp_path: Path) -> None:
    create_qcow2(tmp_path / "base.qcow2", 1 << 20)
    ours = tmp_path / "ours.qcow2"
    theirs = tmp_path / "theirs.qcow2"
    create_qcow2(ours, 1 << 20)
    create_qcow2(theirs, 1 << 20)
    await change(ours, "base.qcow2", "qcow2")
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", theirs)
    assert ours.read_bytes() == theirs.read_bytes()


async def test_name_too_long(tmp_path: Path) -> None:
    path = tmp_path / "top.qcow2"
    create_qcow2(path, 1 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    before = path.read_bytes()
    node = await open_qcow2(path, backing=None)
    try:
        with pytest.raises(OSError) as exc:
            await node.driver.change_backing_file("x" * 1024, "raw")
        assert exc.value.errno == errno.EINVAL
        assert node.driver.header_backing() == ("base.qcow2", "qcow2")
    finally:
        await close(node)
    assert path.read_bytes() == before


async def test_name_does_not_fit_first_cluster(tmp_path: Path) -> None:
    path = tmp_path / "small.qcow2"
    create_qcow2(path, 1 << 20, cluster_size=512)
    before = path.read_bytes()
    node = await open_qcow2(path, backing=None)
    try:
        with pytest.raises(OSError) as exc:
            await node.driver.change_backing_file("y" * 400, "qcow2")
        assert exc.value.errno == errno.ENOSPC
        await node.driver.change_backing_file("y" * 300, "qcow2")
    finally:
        await close(node)
    assert image_info(path)["backing-filename"] == "y" * 300
    assert path.read_bytes()[512:] == before[512:]


async def test_unknown_extension_kept(tmp_path: Path) -> None:
    path = tmp_path / "ext.qcow2"
    create_qcow2(path, 1 << 20)
    create_qcow2(tmp_path / "base.qcow2", 1 << 20)
    data = bytearray(path.read_bytes())
    header = fmt.parse_header(bytes(data[:65536]))
    exts = fmt.parse_extensions(bytes(data[:65536]), header.header_length, 65536)
    exts.append(fmt.Extension(0x12345678, b"hello"))
    _, area = fmt.build_header_area(header, exts, b"")
    data[: len(area)] = area
    path.write_bytes(bytes(data))
    await change(path, "base.qcow2", "qcow2")
    raw = path.read_bytes()[:65536]
    header = fmt.parse_header(raw)
    got = fmt.parse_extensions(raw, header.header_length, header.backing_file_offset)
    assert got[0] == fmt.Extension(fmt.EXT_BACKING_FORMAT, b"qcow2")
    assert fmt.Extension(0x12345678, b"hello") in got
    assert_clean(path)


# -- refusals -------------------------------------------------------------------------

# (name, [(offset, bytes)...], expected text, read_only)
REFUSALS = [
    ("bad magic", [(0, b"QFI\x00")], "Image is not in qcow2 format", True),
    ("version 4", [(4, struct.pack(">I", 4))], "Unsupported qcow2 version 4", True),
    ("cluster bits 8", [(20, struct.pack(">I", 8))], "Unsupported cluster size: 2^8", True),
    ("cluster bits 22", [(20, struct.pack(">I", 22))], "Unsupported cluster size: 2^22", True),
    ("unknown incompat", [(72, struct.pack(">Q", 1 << 40))], "Unknown incompatible", True),
    ("corrupt", [(72, struct.pack(">Q", 2))], "corrupt", True),
    ("dirty read-write", [(72, struct.pack(">Q", 1))], "dirty bit", False),
    ("data file", [(72, struct.pack(">Q", 4))], "external data file", True),
    ("extended L2", [(72, struct.pack(">Q", 16))], "extended L2", True),
    ("encrypted", [(32, struct.pack(">I", 2))], "encrypted", True),
    ("L1 past EOF", [(40, struct.pack(">Q", 1 << 30))], "beyond the end", True),
    ("L1 overlaps reftable", [(40, struct.pack(">Q", 65536))], "overlaps", True),
    ("L1 too small", [(36, struct.pack(">I", 1))], "L1 table is too small", True),
    ("L1 absurd", [(36, struct.pack(">I", 1 << 30))], "Active L1 table too large", True),
    ("reftable past EOF", [(48, struct.pack(">Q", 1 << 30))], "beyond the end", True),
    (
        "reftable absurd",
        [(56, struct.pack(">I", 1 << 20))],
        "Reference count table too large",
        True,
    ),
    ("refcount order 7", [(96, struct.pack(">I", 7))], "may not exceed 64 bits", True),
    ("L2 past EOF", [(0x30000, struct.pack(">Q", (1 << 63) | (1 << 30)))], "beyond the end", True),
    ("L2 unaligned", [(0x30000, struct.pack(">Q", (1 << 63) | 0x10200))], "unaligned", True),
    ("L2 in reftable", [(0x30000, struct.pack(">Q", (1 << 63) | 0x10000))], "overlaps", False),
    ("refblock unaligned", [(0x10000, struct.pack(">Q", 0x20200))], "unaligned", True),
    ("refblock in L1", [(0x10000, struct.pack(">Q", 0x30000))], "overlaps", True),
]


@pytest.mark.parametrize(
    ("name", "patches", "text", "read_only"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
async def test_refused_untouched(
    tmp_path: Path, name: str, patches: list[tuple[int, bytes]], text: str, read_only: bool
) -> None:
    path = tmp_path / "bad.qcow2"
    create_qcow2(path, 1 << 30)
    data = bytearray(path.read_bytes())
    for offset, value in patches:
        data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).digest()
    with pytest.raises(QMPError) as exc:
        node = await open_qcow2(path, read_only=read_only)
        await close(node)
    assert text in exc.value.desc, exc.value.desc
    assert hashlib.sha256(path.read_bytes()).digest() == digest


@pytest.mark.parametrize("length", [0, 50, 104, 1000])
async def test_truncated_refused(tmp_path: Path, length: int) -> None:
    path = tmp_path / "short.qcow2"
    create_qcow2(path, 1 << 30)
    path.write_bytes(path.read_bytes()[:length])
    with pytest.raises(QMPError):
        node = await open_qcow2(path)
        await close(node)
    assert path.stat().st_size == length


async def test_dirty_read_only_opens(tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    create_qcow2(path, 1 << 20)
    data = bytearray(path.read_bytes())
    data[72:80] = struct.pack(">Q", 1)
    path.write_bytes(bytes(data))
    node = await open_qcow2(path, read_only=True)
    try:
        assert node.driver.image_info()["dirty-flag"] is True
    finally:
        await close(node)
    assert path.read_bytes() == bytes(data)


def written_cluster(path: Path) -> tuple[bytearray, fmt.Header, int]:
    """A 1 MiB image at ``path`` with its first cluster written: its bytes, its header and
    the offset of its first L2 table (whose first entry maps that cluster)."""
    create_qcow2(path, 1 << 20)
    io_script(path, "write -P 0x33 0 64k")
    data = bytearray(path.read_bytes())
    header = fmt.parse_header(bytes(data[:512]))
    l2 = struct.unpack(">Q", data[header.l1_table_offset : header.l1_table_offset + 8])[0]
    return data, header, l2 & fmt.OFFSET_MASK


async def test_in_place_write_into_metadata_refused(tmp_path: Path) -> None:
    """An L2 entry (COPIED) that points at the L1 table: the write is refused."""
    path = tmp_path / "evil.qcow2"
    data, header, l2 = written_cluster(path)
    data[l2 : l2 + 8] = struct.pack(">Q", fmt.OFLAG_COPIED | header.l1_table_offset)
    path.write_bytes(bytes(data))
    node = await open_qcow2(path)
    try:
        with pytest.raises(OSError) as info:
            await node.write(0, b"\xff" * 512)
    finally:
        await close(node)
    assert info.value.errno == errno.EIO  # as any I/O error, for the on-error policy
    assert isinstance(info.value.__cause__, ImageError)
    assert "overlaps image metadata" in info.value.__cause__.desc
    assert path.read_bytes() == bytes(data)


async def test_unaligned_data_cluster_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.qcow2"
    data, _header, l2 = written_cluster(path)
    entry = struct.unpack(">Q", data[l2 : l2 + 8])[0]
    data[l2 : l2 + 8] = struct.pack(">Q", entry + 512)
    path.write_bytes(bytes(data))
    graph = Graph()
    reports: list[tuple[str, str]] = []
    graph.corruption_sink = lambda name, message: reports.append((name, message))
    node = await open_qcow2(path, graph=graph)
    try:
        for request in (node.pread(0, 4096), node.write(0, b"\xff" * 512)):
            with pytest.raises(OSError) as info:
                await request
            assert info.value.errno == errno.EIO
            assert isinstance(info.value.__cause__, ImageError)
    finally:
        await close(node)
    # QEMU's text, reported once (qcow2_signal_corruption suppresses the others)
    host = (entry & fmt.OFFSET_MASK) + 512
    assert reports == [
        ("top", f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2:#x}, L2 index: 0)")
    ]
    assert path.read_bytes() == bytes(data)
