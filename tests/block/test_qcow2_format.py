"""The pure qcow2 format module: tables checked in both directions."""

from __future__ import annotations

import random
from array import array
from dataclasses import replace

import pytest

from blockd.block.qcow2 import format as fmt
from blockd.block.qcow2.create import qcow2_image_bytes
from blockd.errors import ImageError

# (entry, kind) pairs of QEMU's qcow2_get_cluster_type
KINDS = [
    (0, fmt.ClusterKind.UNALLOCATED),
    (fmt.OFLAG_COPIED, fmt.ClusterKind.UNALLOCATED),
    (0x10000, fmt.ClusterKind.NORMAL),
    (0x10000 | fmt.OFLAG_COPIED, fmt.ClusterKind.NORMAL),
    (fmt.OFLAG_ZERO, fmt.ClusterKind.ZERO_PLAIN),
    (0x30000 | fmt.OFLAG_ZERO | fmt.OFLAG_COPIED, fmt.ClusterKind.ZERO_ALLOC),
    (fmt.OFLAG_COMPRESSED | 0x1234, fmt.ClusterKind.COMPRESSED),
]


@pytest.mark.parametrize(("entry", "kind"), KINDS)
def test_cluster_kind(entry: int, kind: fmt.ClusterKind) -> None:
    assert fmt.cluster_kind(entry) is kind


@pytest.mark.parametrize("order", range(7))
def test_refblock_round_trip(order: int) -> None:
    rnd = random.Random(order)
    cs = 512
    entries = fmt.refblock_entries(9, order)
    values = array(
        fmt.refblock_typecode(order), [rnd.randrange(1 << (1 << order)) for _ in range(entries)]
    )
    data = fmt.encode_refblock(values, order)
    assert len(data) == cs
    assert fmt.decode_refblock(data, order) == values


def test_refblock_bit_order() -> None:
    # sub-byte entries: the first entry sits in the least significant bits
    assert fmt.decode_refblock(b"\x01" + bytes(511), 0)[:8].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert fmt.decode_refblock(b"\x0d" + bytes(511), 1)[:4].tolist() == [1, 3, 0, 0]
    assert fmt.decode_refblock(b"\x00\x05" + bytes(510), 4)[0] == 5


def test_table_round_trip() -> None:
    data = bytes(range(64))
    table = fmt.decode_table(data)
    assert table[0] == int.from_bytes(data[:8], "big")
    assert fmt.encode_table(table) == data


@pytest.mark.parametrize("cluster_bits", [9, 16, 21])
def test_compressed_geometry(cluster_bits: int) -> None:
    geo = fmt.CompressedGeometry.for_cluster_bits(cluster_bits)
    offset, sectors = 0x123400 + 7, min(3, geo.csize_mask + 1)
    entry = fmt.OFLAG_COMPRESSED | ((sectors - 1) << geo.csize_shift) | offset
    host, size = geo.parse(entry)
    assert host == offset
    assert size == sectors * 512 - 7
    clusters = geo.host_clusters(entry, cluster_bits)
    start = offset & ~511
    assert clusters == range(
        start >> cluster_bits, ((start + sectors * 512 - 1) >> cluster_bits) + 1
    )


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_header_round_trip(compat: str) -> None:
    header, area, _ = qcow2_image_bytes(
        1 << 30, backing_file="base.img", backing_fmt="raw", compat=compat
    )
    parsed = fmt.parse_header(area)
    assert parsed == header
    exts = fmt.parse_extensions(area, parsed.header_length, parsed.backing_file_offset)
    assert exts[0] == fmt.Extension(fmt.EXT_BACKING_FORMAT, b"raw")
    name = area[parsed.backing_file_offset : parsed.backing_file_offset + parsed.backing_file_size]
    assert name == b"base.img"
    assert fmt.serialize_extensions(exts) == area[parsed.header_length : parsed.backing_file_offset]


def test_header_too_big_for_cluster() -> None:
    header, _, _ = qcow2_image_bytes(1 << 20, cluster_size=512)
    with pytest.raises(OSError) as info:
        fmt.build_header_area(header, [fmt.feature_table_extension()], b"x" * 200)
    assert info.value.errno == 28


BAD_HEADERS = [
    ({"cluster_bits": 8}, "Unsupported cluster size: 2^8"),
    ({"cluster_bits": 22}, "Unsupported cluster size: 2^22"),
    ({"refcount_order": 7}, "may not exceed 64 bits"),
    ({"incompatible_features": 1 << 20}, "Unknown incompatible feature: 100000"),
    ({"incompatible_features": fmt.INCOMPAT_CORRUPT}, "corrupt"),
    ({"incompatible_features": fmt.INCOMPAT_DATA_FILE}, "external data file"),
    ({"incompatible_features": fmt.INCOMPAT_EXTL2}, "extended L2"),
    ({"crypt_method": 2}, "encrypted"),
    ({"l1_size": 0}, "L1 table is too small"),
    ({"l1_size": 1 << 23}, "Active L1 table too large"),
    ({"l1_table_offset": 0x30001}, "Invalid L1 table offset"),
    ({"l1_table_offset": 0x10000}, "overlaps"),
    ({"l1_table_offset": 0x100000}, "beyond the end"),
    ({"refcount_table_offset": 0x100000}, "beyond the end"),
    ({"refcount_table_clusters": 1 << 20}, "Reference count table too large"),
    ({"refcount_table_clusters": 0}, "does not contain a reference count table"),
    ({"nb_snapshots": 1, "snapshots_offset": 3}, "Invalid snapshot table offset"),
    ({"compression_type": 5}, "Unknown compression type 5"),
    ({"compression_type": 1}, "Compression type incompatible feature bit must be set"),
]


@pytest.mark.parametrize(("change", "text"), BAD_HEADERS)
def test_validate_refuses(change: dict[str, int], text: str) -> None:
    header, _area, body = qcow2_image_bytes(1 << 30)
    bad = replace(header, **change)
    with pytest.raises(ImageError) as info:
        fmt.validate_header(bad, 65536 + len(body))
    assert text in info.value.desc
    fmt.validate_header(header, 65536 + len(body))


def test_parse_header_refuses() -> None:
    with pytest.raises(ImageError, match="not in qcow2 format"):
        fmt.parse_header(b"QFI\xfa" + bytes(200))
    with pytest.raises(ImageError, match="Unsupported qcow2 version 4"):
        fmt.parse_header(b"QFI\xfb\x00\x00\x00\x04" + bytes(200))


def test_format_specific() -> None:
    v3, _, _ = qcow2_image_bytes(1 << 20, refcount_bits=64)
    assert fmt.format_specific(v3)["data"] == {
        "compat": "1.1",
        "compression-type": "zlib",
        "lazy-refcounts": False,
        "refcount-bits": 64,
        "corrupt": False,
        "extended-l2": False,
    }
    v2, _, _ = qcow2_image_bytes(1 << 20, compat="0.10")
    assert fmt.format_specific(v2)["data"] == {
        "compat": "0.10",
        "compression-type": "zlib",
        "refcount-bits": 16,
    }
