"""Field-by-field comparison with a real ``qemu-storage-daemon`` on the same images.

Runs only when a qemu-storage-daemon binary is present (QEMU 10.0 under /work/qsd10, or
one on ``PATH``); the rest of the suite never needs it. Each case is run first by QEMU,
then by blockd, on the same files (never both at once: the image locks would clash).
Generated ``#block`` names are compared by position, ``children`` (QEMU 10.1) is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from kit.chains import Layer, build, file_ref
from kit.cli import BLOCKD
from kit.compare import (
    blockd_replies,
    compare_with_qsd,
    differences,
    normalize_nodes,
    qsd_replies,
)
from kit.daemons import replies
from kit.qemu import QSD_10, qemu_img, write

pytestmark = pytest.mark.skipif(QSD_10 is None, reason="QEMU 10.0 qemu-storage-daemon missing")


async def test_chain_from_headers(sock_dir: Path, chain: dict[str, Path]) -> None:
    add = {"driver": "qcow2", "node-name": "top", "file": file_ref(chain["top"])}
    await compare_with_qsd(
        sock_dir,
        [
            ("blockdev-add", add),
            ("query-named-block-nodes", {}),
            ("query-named-block-nodes", {"flat": True}),
            ("blockdev-del", {"node-name": "nope"}),
            ("blockdev-del", {"node-name": "top"}),
            ("query-named-block-nodes", {}),
        ],
    )


async def test_named_nodes_and_null_backing(sock_dir: Path, chain: dict[str, Path]) -> None:
    await compare_with_qsd(
        sock_dir,
        [
            ("blockdev-add", {"driver": "file", "node-name": "bf", "filename": str(chain["base"])}),
            (
                "blockdev-add",
                {"driver": "raw", "node-name": "base", "file": "bf", "read-only": True},
            ),
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "mid",
                    "file": file_ref(chain["mid"]),
                    "backing": "base",
                },
            ),
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "top",
                    "file": file_ref(chain["top"]),
                    "backing": None,
                },
            ),
            ("query-named-block-nodes", {}),
            ("blockdev-del", {"node-name": "base"}),
            ("blockdev-del", {"node-name": "bf"}),
            ("blockdev-del", {"node-name": "mid"}),
            ("blockdev-del", {"node-name": "base"}),
            ("query-named-block-nodes", {"flat": True}),
        ],
    )


async def test_error_texts(sock_dir: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    raw = {"driver": "raw", "file": file_ref(chain["base"])}
    await compare_with_qsd(
        sock_dir,
        [
            ("blockdev-add", {"driver": "file", "filename": str(chain["base"])}),
            ("blockdev-add", {**raw, "node-name": "1x"}),
            ("blockdev-add", {**raw, "node-name": ""}),
            ("blockdev-add", {**raw, "node-name": "a" * 32}),
            ("blockdev-add", {**raw, "node-name": "a" * 31}),
            ("blockdev-add", {**raw, "node-name": "a" * 31}),
            (
                "blockdev-add",
                {"driver": "file", "node-name": "m", "filename": str(tmp_path / "no")},
            ),
            ("blockdev-add", {"driver": "file", "node-name": "d", "filename": str(tmp_path)}),
            ("blockdev-add", {**raw, "node-name": "r1", "offset": 3 << 20}),
            ("blockdev-add", {**raw, "node-name": "r2", "offset": 512, "size": 2 << 20}),
            ("blockdev-add", {**raw, "node-name": "r3", "size": 1000}),
            ("blockdev-add", {**raw, "node-name": "r4", "force-share": True}),
            ("blockdev-add", {"driver": "raw", "node-name": "r5", "file": "nope"}),
            (
                "blockdev-add",
                {"driver": "qcow2", "node-name": "q", "file": file_ref(chain["base"])},
            ),
            ("blockdev-del", {"node-name": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}),
            ("blockdev-add", {**raw, "node-name": "z", "detect-zeroes": "unmap"}),
            (
                "blockdev-add",
                {**raw, "node-name": "z", "detect-zeroes": "unmap", "discard": "unmap"},
            ),
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "q1",
                    "file": file_ref(chain["mid"]),
                    "backing": "nope",
                },
            ),
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "q2",
                    "file": file_ref(chain["mid"]),
                    "backing": "q2",
                },
            ),
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "q3",
                    "file": {**file_ref(chain["mid"]), "read-only": True},
                },
            ),
            ("query-named-block-nodes", {}),
            ("blockdev-add", {**file_ref(chain["base"]), "node-name": "f1", "aio": "native"}),
            ("blockdev-add", {**file_ref(chain["base"]), "node-name": "f2", "pr-manager": "x"}),
            ("blockdev-add", {"driver": "file", "node-name": "f3", "filename": ""}),
            (
                "blockdev-add",
                {
                    **file_ref(chain["base"]),
                    "node-name": "f4",
                    "aio": "io_uring",
                    "locking": "on",
                    "drop-cache": False,
                    "read-only": True,
                },
            ),
            ("query-named-block-nodes", {"flat": True}),
        ],
    )


async def test_over_the_socket_with_schema_errors_and_locks(
    sock_dir: Path, chain: dict[str, Path]
) -> None:
    """Both daemons started with the same command line, driven over their sockets."""
    commands: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"driver": "raw", "node-name": "r", "backing": None, "file": "x"}),
        ("blockdev-add", {"node-name": "r", "file": "x"}),
        ("blockdev-add", {"driver": "nbd2", "node-name": "r"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file_ref(chain["top"])}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    files = [chain["top"], chain["mid"], chain["base"]]
    theirs = await trio.to_thread.run_sync(qsd_replies, sock_dir, commands, files)
    ours = await trio.to_thread.run_sync(replies, BLOCKD, sock_dir, commands, files)
    assert theirs[-1]["return"] == [[100, 101, 103, 201, 203], [100, 201, 203], []]
    for qemu, mine in zip(theirs, ours, strict=True):
        assert not differences(normalize_nodes(mine), normalize_nodes(qemu))


async def test_filters_windows_and_options(sock_dir: Path, chain: dict[str, Path]) -> None:
    commands: list[tuple[str, dict[str, Any]]] = [
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "win",
                "offset": 4096,
                "size": 65536,
                "read-only": True,
                "file": file_ref(chain["base"]),
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "dbg",
                "file": {"driver": "blkdebug", "image": file_ref(chain["base"])},
                "read-only": True,
                "cache": {"no-flush": True},
                "detect-zeroes": "on",
            },
        ),
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "top", "file": file_ref(chain["top"])},
        ),
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top"}),
        ("query-named-block-nodes", {}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "top"}),
        ("blockdev-del", {"node-name": "cor"}),
        ("blockdev-del", {"node-name": "top"}),
        ("query-named-block-nodes", {}),
    ]
    await compare_with_qsd(sock_dir, commands)


async def test_image_variants(sock_dir: Path, tmp_path: Path) -> None:
    """format-specific and sizes for compat 0.10, small clusters, refcount widths."""
    variants = {
        "v2.qcow2": ["-o", "compat=0.10,cluster_size=512"],
        "lazy.qcow2": ["-o", "lazy_refcounts=on,refcount_bits=1"],
        "big.qcow2": ["-o", "cluster_size=2M,refcount_bits=64"],
    }
    commands: list[tuple[str, dict[str, Any]]] = []
    for name, options in variants.items():
        qemu_img("create", "-q", "-f", "qcow2", *options, tmp_path / name, "3M")
        write(tmp_path / name, 4096, 8192, 7)
        node = name.split(".")[0]
        commands.append(
            (
                "blockdev-add",
                {"driver": "qcow2", "node-name": node, "file": file_ref(tmp_path / name)},
            )
        )
    commands.append(("query-named-block-nodes", {}))
    await compare_with_qsd(sock_dir, commands)


async def test_cache_and_flags(sock_dir: Path, chain: dict[str, Path]) -> None:
    commands: list[tuple[str, dict[str, Any]]] = [
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "cache": {"direct": True, "no-flush": True},
                "file": file_ref(chain["top"]),
                "backing": None,
            },
        ),
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "base",
                "auto-read-only": True,
                "discard": "unmap",
                "detect-zeroes": "unmap",
                "file": file_ref(chain["base"]),
            },
        ),
        ("query-named-block-nodes", {}),
    ]
    files = [chain["top"], chain["base"]]
    theirs = await trio.to_thread.run_sync(qsd_replies, sock_dir, commands, files)
    ours = await blockd_replies(commands)
    for qemu, mine in zip(theirs, ours, strict=False):
        found = differences(normalize_nodes(mine), normalize_nodes(qemu))
        print(*found, sep="\n  ")
        assert not found


async def test_lock_bytes_during_a_stream(sock_dir: Path, tmp_path: Path) -> None:
    """While a throttled stream runs, every image holds what QEMU's holds."""
    base, mid, top = build(
        tmp_path,
        Layer("base.raw", "4M", [f"write -P 1 0 {4 << 20}"]),
        Layer("mid.qcow2"),
        Layer("top.qcow2"),
    )
    commands: list[tuple[str, dict[str, Any]]] = [
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "top", "file": file_ref(top)},
        ),
        ("block-stream", {"job-id": "j", "device": "top", "speed": 1}),
    ]
    files = [top, mid, base]
    theirs = await trio.to_thread.run_sync(qsd_replies, sock_dir, commands, files)
    ours = await trio.to_thread.run_sync(replies, BLOCKD, sock_dir, commands, files)
    assert theirs[-1]["return"][0] == [100, 101, 102, 103, 201, 203]
    assert ours == theirs


async def test_two_users_of_one_image(sock_dir: Path, chain: dict[str, Path]) -> None:
    mid = file_ref(chain["mid"])
    await compare_with_qsd(
        sock_dir,
        [
            ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": mid, "backing": None}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "b", "file": mid, "backing": None}),
            ("blockdev-add", {**mid, "node-name": "f"}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "c", "file": "f", "backing": None}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "d", "file": "f", "backing": None}),
            (
                "blockdev-add",
                {"driver": "raw", "node-name": "e", "file": "f", "read-only": True},
            ),
            ("query-named-block-nodes", {"flat": True}),
        ],
    )
