"""Internal snapshots listed in ImageInfo (``snapshots``), field by field as QEMU 10.0's
qemu-storage-daemon lists them for images with ``qemu-img snapshot -c`` snapshots, and
absurd snapshot tables refused at open."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from kit.chains import file_ref
from kit.compare import blockd_replies, compare_with_qsd
from kit.qemu import QSD_10, qemu_img, write

from blockd.block.qcow2.snapshots import ShortTable, parse_table
from blockd.errors import ImageError

needs_qsd = pytest.mark.skipif(QSD_10 is None, reason="QEMU 10.0 qemu-storage-daemon missing")


def snapshotted(tmp_path: Path, name: str, *options: str) -> Path:
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", *options, path, "4M")
    write(path, 0, 65536, 1)
    qemu_img("snapshot", "-c", "first", path)
    write(path, 32768, 65536, 2)
    qemu_img("snapshot", "-c", "second snapshot, with a longer name", path)
    qemu_img("snapshot", "-c", "ünïcode", path)
    return path


@needs_qsd
async def test_snapshots_as_qsd_reports_them(sock_dir: Path, tmp_path: Path) -> None:
    images = {
        "v3": snapshotted(tmp_path, "v3.qcow2"),
        "v2": snapshotted(tmp_path, "v2.qcow2", "-o", "compat=0.10,cluster_size=4096"),
        "none": tmp_path / "none.qcow2",
    }
    qemu_img("create", "-q", "-f", "qcow2", images["none"], "1M")
    commands: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"driver": "qcow2", "node-name": name, "file": file_ref(path)})
        for name, path in images.items()
    ]
    commands.append(("query-named-block-nodes", {"flat": True}))
    await compare_with_qsd(sock_dir, commands)
    [*_, reply] = await blockd_replies(commands)
    listed = {n["node-name"]: n["image"].get("snapshots") for n in reply["return"]}
    assert [s["name"] for s in listed["v3"]] == [
        "first",
        "second snapshot, with a longer name",
        "ünïcode",
    ]
    assert [s["id"] for s in listed["v2"]] == ["1", "2", "3"]
    assert listed["none"] is None


def entry(name: bytes, extra: bytes = b"", l1_offset: int = 65536) -> bytes:
    fixed = struct.pack(
        ">QIHHIIQII", l1_offset, 1, 1, len(name), 5, 6, 7_000_000_123, 9, len(extra)
    )
    raw = fixed + extra + b"1" + name
    return raw + bytes(-len(raw) % 8)


def test_parse_table_fields_and_limits() -> None:
    extra = struct.pack(">QQQ", 4096, 1 << 20, (1 << 64) - 1)
    data = entry(b"a", extra) + entry(b"bc")
    one, two = parse_table(data, 2, cluster_size=65536)
    assert one.info() == {
        "id": "1", "name": "a", "vm-state-size": 4096, "date-sec": 5, "date-nsec": 6,
        "vm-clock-sec": 7, "vm-clock-nsec": 123,
    }  # fmt: skip
    assert two.info()["vm-state-size"] == 9 and "icount" not in two.info()
    with pytest.raises(ShortTable):
        parse_table(data[:-8], 2, cluster_size=65536)
    with pytest.raises(ImageError, match="Too much extra metadata"):
        parse_table(entry(b"x", bytes(1032)), 1, cluster_size=65536)
    with pytest.raises(ImageError, match="L1 table offset"):
        parse_table(entry(b"x", l1_offset=512), 1, cluster_size=65536)


async def test_truncated_table_refused_at_open(tmp_path: Path) -> None:
    path = snapshotted(tmp_path, "cut.qcow2")
    header = path.read_bytes()[:72]
    nb = struct.unpack_from(">I", header, 60)[0]
    assert nb == 3
    # claim many more snapshots than the table holds: the table runs past the file end
    with path.open("r+b") as f:
        f.seek(60)
        f.write(struct.pack(">I", 60000))
    before = path.read_bytes()
    [reply] = await blockd_replies(
        [("blockdev-add", {"driver": "qcow2", "node-name": "c", "file": file_ref(path)})]
    )
    assert "error" in reply, reply
    assert path.read_bytes() == before
