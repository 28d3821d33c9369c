"""Mutated qcow2 images (seeded): blockdev-add opens the image or refuses it with a
clear error, never crashes, never writes to an image it refused; what it reads from an
image it opened is what QEMU reads, or an I/O error. A stream that meets a corrupt L2
table in the middle of the chain stops with an error and leaves the chain untouched."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
from pathlib import Path

import pytest
from kit.chains import qcow2
from kit.daemons import Harness
from kit.qemu import KIB, check, create, qemu_img, qemu_io, write

from blockd.block.graph import Graph
from blockd.errors import QMPError

SIZE = 1024 * 1024
CLUSTER = 4096
SEEDS = 300

# (offset, struct format) of header fields (docs/interop/qcow2.txt)
FIELDS = {
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"), "header_length": (100, ">I"),
}  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def field(data: bytes | bytearray, name: str) -> int:
    offset, fmt = FIELDS[name]
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


def interesting(rnd: random.Random, fmt: str, old: int) -> int:
    bits = 64 if fmt == ">Q" else 32
    top = (1 << bits) - 1
    return rnd.choice([0, 1, top, top >> 1, old + 1, old - 1 if old else 1, old ^ (1 << 63 if
                       bits == 64 else 1 << 31), old * 2, rnd.getrandbits(bits),
                       old + CLUSTER, old + 512, 1 << 40])  # fmt: skip


def _entry_table(data: bytearray, rnd: random.Random, kind: str) -> tuple[int, int] | None:
    """(file offset, entry count) of a table to damage."""
    if kind == "l1":
        return field(data, "l1_table_offset"), field(data, "l1_size")
    if kind == "refcount":
        return field(data, "refcount_table_offset"), field(data, "refcount_table_clusters") * (
            CLUSTER // 8
        )
    l1 = field(data, "l1_table_offset")
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    return (l2, CLUSTER // 8) if l2 else None


def mutate(path: Path, seed: int) -> str:
    """Damage ``path`` in place; returns a description for failure messages."""
    rnd = random.Random(seed)
    data = bytearray(path.read_bytes())
    what = rnd.choice(["header", "header", "l1", "l2", "l2", "refcount", "extension",
                       "backing-name"])  # fmt: skip
    if what == "header":
        name = rnd.choice(sorted(FIELDS))
        offset, fmt = FIELDS[name]
        new = interesting(rnd, fmt, field(data, name)) % (1 << (64 if fmt == ">Q" else 32))
        struct.pack_into(fmt, data, offset, new)
        desc = f"{name}={new:#x}"
    elif what in ("l1", "l2", "refcount"):
        table = _entry_table(data, rnd, what)
        if table is None:
            return mutate(path, seed + 10_000)
        start, count = table
        index = rnd.randrange(min(count, 16))
        old = struct.unpack_from(">Q", data, start + 8 * index)[0]
        new = rnd.choice([
            old | 1 << 62,  # compressed flag
            old + 1,  # unaligned / reserved bits
            old | 1 << 55,  # far beyond the end
            (old & ~(CLUSTER - 1)) + CLUSTER * 2,  # another cluster (overlap)
            0, 8, 1 << 63 | 0,  # copied flag on an empty entry
            field(data, "l1_table_offset") | 1 << 63,  # points at the L1 table
            rnd.getrandbits(64),
        ]) % (1 << 64)  # fmt: skip
        struct.pack_into(">Q", data, start + 8 * index, new)
        desc = f"{what}[{index}] {old:#x} -> {new:#x}"
    elif what == "extension":
        pos = field(data, "header_length")
        new = rnd.choice([0, 1, 7, 9, 0xFFFF, 0xFFFFFFFF, CLUSTER, rnd.getrandbits(32)])
        struct.pack_into(">I", data, pos + 4, new)
        desc = f"extension length {new:#x}"
    else:
        new = rnd.choice([0, 1, 1023, 1024, 4000, 0xFFFF, 0xFFFFFFFF])
        struct.pack_into(">I", data, 16, new)
        desc = f"backing name length {new}"
    path.write_bytes(data)
    return desc


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.raw <- top.qcow2 (4 KiB clusters, data in several clusters and L2 tables)."""
    directory = tmp_path_factory.mktemp("pristine")
    base = directory / "base.raw"
    base.write_bytes(bytes(range(256)) * (SIZE // 256))
    top = create(directory / "top.qcow2", SIZE, base, "raw", "qcow2", f"cluster_size={CLUSTER}")
    write(top, 0, 64 * KIB, 0x33)
    write(top, 600 * KIB, 12 * KIB, 0x44)
    return directory


def qemu_view(path: Path) -> bytes | None:
    """The guest view as QEMU reads it, or None when QEMU cannot read it."""
    out = path.with_suffix(".qemu.raw")
    result = qemu_img("convert", "-U", "-O", "raw", path, out, check=False)
    return out.read_bytes() if result.returncode == 0 else None


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_mutated_image_is_opened_or_refused(
    pristine: Path, tmp_path: Path, seed: int
) -> None:
    for name in ("base.raw", "top.qcow2"):
        shutil.copy(pristine / name, tmp_path / name)
    top = tmp_path / "top.qcow2"
    desc = mutate(top, seed)
    before = sha(top)
    graph = Graph()
    options = qcow2(top, "top")  # fmt: skip
    try:
        node = await graph.open_node(options, top_level=True)
    except QMPError as exc:
        assert exc.desc and "Internal error" not in exc.desc, desc
        assert sha(top) == before, f"{desc}: refused ({exc.desc}) but written"
        assert graph.nodes == {}
        return
    # Opened: every read gives QEMU's bytes or an error, never a crash.
    expected = qemu_view(top) if node.length() == SIZE else None
    try:
        for offset in range(0, min(node.length(), SIZE), 64 * KIB):
            length = min(64 * KIB, node.length() - offset)
            try:
                got = await node.pread(offset, length)
            except (QMPError, OSError):
                continue
            if expected is not None:
                assert got == expected[offset : offset + length], f"{desc}: differs at {offset}"
    finally:
        await graph.close_all()


async def test_stream_stops_at_a_corrupt_l2_table_mid_chain(
    harness: Harness, tmp_path: Path
) -> None:
    base = create(tmp_path / "base.qcow2", SIZE, None, "qcow2", "qcow2", f"cluster_size={CLUSTER}")
    write(base, 0, SIZE, 0x11)
    mid = create(tmp_path / "mid.qcow2", None, base, "qcow2", "qcow2", f"cluster_size={CLUSTER}")
    write(mid, 256 * KIB, 256 * KIB, 0x22)
    top = create(tmp_path / "top.qcow2", None, mid, "qcow2", "qcow2", f"cluster_size={CLUSTER}")
    write(top, 0, 16 * KIB, 0x33)
    # mid's L2 table: an entry in the middle gets an unaligned host offset (corrupt)
    data = bytearray(mid.read_bytes())
    l2 = struct.unpack_from(">Q", data, field(data, "l1_table_offset"))[0] & 0x00FFFFFFFFFFFE00
    index = 400 * KIB // CLUSTER
    entry = struct.unpack_from(">Q", data, l2 + 8 * index)[0]
    assert entry != 0
    struct.pack_into(">Q", data, l2 + 8 * index, entry + 512)
    mid.write_bytes(data)
    hashes = {p: sha(p) for p in (base, mid)}
    top_header = top.read_bytes()[:CLUSTER]
    h = harness
    await h.add(qcow2(top, "top"))  # fmt: skip
    await h.cmd("block-stream", device="top", job_id="s")
    done = await h.wait_done("s")
    assert done["event"] == "BLOCK_JOB_COMPLETED" and done.get("error"), done
    assert done["offset"] < done["len"]
    await h.cmd("blockdev-del", node_name="top")
    assert {p: sha(p) for p in (base, mid)} == hashes  # rest of the chain untouched
    check(top)
    assert top.read_bytes()[:CLUSTER] == top_header  # still backed by mid
    # what top copied before the error is mid's data, not garbage
    view = qemu_io("-f", "qcow2", "-c", "read -P 0x22 256k 16k", top, check=False)
    assert "read 16384/16384" in view.stdout, view.stdout + view.stderr


async def test_nul_byte_in_a_header_backing_name_is_refused(tmp_path: Path) -> None:
    """Regression: a NUL inside the header's name crashed the file driver (ValueError)."""
    (tmp_path / "base.raw").write_bytes(bytes(SIZE))
    top = create(tmp_path / "top.qcow2", SIZE, tmp_path / "base.raw", "raw")
    data = bytearray(top.read_bytes())
    offset = field(data, "backing_file_offset")
    data[offset + 2] = 0
    top.write_bytes(data)
    before = sha(top)
    graph = Graph()
    with pytest.raises(QMPError) as info:
        await graph.open_node(qcow2(top, "top"),
                              top_level=True)  # fmt: skip
    assert "Invalid argument" in info.value.desc
    assert sha(top) == before
