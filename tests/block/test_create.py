"""blockd.block.qcow2.create: images judged by qemu-img check/info against qemu-img create."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit.chains import close, open_qcow2, read_all
from kit.qemu import assert_clean, qemu_img, qemu_img_json

from blockd.block.qcow2.create import create_qcow2, create_raw

CASES = [
    {"size": 0},
    {"size": 1000},
    {"size": 1 << 30},
    {"size": 100 << 20, "cluster_size": 512},
    {"size": 10 << 30, "cluster_size": 512},  # the L1 table needs many refcount blocks
    {"size": 10 << 30, "cluster_size": 512, "refcount_bits": 64},  # and a larger table
    {"size": 1 << 30, "cluster_size": 4096},
    {"size": 1 << 30, "cluster_size": 8192},
    {"size": 10 << 30, "cluster_size": 2 * 1024 * 1024},
    {"size": 1 << 30, "compat": "0.10"},
    {"size": 1 << 20, "refcount_bits": 1},
    {"size": 1 << 20, "refcount_bits": 8, "cluster_size": 1024},
    {"size": 1 << 20, "backing_file": "base.raw", "backing_fmt": "raw"},
    {"size": 1 << 20, "backing_file": "base.raw", "backing_fmt": "raw", "compat": "0.10"},
]


def qemu_create(path: Path, case: dict[str, object]) -> None:
    opts = (
        f"cluster_size={case.get('cluster_size', 65536)},compat={case.get('compat', '1.1')},"
        f"refcount_bits={case.get('refcount_bits', 16)}"
    )
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", opts]
    if case.get("backing_file"):
        args += ["-b", str(case["backing_file"]), "-F", str(case["backing_fmt"])]
    qemu_img(*args, path, str(case["size"]))


def normalized_info(path: Path) -> dict[str, object]:
    got: dict[str, object] = qemu_img_json("info", path)
    for key in ("filename", "full-backing-filename", "actual-size"):
        got.pop(key, None)
    return got


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_create_qcow2_like_qemu_img(tmp_path: Path, case: dict[str, object]) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    kwargs = {k: v for k, v in case.items() if k != "size"}
    create_qcow2(ours, int(case["size"]), **kwargs)  # type: ignore[arg-type]
    qemu_create(theirs, case)
    assert_clean(ours)
    assert normalized_info(ours) == normalized_info(theirs)
    if not (case["size"] == 10 << 30 and case.get("cluster_size") == 512):
        # byte for byte QEMU's layout, except where the L1 table outgrows the first
        # refcount block (QEMU then orders the extra blocks its own way)
        assert ours.read_bytes() == theirs.read_bytes()


async def test_created_image_is_writable(tmp_path: Path) -> None:
    path = tmp_path / "new.qcow2"
    create_qcow2(path, 3 << 20, cluster_size=4096)
    node = await open_qcow2(path)
    try:
        await node.write(12345, b"\x7f" * 100_000)
        data = await read_all(node)
    finally:
        await close(node)
    assert data[12345 : 12345 + 100_000] == b"\x7f" * 100_000
    assert_clean(path)


def test_create_raw(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    create_raw(path, 1000)
    assert path.stat().st_size == 1024
    got = qemu_img_json("info", path)
    assert got["format"] == "raw"
    assert got["virtual-size"] == 1024


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"cluster_size": 1000}, "power of two between 512 and 2048k"),
        ({"cluster_size": 4 << 20}, "power of two between 512 and 2048k"),
        ({"compat": "0.10", "refcount_bits": 8}, "require compatibility level 1.1"),
        ({"refcount_bits": 3}, "power of two"),
        ({"compat": "2.0"}, "Invalid compatibility level"),
        ({"backing_file": "x" * 1024}, "too long"),
        ({"backing_fmt": "raw"}, "without backing file"),
    ],
)
def test_create_refuses(tmp_path: Path, kwargs: dict[str, object], text: str) -> None:
    path = tmp_path / "bad.qcow2"
    with pytest.raises(ValueError, match=text):
        create_qcow2(path, 1 << 20, **kwargs)  # type: ignore[arg-type]
    assert not path.exists()
