"""The refcount cache holds slices of refcount blocks: same image bytes as whole blocks.

Each scenario runs twice on identical images, once with slices smaller than a refcount
block (patched :data:`~blockd.block.qcow2.refcount.SLICE_BYTES`, so a few MiB of writes
cross many slices and blocks) and once with slices as large as a block (the cache of
whole blocks it replaced), both with a two-slice cache so every allocation evicts. The
two image files must be byte-identical, ``qemu-img check`` clean and the guest data equal
to a raw reference; with a snapshot, deleting it afterwards must stay clean too (every
release exact).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kit.chains import close, open_qcow2, read_all
from kit.qemu import assert_clean, io_script, qemu_img, to_raw

from blockd.block.qcow2 import refcount as qcow2_refcount
from blockd.block.qcow2.refcount import Refcounts, RefcountTable

WIDTHS = [1, 2, 4, 8, 16, 32, 64]
#: a slice size no cluster reaches: each slice is a whole refcount block
WHOLE_BLOCKS = 1 << 22

Writes = list[tuple[int, bytes] | None]  # None: a flush


def writes_for(seed: int, start: int, length: int, cow_span: int) -> Writes:
    """Sequential 192 KiB writes over ``[start, start+length)`` with a flush halfway, then
    small unaligned writes over ``[0, cow_span)`` (snapshotted clusters: copy-on-write)."""
    rnd = random.Random(seed)
    out: Writes = []
    for off in range(start, start + length, 192 * 1024):
        out.append((off, rnd.randbytes(min(192 * 1024, start + length - off))))
        if off - start < length // 2 <= off - start + 192 * 1024:
            out.append(None)
    for _ in range(30):
        off = rnd.randrange(cow_span - 1)
        out.append((off, rnd.randbytes(min(rnd.randrange(1, 20_000), cow_span - off))))
    return out


async def run_variant(
    base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    *,
    slice_bytes: int,
    cluster_size: int,
    writes: Writes,
    snapshot: bool,
) -> bytes:
    """Apply ``writes`` through blockd to a copy of ``base``, judge it; the file's bytes."""
    path = tmp_path / f"{name}.qcow2"
    shutil.copyfile(base, path)
    ref = bytearray(to_raw(path, tmp_path / f"{name}-before.raw"))
    monkeypatch.setattr(qcow2_refcount, "SLICE_BYTES", slice_bytes)
    two_slices = 2 * min(slice_bytes, cluster_size)
    options: dict[str, Any] = {"refcount-cache-size": two_slices, "l2-cache-size": 1024}
    node = await open_qcow2(path, **options)
    try:
        assert node.driver.refcounts._cache_limit == 2  # type: ignore[attr-defined]
        for write in writes:
            if write is None:
                await node.flush()
                continue
            off, data = write
            await node.write(off, data)
            ref[off : off + len(data)] = data
        assert await read_all(node) == ref
    finally:
        await close(node)
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(ref)
    assert_clean(path)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw)
    image = path.read_bytes()
    if snapshot:
        qemu_img("snapshot", "-d", "s1", path)
        assert_clean(path)
        qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw)
    return image


async def compare_variants(
    make_image: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    slice_bytes: int,
    *,
    cluster_size: int,
    refcount_bits: int,
    size: int,
    writes: Writes,
    snapshot: bool,
    preallocation: bool = False,
) -> None:
    """One image (with a snapshot of 256 KiB of data if asked), written once in slices of
    ``slice_bytes`` and once in whole blocks: identical results."""
    base = make_image(
        "base.qcow2", size, "qcow2", None, None,
        f"cluster_size={cluster_size}", f"refcount_bits={refcount_bits}",
        f"preallocation={'metadata' if preallocation else 'off'}",
    )  # fmt: skip
    if snapshot:
        io_script(base, "write -P 0x11 0 256k")
        qemu_img("snapshot", "-c", "s1", base)
    case: dict[str, Any] = {"cluster_size": cluster_size, "writes": writes, "snapshot": snapshot}
    sliced = await run_variant(
        base, tmp_path, monkeypatch, "sliced", slice_bytes=slice_bytes, **case
    )
    whole = await run_variant(
        base, tmp_path, monkeypatch, "whole", slice_bytes=WHOLE_BLOCKS, **case
    )
    assert sliced == whole


@pytest.mark.parametrize("refcount_bits", WIDTHS)
async def test_every_width_crossing_slices_and_blocks(
    make_image: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refcount_bits: int,
) -> None:
    """512-byte clusters, 32 entries a slice: 3 MiB of writes cross hundreds of slices
    and (1 MiB per block at 4-bit refcounts, 32 KiB at 64-bit) many blocks; 64-bit
    refcounts also grow the table. Width 1 cannot count a snapshot's second reference."""
    await compare_variants(
        make_image,
        tmp_path,
        monkeypatch,
        4 * refcount_bits,
        cluster_size=512,
        refcount_bits=refcount_bits,
        size=4 << 20,
        writes=writes_for(refcount_bits, 512 * 1024, 3 << 20, 256 * 1024),
        snapshot=refcount_bits > 1,
    )


@pytest.mark.parametrize(("refcount_bits", "size"), [(1, 8 << 20), (4, 72 << 20), (16, 20 << 20)])
async def test_narrow_widths_default_slices(
    make_image: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refcount_bits: int,
    size: int,
) -> None:
    """The default 4 KiB slices in 8 KiB clusters: a block is two slices of 32768, 8192
    or 2048 entries (256, 64, 16 MiB of clusters). With metadata preallocation the file
    already spans the first slice (4 and 16 bits): new clusters land in the second, the
    copy-on-write releases in the first."""
    await compare_variants(
        make_image,
        tmp_path,
        monkeypatch,
        qcow2_refcount.SLICE_BYTES,
        cluster_size=8192,
        refcount_bits=refcount_bits,
        size=size,
        writes=writes_for(refcount_bits, 512 * 1024, 3 << 20, 256 * 1024),
        snapshot=refcount_bits > 1,
        preallocation=refcount_bits > 1,
    )


async def test_default_slices_cross_slice_and_block(
    make_image: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default 4 KiB slices, 64-bit refcounts in 8 KiB clusters: 512 clusters
    (4 MiB) a slice, two slices a block; 11 MiB of writes cross both boundaries."""
    await compare_variants(
        make_image,
        tmp_path,
        monkeypatch,
        qcow2_refcount.SLICE_BYTES,
        cluster_size=8192,
        refcount_bits=64,
        size=16 << 20,
        writes=writes_for(7, 1 << 20, 11 << 20, 256 * 1024),
        snapshot=True,
    )


@pytest.mark.parametrize("refcount_bits", [16, 64])
async def test_table_growth_with_slices(
    make_image: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refcount_bits: int,
) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB at 16 bits (2 MiB at
    64), so 10 MiB of writes move the table (three times at 64 bits) while blocks are
    cached in 64-byte slices."""
    await compare_variants(
        make_image,
        tmp_path,
        monkeypatch,
        64,
        cluster_size=512,
        refcount_bits=refcount_bits,
        size=12 << 20,
        writes=writes_for(3, 512 * 1024, 10 << 20, 256 * 1024),
        snapshot=True,
    )


@pytest.mark.parametrize(
    ("cluster_size", "refcount_bits", "cache_bytes", "slice_bytes", "limit"),
    [
        # default: 4 Mi decoded entries, as 128 whole blocks of 16-bit refcounts held
        (65536, 16, None, 4096, (1 << 22) // 2048),
        (65536, 16, 1 << 20, 4096, 256),  # refcount-cache-size counts slices' bytes
        (65536, 16, 1024, 4096, 2),  # at least two slices
        (65536, 1, None, 4096, (1 << 22) // 32768),
        (65536, 64, None, 4096, (1 << 22) // 512),
        (512, 16, None, 512, (1 << 22) // 256),  # small clusters: a slice is the block
        (512, 16, 1024, 512, 2),
        (2 << 20, 8, 6 << 20, 4096, 1536),
    ],
)
def test_cache_limit_in_slices(
    cluster_size: int, refcount_bits: int, cache_bytes: int | None, slice_bytes: int, limit: int
) -> None:
    order = refcount_bits.bit_length() - 1
    refcounts = Refcounts(
        None,  # type: ignore[arg-type]  # the constructor does no I/O
        cluster_size.bit_length() - 1,
        order,
        cluster_size,
        1,
        RefcountTable(cluster_size // 8, {}),
        3 * cluster_size,
        cache_bytes,
    )
    assert refcounts.slice_bytes == slice_bytes
    assert 1 << refcounts.slice_bits == slice_bytes * 8 // refcount_bits
    assert refcounts._cache_limit == limit


async def test_only_touched_slices_are_cached(
    make_image: Callable[..., Path], tmp_path: Path
) -> None:
    """64 KiB clusters, 16-bit refcounts: 8 MiB of writes touch one 4 KiB slice of the
    32768-entry block; the cache holds that slice only, not the 64 KiB block."""
    path = make_image("big.qcow2", 64 << 20)
    node = await open_qcow2(path)
    try:
        await node.write(0, b"\x5a" * (8 << 20))
        await node.flush()
        cached = node.driver.refcounts._slices  # type: ignore[attr-defined]
        assert [len(s) * s.itemsize for s in cached.values()] == [4096]
    finally:
        await close(node)
    assert_clean(path)
    io_script(path, "read -P 0x5a 0 8M", "read -P 0 8M 56M")
