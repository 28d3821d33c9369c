"""Helpers for the qcow2 tests: qemu-img/qemu-io wrappers and opening images via the graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qemutools import image_info, run_tool

from blockd.block.graph import Graph
from blockd.block.node import BlockNode


def run(*args: str | Path) -> str:
    """Run a command, fail loudly, return its stdout."""
    return run_tool(*args).stdout


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run(*args, path)


def to_raw(path: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", path, out)
    return out.read_bytes()


def check(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` (exit codes 0..3 are results, not failures)."""
    proc = run_tool("qemu-img", "check", "--output=json", path, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    result["_rc"] = proc.returncode
    return result


def assert_clean(path: Path, *, leaks_ok: bool = False) -> None:
    result = check(path)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    if not leaks_ok:
        assert result.get("leaks", 0) == 0, result


def info(path: Path) -> dict[str, Any]:
    return image_info(path)


async def open_qcow2(
    path: Path,
    *,
    read_only: bool = False,
    backing: Any = "header",
    graph: Graph | None = None,
    **extra: Any,
) -> BlockNode:
    """Open ``path`` as a qcow2 node over a file node (backing chain from the header)."""
    graph = graph or Graph()
    options: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": "top",
        "read-only": read_only,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }
    if backing != "header":
        options["backing"] = backing
    node = await graph.open_node(options, top_level=True)
    node_graph[node] = graph
    return node


node_graph: dict[BlockNode, Graph] = {}


async def close(node: BlockNode) -> None:
    graph = node_graph.pop(node)
    await graph.close_all()


async def read_all(node: BlockNode, chunk: int = 1 << 20) -> bytes:
    out = bytearray(node.length())
    view = memoryview(out)
    for off in range(0, len(out), chunk):
        await node.read(off, view[off : off + chunk])
    return bytes(out)


#: qcow2 options that shrink both metadata caches to two tables (forces evictions)
TINY_CACHES: dict[str, Any] = {"l2-cache-size": 1024, "refcount-cache-size": 1024}


async def crash_writer(path: Path, seed: int, tiny: bool = False) -> None:
    """Child process of the kill test: write random data forever.

    Before each write or flush of the image file it prints ``op`` and pauses a
    millisecond, so a parent that kills it after reading N lines stops it right before
    the (N+1)-th file operation: kills land between any two metadata writes.
    """
    import random
    import sys

    import trio

    node = await open_qcow2(path, **(TINY_CACHES if tiny else {}))
    file = node.file
    assert file is not None
    real_write, real_flush = file.write, file.flush

    async def write(offset: int, data: bytes | bytearray | memoryview) -> None:
        sys.stdout.write("op\n")
        sys.stdout.flush()
        await trio.sleep(0.001)
        await real_write(offset, data)

    async def flush() -> None:
        sys.stdout.write("op\n")
        sys.stdout.flush()
        await trio.sleep(0.001)
        await real_flush()

    file.write = write  # type: ignore[method-assign]
    file.flush = flush  # type: ignore[method-assign]
    rnd = random.Random(seed)
    size = node.length()
    while True:
        off = rnd.randrange(0, size)
        length = min(rnd.randrange(1, 512 * 1024), size - off)
        await node.write(off, rnd.randbytes(length))
        if rnd.random() < 0.25:
            await node.flush()


if __name__ == "__main__":
    import sys

    import trio

    trio.run(crash_writer, Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["tiny"])
