"""Field-by-field comparison with a real ``qemu-storage-daemon`` on the same images.

Runs only when a qemu-storage-daemon binary is present (QEMU 10.0 under /work/qsd10, or
one on ``PATH``); the rest of the suite never needs it. Each case is run first by QEMU,
then by blockd, on the same files (never both at once: the image locks would clash).
Generated ``#block`` names are compared by position, ``children`` (QEMU 10.1) is left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from blocktools import Reply, file_ref, qemu_img, run_qmp, write_pattern
from reference import QSD_10 as QSD

from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from blockd.errors import QMPError

pytestmark = pytest.mark.skipif(QSD is None, reason="QEMU 10.0 qemu-storage-daemon missing")
COMMANDS = load_all()


def run_qsd(sock_dir: Path, commands: list[tuple[str, dict[str, Any]]]) -> list[Reply]:
    """Start qemu-storage-daemon, run ``commands`` over QMP, stop it; the replies."""
    assert QSD is not None
    return run_qmp([QSD], sock_dir, commands)


async def run_blockd(commands: list[tuple[str, dict[str, Any]]]) -> list[Reply]:
    d = Daemon()
    replies: list[Reply] = []
    try:
        for name, arguments in commands:
            try:
                replies.append({"return": await COMMANDS[name].call(d, arguments)})
            except QMPError as exc:
                replies.append({"error": exc.to_qmp()})
    finally:
        await d.graph.close_all()
    return replies


def normalize(reply: Reply) -> Any:
    """Rename generated nodes by their position and drop what QEMU 10.0 lacks."""
    value = reply.get("return", reply.get("error"))
    if not isinstance(value, list) or not all(isinstance(n, dict) for n in value):
        return value
    names = {
        n["node-name"]: f"#gen{i}" for i, n in enumerate(value) if n["node-name"].startswith("#")
    }
    text = json.dumps(value)
    for old, new in names.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    nodes = json.loads(text)
    for node in nodes:
        node.pop("children", None)
    return nodes


def differences(mine: Any, qemu: Any, where: str = "") -> list[str]:
    """Paths where the two JSON values differ, with both values."""
    if isinstance(mine, dict) and isinstance(qemu, dict):
        return [
            diff
            for key in sorted(set(mine) | set(qemu))
            for diff in differences(
                mine.get(key, "<absent>"), qemu.get(key, "<absent>"), f"{where}.{key}"
            )
        ]
    if isinstance(mine, list) and isinstance(qemu, list) and len(mine) == len(qemu):
        return [
            d
            for i, (a, b) in enumerate(zip(mine, qemu, strict=True))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    return [] if mine == qemu else [f"{where}: blockd {mine!r} != qemu {qemu!r}"]


async def compare(sock_dir: Path, commands: list[tuple[str, dict[str, Any]]]) -> None:
    theirs = await trio.to_thread.run_sync(run_qsd, sock_dir, commands)
    ours = await run_blockd(commands)
    for (name, arguments), qemu, mine in zip(commands, theirs, ours, strict=True):
        found = differences(normalize(mine), normalize(qemu))
        print(name, arguments, *found, sep="\n  ")  # shown when the test fails
        assert not found, (name, arguments)


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "2M")
    write_pattern(base, "raw", 0, 65536, 1)
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    write_pattern(mid, "qcow2", 65536, 65536, 2)
    top = tmp_path / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(mid), "-F", "qcow2", top
    )
    return {"base": base, "mid": mid, "top": top}


async def test_chain_from_headers(sock_dir: Path, chain: dict[str, Path]) -> None:
    add = {"driver": "qcow2", "node-name": "top", "file": file_ref(chain["top"])}
    await compare(
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
    await compare(
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
    await compare(
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
    theirs = await trio.to_thread.run_sync(run_qsd_locks, sock_dir, commands, files)
    ours = await trio.to_thread.run_sync(
        lambda: run_qmp([sys.executable, "-m", "blockd"], sock_dir, commands, files)
    )
    assert theirs[-1]["return"] == [[100, 101, 103, 201, 203], [100, 201, 203], []]
    for qemu, mine in zip(theirs, ours, strict=True):
        assert not differences(normalize(mine), normalize(qemu))


def run_qsd_locks(
    sock_dir: Path, commands: list[tuple[str, dict[str, Any]]], files: list[Path]
) -> list[Reply]:
    assert QSD is not None
    return run_qmp([QSD], sock_dir, commands, files)


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
    await compare(sock_dir, commands)


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
        write_pattern(tmp_path / name, "qcow2", 4096, 8192, 7)
        node = name.split(".")[0]
        commands.append(
            (
                "blockdev-add",
                {"driver": "qcow2", "node-name": node, "file": file_ref(tmp_path / name)},
            )
        )
    commands.append(("query-named-block-nodes", {}))
    await compare(sock_dir, commands)


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
    theirs = await trio.to_thread.run_sync(run_qsd_locks, sock_dir, commands, files)
    ours = await run_blockd(commands)
    for qemu, mine in zip(theirs, ours, strict=False):
        found = differences(normalize(mine), normalize(qemu))
        print(*found, sep="\n  ")
        assert not found


async def test_lock_bytes_during_a_stream(sock_dir: Path, tmp_path: Path) -> None:
    """While a throttled stream runs, every image holds what QEMU's holds."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    write_pattern(base, "raw", 0, 4 << 20, 1)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qcow2")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    commands: list[tuple[str, dict[str, Any]]] = [
        (
            "blockdev-add",
            {"driver": "qcow2", "node-name": "top", "file": file_ref(tmp_path / "top.qcow2")},
        ),
        ("block-stream", {"job-id": "j", "device": "top", "speed": 1}),
    ]
    files = [tmp_path / "top.qcow2", tmp_path / "mid.qcow2", base]
    theirs = await trio.to_thread.run_sync(run_qsd_locks, sock_dir, commands, files)
    ours = await trio.to_thread.run_sync(
        lambda: run_qmp([sys.executable, "-m", "blockd"], sock_dir, commands, files)
    )
    assert theirs[-1]["return"][0] == [100, 101, 102, 103, 201, 203]
    assert ours == theirs


async def test_two_users_of_one_image(sock_dir: Path, chain: dict[str, Path]) -> None:
    mid = file_ref(chain["mid"])
    await compare(
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
