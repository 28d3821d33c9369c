"""Image creation without ``qemu-img``: empty qcow2 and raw images.

Synchronous library functions (creation happens before any node exists). The qcow2
layout is the one ``qemu-img create`` produces, so ``qemu-img info`` reports the same and
``qemu-img check`` finds the image clean:

    cluster 0         header, header extensions, backing file name
    cluster 1..T      refcount table (T = 1 unless the image needs more refcount blocks)
    cluster T+1       the first refcount block
    cluster T+2...    the L1 table (absent for a zero-sized image); the file ends with it
    after the L1      further refcount blocks, only when one block cannot cover the L1

References:
    - qemu/qemu: block/qcow2.c ``qcow2_co_create`` (layout, option checks and texts).
"""

from __future__ import annotations

import os
from array import array

from blockd.block.qcow2 import format as fmt

SECTOR = 512


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def create_raw(path: str | os.PathLike[str], size: int) -> None:
    """Create (or truncate) a raw image of ``size`` bytes, rounded up to 512 as QEMU does.

    Raises:
        ValueError: a negative size. OSError: from the host.
    """
    if size < 0:
        raise ValueError("Image size must be a non-negative number")
    with open(path, "wb") as image:
        image.truncate(_round_up(size, SECTOR))


def create_qcow2(
    path: str | os.PathLike[str],
    size: int,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int = 65536,
    compat: str = "1.1",
    refcount_bits: int = 16,
) -> None:
    """Create an empty qcow2 image at ``path`` (overwriting it), as ``qemu-img create``.

    Args:
        path: the image file.
        size: virtual size in bytes, rounded up to 512.
        backing_file: the backing file name recorded in the header (not opened).
        backing_fmt: its format, recorded in the backing-format header extension.
        cluster_size: a power of two from 512 to 2 MiB.
        compat: ``"1.1"`` (version 3) or ``"0.10"`` (version 2).
        refcount_bits: a power of two from 1 to 64; version 2 allows only 16.

    Raises:
        ValueError: with QEMU's text for invalid options. OSError: from the host.
    """
    header, area, body = qcow2_image_bytes(
        size,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        cluster_size=cluster_size,
        compat=compat,
        refcount_bits=refcount_bits,
    )
    del header
    with open(path, "wb") as image:
        image.write(area)
        image.write(bytes(cluster_size - len(area)))
        image.write(body)


def qcow2_image_bytes(
    size: int,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int = 65536,
    compat: str = "1.1",
    refcount_bits: int = 16,
) -> tuple[fmt.Header, bytes, bytes]:
    """The header, the header-cluster bytes and everything after cluster 0 of a new image."""
    if size < 0:
        raise ValueError("Image size must be a non-negative number")
    size = _round_up(size, SECTOR)
    cs = cluster_size
    cluster_bits = cs.bit_length() - 1
    if cs != 1 << cluster_bits or not fmt.MIN_CLUSTER_BITS <= cluster_bits <= 21:
        raise ValueError("Cluster size must be a power of two between 512 and 2048k")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise ValueError(f"Invalid compatibility level: '{compat}'")
    order = refcount_bits.bit_length() - 1
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits != 1 << order:
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and refcount_bits != 16:
        raise ValueError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or "
            "above (use version=v3 or greater)"
        )
    name = (backing_file or "").encode("utf-8", "surrogateescape")
    if len(name) > fmt.MAX_BACKING_NAME:
        raise ValueError("Backing file name too long")
    if backing_fmt and not name:
        raise ValueError("Backing format cannot be used without backing file")

    l1_size = fmt.l1_entries_for(size, cluster_bits)
    l1_clusters = -(-l1_size * 8 // cs)
    per_block = fmt.refblock_entries(cluster_bits, order)
    # grow the refcount table until its blocks cover everything (a fixpoint)
    table_clusters = 1
    while True:
        fixed = 1 + table_clusters + 1 + l1_clusters  # header, table, block 0, L1
        blocks = 1
        while fixed + (blocks - 1) > blocks * per_block:
            blocks += 1
        if blocks <= table_clusters * cs // 8:
            break
        table_clusters += 1
    total = fixed + blocks - 1
    l1_offset = (2 + table_clusters) * cs if l1_size else 0

    header = fmt.Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=cs,
        refcount_table_clusters=table_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=fmt.V3_HEADER_LENGTH_QEMU if version == 3 else fmt.V2_HEADER_LENGTH,
    )
    exts: list[fmt.Extension] = []
    if backing_fmt:
        exts.append(fmt.Extension(fmt.EXT_BACKING_FORMAT, backing_fmt.encode()))
    if version == 3 and cs > 4096:
        exts.append(fmt.feature_table_extension())
    try:
        header, area = fmt.build_header_area(header, exts, name)
    except OSError as exc:
        raise ValueError("Backing file name too long for the header cluster") from exc

    # refcount table: block 0 after the table, the others after the L1 table
    table = array("Q", [0]) * (table_clusters * cs // 8)
    block_clusters = [1 + table_clusters] + [fixed + k for k in range(blocks - 1)]
    for i, cluster in enumerate(block_clusters):
        table[i] = cluster * cs
    refcounts = array(fmt.refblock_typecode(order), [0]) * (blocks * per_block)
    refcounts[:total] = array(fmt.refblock_typecode(order), [1]) * total
    body = bytearray(fmt.encode_table(table))
    body += fmt.encode_refblock(refcounts[:per_block], order)
    if l1_size:
        body += bytes(l1_clusters * cs) if blocks > 1 else bytes(l1_size * 8)
    for k in range(1, blocks):
        body += fmt.encode_refblock(refcounts[k * per_block : (k + 1) * per_block], order)
    return header, area, bytes(body)
