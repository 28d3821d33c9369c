"""qcow2 on-disk format: header, header extensions, table entries, refcount blocks.

Pure functions and frozen records, no I/O. Everything here mirrors the layout described in
QEMU's ``docs/interop/qcow2.txt``; the driver (:mod:`blockd.block.qcow2.driver`) does the
reading and writing.

References:
    - qemu/qemu: docs/interop/qcow2.txt (the format)
    - qemu/qemu: block/qcow2.c ``qcow2_do_open`` (validation), ``qcow2_update_header``
    - qemu/qemu: block/qcow2.h ``qcow2_get_cluster_type``, ``qcow2_parse_compressed_l2_entry``

Layout summary (all integers big-endian):

* The header occupies the start of cluster 0: 72 bytes for version 2, ``header_length``
  (at least 104) for version 3. Header extensions follow (``type:u32, length:u32, data``
  padded to 8 bytes) until an end extension; the backing file name (not NUL-terminated)
  lives at ``backing_file_offset`` inside cluster 0.
* A guest offset splits into ``l1_index | l2_index | offset_in_cluster``; an L2 table is one
  cluster of 8-byte entries.
* Refcounts live in refcount blocks (one cluster of ``2**refcount_order``-bit entries),
  found through the refcount table (8-byte offsets).
"""

from __future__ import annotations

import enum
import itertools
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from blockd.errors import ImageError

MAGIC: Final = b"QFI\xfb"
V2_HEADER_LENGTH: Final = 72
V3_HEADER_LENGTH: Final = 104
#: what QEMU writes for version 3 (with the compression type byte and padding)
V3_HEADER_LENGTH_QEMU: Final = 112

MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
MAX_BACKING_NAME: Final = 1023
#: QEMU's QCOW_MAX_L1_SIZE and QCOW_MAX_REFTABLE_SIZE (bytes)
MAX_L1_BYTES: Final = 32 * 1024 * 1024
MAX_REFTABLE_BYTES: Final = 8 * 1024 * 1024
#: QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS: Final = 65536

# incompatible feature bits
INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTL2: Final = 1 << 4
INCOMPAT_KNOWN: Final = 0x1F
# compatible feature bits
COMPAT_LAZY_REFCOUNTS: Final = 1 << 0

INCOMPAT_NAMES: Final = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

# header extension types
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_TABLE: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875
EXT_CRYPTO: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441

#: the feature name table QEMU writes (type, bit, name), in its order
FEATURE_TABLE: Final = (
    (0, 0, b"dirty bit"),
    (0, 1, b"corrupt bit"),
    (0, 2, b"external data file"),
    (0, 3, b"compression type"),
    (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"),
    (2, 0, b"bitmaps"),
    (2, 1, b"raw external data"),
)

COMPRESSION_ZLIB: Final = 0
COMPRESSION_ZSTD: Final = 1
COMPRESSION_NAMES: Final = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entry bits
OFLAG_COPIED: Final = 1 << 63
OFLAG_COMPRESSED: Final = 1 << 62
OFLAG_ZERO: Final = 1 << 0
#: bits 9-55 of L1 and standard L2 entries
OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED_MASK: Final = 0x7F00_0000_0000_01FF
L2_RESERVED_MASK: Final = 0x3F00_0000_0000_01FE
REFTABLE_OFFSET_MASK: Final = 0xFFFF_FFFF_FFFF_FE00
SECTOR: Final = 512

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
_NATIVE_LITTLE: Final = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed part of a qcow2 header (both versions; v2 images use v3 defaults)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: bytes of the header past the fields we know (kept verbatim on rewrite)
    extra: bytes = b""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in one L2 table."""
        return self.cluster_bits - 3

    @property
    def refblock_bits(self) -> int:
        """log2 of the number of entries in one refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension, kept raw unless we interpret its type."""

    type: int
    data: bytes


def parse_header(buf: bytes) -> Header:
    """Parse the fixed header fields from the start of cluster 0.

    Raises:
        ImageError: bad magic, unknown version, a header that does not fit.
    """
    if len(buf) < _V2.size or buf[:4] != MAGIC:
        raise ImageError("Image is not in qcow2 format")
    fields = _V2.unpack_from(buf)
    version = fields[1]
    if version not in (2, 3):
        raise ImageError(f"Unsupported qcow2 version {version}")
    header = Header(*fields[1:])
    if version == 2:
        return replace(header, header_length=V2_HEADER_LENGTH)
    if len(buf) < V3_HEADER_LENGTH:
        raise ImageError("qcow2 header exceeds cluster size")
    incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(buf, _V2.size)
    if header_length < V3_HEADER_LENGTH:
        raise ImageError("qcow2 header too short")
    if header_length > len(buf):
        raise ImageError("qcow2 header exceeds cluster size")
    compression = buf[V3_HEADER_LENGTH] if header_length > V3_HEADER_LENGTH else 0
    return replace(
        header,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression,
        # trailing zeros are padding; serialize_header restores them
        extra=bytes(buf[V3_HEADER_LENGTH + 1 : header_length]).rstrip(b"\0"),
    )


def serialize_header(header: Header) -> bytes:
    """The fixed header bytes (``header_length`` of them)."""
    out = bytearray(
        _V2.pack(
            MAGIC,
            header.version,
            header.backing_file_offset,
            header.backing_file_size,
            header.cluster_bits,
            header.size,
            header.crypt_method,
            header.l1_size,
            header.l1_table_offset,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            header.nb_snapshots,
            header.snapshots_offset,
        )
    )
    if header.version == 2:
        return bytes(out)
    out += _V3.pack(
        header.incompatible_features,
        header.compatible_features,
        header.autoclear_features,
        header.refcount_order,
        header.header_length,
    )
    if header.header_length > V3_HEADER_LENGTH:
        out.append(header.compression_type)
        out += header.extra
        out += bytes(header.header_length - len(out))
    return bytes(out[: header.header_length])


def parse_extensions(buf: bytes, start: int, end: int) -> list[Extension]:
    """Header extensions in ``buf[start:end]`` up to the end marker (not included).

    Raises:
        ImageError: an extension runs past ``end``.
    """
    exts: list[Extension] = []
    offset = start
    while offset + _EXT.size <= end:
        kind, length = _EXT.unpack_from(buf, offset)
        offset += _EXT.size
        if length > end - offset:
            raise ImageError("Header extension too large")
        if kind == EXT_END:
            return exts
        exts.append(Extension(kind, bytes(buf[offset : offset + length])))
        offset += (length + 7) & ~7
    return exts


def serialize_extensions(exts: Sequence[Extension]) -> bytes:
    """Extensions followed by the end marker, each padded to 8 bytes."""
    out = bytearray()
    for ext in exts:
        out += _EXT.pack(ext.type, len(ext.data))
        out += ext.data
        out += bytes(-len(ext.data) % 8)
    out += _EXT.pack(EXT_END, 0)
    return bytes(out)


def feature_table_extension() -> Extension:
    """The feature name table QEMU writes into version 3 headers."""
    data = b"".join(struct.pack(">BB46s", kind, bit, name) for kind, bit, name in FEATURE_TABLE)
    return Extension(EXT_FEATURE_TABLE, data)


def build_header_area(
    header: Header, exts: Sequence[Extension], backing_name: bytes
) -> tuple[Header, bytes]:
    """Lay out header, extensions and backing name as QEMU does in cluster 0.

    Returns the header with ``backing_file_offset``/``size`` set and the bytes to write at
    offset 0. Raises ``OSError(ENOSPC)`` when they do not fit in one cluster.
    """
    ext_bytes = serialize_extensions(exts)
    name_off = header.header_length + len(ext_bytes)
    if backing_name:
        header = replace(header, backing_file_offset=name_off, backing_file_size=len(backing_name))
    else:
        header = replace(header, backing_file_offset=0, backing_file_size=0)
    area = serialize_header(header) + ext_bytes + backing_name
    if len(area) > header.cluster_size:
        raise OSError(28, "No space left on device")
    return header, area


def validate_header(header: Header, file_length: int) -> None:
    """Refuse headers blockd cannot handle safely, as ``qcow2_do_open`` checks them.

    Raises:
        ImageError: with a text saying what is wrong.
    """
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"Unsupported cluster size: 2^{header.cluster_bits}")
    cs = header.cluster_size
    if header.refcount_order > 6:
        raise ImageError("Reference count entry width too large; may not exceed 64 bits")
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise ImageError(f"Unsupported qcow2 feature(s): Unknown incompatible feature: {unknown:x}")
    if header.incompatible_features & INCOMPAT_CORRUPT:
        raise ImageError("qcow2: Image is corrupt; cannot be opened")
    if header.incompatible_features & INCOMPAT_DATA_FILE:
        raise ImageError("qcow2: images with an external data file are not supported")
    if header.incompatible_features & INCOMPAT_EXTL2:
        raise ImageError("qcow2: images with extended L2 entries are not supported")
    if header.crypt_method:
        raise ImageError("qcow2: encrypted images are not supported")
    if header.compression_type not in COMPRESSION_NAMES:
        raise ImageError(f"Unknown compression type {header.compression_type}")
    if header.compression_type != COMPRESSION_ZLIB and not (
        header.incompatible_features & INCOMPAT_COMPRESSION
    ):
        raise ImageError("Compression type incompatible feature bit must be set")
    if header.size > (1 << 63) - 1:
        raise ImageError("Image is too big")
    name_end = header.backing_file_offset + header.backing_file_size
    if header.backing_file_offset and (
        header.backing_file_size > MAX_BACKING_NAME or name_end > cs
    ):
        raise ImageError("Backing file name too long")
    # the active L1 table
    needed_l1 = l1_entries_for(header.size, header.cluster_bits)
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise ImageError("Active L1 table too large")
    if header.l1_size < needed_l1:
        raise ImageError("L1 table is too small")
    if header.l1_size and header.l1_table_offset % cs:
        raise ImageError("Invalid L1 table offset")
    # refcount table
    if header.refcount_table_clusters == 0:
        raise ImageError("Image does not contain a reference count table")
    if header.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise ImageError("Reference count table too large")
    if header.refcount_table_offset % cs or header.refcount_table_offset == 0:
        raise ImageError("Invalid reference count table offset")
    if header.nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError("Too many snapshots")
    if header.nb_snapshots and (header.snapshots_offset % cs or header.snapshots_offset == 0):
        raise ImageError("Invalid snapshot table offset")
    if header.nb_snapshots and header.snapshots_offset >= max(file_length, cs):
        raise ImageError("qcow2: snapshot table is beyond the end of the image file")
    regions = [("header", 0, cs)]
    if header.l1_size:
        regions.append(("L1 table", header.l1_table_offset, header.l1_size * 8))
    regions.append(
        ("refcount table", header.refcount_table_offset, header.refcount_table_clusters * cs)
    )
    for name, start, length in regions:
        if start + length > max(file_length, cs) or start + length > 1 << 56:
            raise ImageError(f"qcow2: {name} is beyond the end of the image file")
    ordered = sorted((start, start + length, name) for name, start, length in regions)
    for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(ordered):
        if s2 < e1:
            raise ImageError(f"qcow2: {n1} overlaps {n2}")


def check_tables(
    header: Header, l1: Sequence[int], reftable: Iterable[int], file_length: int
) -> set[int]:
    """Check the L2 table and refcount block offsets of the active tables.

    Returns:
        The host cluster indices holding active metadata (header, L1, L2 tables,
        refcount table and blocks), for the overlap check before in-place writes.

    Raises:
        ImageError: an offset is unaligned, past the end of the file, or inside the
            header, the L1 table or the refcount table (QEMU's overlap checks).
    """
    cs = header.cluster_size
    reserved = {0}
    if header.l1_size:
        first = header.l1_table_offset // cs
        reserved.update(range(first, first + -(-header.l1_size * 8 // cs)))
    first = header.refcount_table_offset // cs
    reserved.update(range(first, first + header.refcount_table_clusters))
    limit = -(-file_length // cs)
    metadata = set(reserved)
    for what, offsets in (
        ("L2 table", [e & OFFSET_MASK for e in l1]),
        ("refcount block", reftable),
    ):
        for i, off in enumerate(offsets):
            if not off:
                continue
            if off % cs:
                raise ImageError(f"qcow2: {what} offset {off:#x} unaligned (index {i:#x})")
            if off // cs >= limit:
                raise ImageError(f"qcow2: {what} at {off:#x} is beyond the end of the file")
            if off // cs in reserved:
                raise ImageError(f"qcow2: {what} at {off:#x} overlaps other metadata")
            metadata.add(off // cs)
    return metadata


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """The number of L1 entries needed to map ``size`` guest bytes."""
    per_l2 = 1 << (cluster_bits + cluster_bits - 3)
    return -(-size // per_l2)


# -- table entries ----------------------------------------------------------------------


class ClusterKind(enum.Enum):
    """What an L2 entry says about one guest cluster (``QCow2ClusterType``)."""

    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


def c_hex(value: int) -> str:
    """``value`` as C's ``%#x`` prints it in QEMU's messages: ``0`` for zero, else
    ``0x...``."""
    return f"{value:#x}" if value else "0"


def unaligned_cluster(host: int, l2_offset: int, l2_index: int) -> str:
    """QEMU's corruption message for a data cluster at an unaligned host offset
    (``qcow2_get_host_offset``); ``l2_index``: the entry's index in its whole L2 table."""
    return (
        f"Cluster allocation offset {c_hex(host)} unaligned "
        f"(L2 offset: {c_hex(l2_offset)}, L2 index: {c_hex(l2_index)})"
    )


def unaligned_l2(l2_offset: int, l1_index: int) -> str:
    """QEMU's corruption message for an L2 table at an unaligned offset (``l2_load``)."""
    return f"L2 table offset {c_hex(l2_offset)} unaligned (L1 index: {c_hex(l1_index)})"


def cluster_kind(entry: int) -> ClusterKind:
    """Classify an L2 entry (reference: ``qcow2_get_cluster_type``)."""
    if entry & OFLAG_COMPRESSED:
        return ClusterKind.COMPRESSED
    if entry & OFLAG_ZERO:
        return ClusterKind.ZERO_ALLOC if entry & OFFSET_MASK else ClusterKind.ZERO_PLAIN
    if entry & OFFSET_MASK:
        return ClusterKind.NORMAL
    return ClusterKind.UNALLOCATED


@dataclass(frozen=True, slots=True)
class CompressedGeometry:
    """Bit layout of compressed L2 entries for one cluster size."""

    csize_shift: int
    csize_mask: int
    offset_mask: int

    @classmethod
    def for_cluster_bits(cls, cluster_bits: int) -> CompressedGeometry:
        shift = 62 - (cluster_bits - 8)
        return cls(shift, (1 << (cluster_bits - 8)) - 1, (1 << shift) - 1)

    def parse(self, entry: int) -> tuple[int, int]:
        """``(host_offset, bytes_to_read)`` of a compressed entry
        (reference: ``qcow2_parse_compressed_l2_entry``)."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return offset, sectors * SECTOR - (offset & (SECTOR - 1))

    def host_clusters(self, entry: int, cluster_bits: int) -> range:
        """Host cluster indices whose refcount this compressed entry holds."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        start = offset & ~(SECTOR - 1)
        end = start + sectors * SECTOR
        return range(start >> cluster_bits, ((end - 1) >> cluster_bits) + 1)


def decode_table(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian 64-bit entries → native ``array('Q')``."""
    table = array("Q")
    table.frombytes(data)
    if _NATIVE_LITTLE:
        table.byteswap()
    return table


def encode_table(table: array[int]) -> bytes:
    """Native ``array('Q')`` → big-endian bytes."""
    if not _NATIVE_LITTLE:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


# -- refcount blocks --------------------------------------------------------------------

_REF_TYPECODES: Final = {3: "B", 4: "H", 5: "I", 6: "Q"}


def refblock_typecode(order: int) -> str:
    """The ``array`` type code that holds one decoded refcount entry."""
    return _REF_TYPECODES.get(order, "B")


def decode_refblock(data: bytes | bytearray | memoryview, order: int) -> array[int]:
    """A refcount block's entries (``2**order`` bits each) as a native array.

    Sub-byte widths store the first entry in the least significant bits of a byte
    (reference: ``get_refcount_ro0``); they decode to one byte per entry.
    """
    code = _REF_TYPECODES.get(order)
    if code is not None:
        arr = array(code)
        arr.frombytes(data)
        if _NATIVE_LITTLE and arr.itemsize > 1:
            arr.byteswap()
        return arr
    width = 1 << order
    per_byte = 8 // width
    mask = (1 << width) - 1
    raw = bytes(data)
    out = array("B", bytes(len(raw) * per_byte))
    for k in range(per_byte):
        shift = k * width
        out[k::per_byte] = array("B", bytes((b >> shift) & mask for b in raw))
    return out


def encode_refblock(values: array[int], order: int) -> bytes:
    """Inverse of :func:`decode_refblock`."""
    code = _REF_TYPECODES.get(order)
    if code is not None:
        arr = array(code, values)
        if _NATIVE_LITTLE and arr.itemsize > 1:
            arr.byteswap()
        return arr.tobytes()
    width = 1 << order
    per_byte = 8 // width
    n = len(values) // per_byte
    acc = [0] * n
    for k in range(per_byte):
        shift = k * width
        part = values[k::per_byte]
        acc = [a | (v << shift) for a, v in zip(acc, part, strict=True)]
    return bytes(acc)


def refblock_entries(cluster_bits: int, refcount_order: int) -> int:
    """Entries in one refcount block."""
    return 1 << (cluster_bits + 3 - refcount_order)


def format_specific(header: Header) -> dict[str, object]:
    """``ImageInfoSpecificQCow2`` as ``qemu-img info`` reports it."""
    data: dict[str, object]
    if header.version == 2:
        data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
        data["refcount-bits"] = header.refcount_bits
        return {"type": "qcow2", "data": data}
    data = {
        "compat": "1.1",
        "compression-type": COMPRESSION_NAMES.get(header.compression_type, "zlib"),
        "lazy-refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
        "refcount-bits": header.refcount_bits,
        "corrupt": bool(header.incompatible_features & INCOMPAT_CORRUPT),
        "extended-l2": bool(header.incompatible_features & INCOMPAT_EXTL2),
    }
    return {"type": "qcow2", "data": data}
