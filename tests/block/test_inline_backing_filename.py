"""An inline ``backing`` without ``file.filename`` under an image whose header names a
backing file: QEMU opens it with the header name as its filename, which then collides
with an explicit ``filename`` or a node reference further down (block.c,
``bdrv_open_backing_file``; blkdebug passes a filename on to its ``image``). Compared
with QEMU 10.0's qemu-storage-daemon, one daemon start per case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kit.chains import file_ref
from kit.compare import compare_with_qsd
from kit.qemu import QSD_10, qemu_img

pytestmark = pytest.mark.skipif(QSD_10 is None, reason="QEMU 10.0 qemu-storage-daemon missing")


def case(tmp_path: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
    base, top, lone = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "lone.qcow2"
    dbg = {"driver": "blkdebug", "image": file_ref(base)}
    backings: dict[str, tuple[Path, list[tuple[str, dict[str, Any]]], Any]] = {
        "qcow2-over-blkdebug": (top, [], {"driver": "qcow2", "file": dbg}),
        "raw-over-blkdebug": (top, [], {"driver": "raw", "file": dbg}),
        "blkdebug-itself": (top, [], dbg),
        "qcow2-over-raw": (
            top,
            [],
            {"driver": "qcow2", "file": {"driver": "raw", "file": file_ref(base)}},
        ),
        "qcow2-over-file": (top, [], {"driver": "qcow2", "file": file_ref(base)}),
        "no-header-name": (lone, [], {"driver": "qcow2", "file": dbg}),
        "file-reference": (
            top,
            [("blockdev-add", {**file_ref(base), "node-name": "f"})],
            {"driver": "qcow2", "file": "f"},
        ),
        "image-reference": (
            top,
            [("blockdev-add", {**file_ref(base), "node-name": "f"})],
            {"driver": "qcow2", "file": {"driver": "blkdebug", "image": "f"}},
        ),
    }
    image, setup, backing = backings[name]
    return [
        *setup,
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "t", "file": file_ref(image), "backing": backing},
        ),
        ("query-named-block-nodes", {"flat": True}),
    ]


NAMES = [
    "qcow2-over-blkdebug", "raw-over-blkdebug", "blkdebug-itself", "qcow2-over-raw",
    "qcow2-over-file", "no-header-name", "file-reference", "image-reference",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
async def test_like_qsd(sock_dir: Path, tmp_path: Path, name: str) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "lone.qcow2", "1M")
    await compare_with_qsd(sock_dir, case(tmp_path, name))
