"""qcow2 driver throughput: blockd's driver in-process against qemu-img bench / qemu-io.

    python -m benchmarks.qcow2_driver                  # 1 GiB, 1 MiB requests
    python -m benchmarks.qcow2_driver --size 256 --random-count 1024

Four figures on the same machine and the same files, each printed as MiB/s for blockd,
for QEMU and the ratio blockd / QEMU:

* ``seq-write``: fresh image, sequential ``--chunk`` writes, final flush
  (QEMU: ``qemu-img bench -w -t writeback``);
* ``seq-read``: the same image read back sequentially (QEMU: ``qemu-img bench``);
* ``rand-write``: fresh image, ``--random-count`` writes of 64 KiB at the same random
  cluster-aligned offsets (QEMU: one ``qemu-io`` process running the same ``write`` list);
* ``rand-read``: those offsets read back (QEMU: ``qemu-io`` ``read`` list).

Images are made by :func:`blockd.block.qcow2.create.create_qcow2` for both sides; blockd reads
and writes through ``Graph.open_node`` (file + qcow2 nodes) with one reused buffer.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from blockd.block.graph import Graph
from blockd.block.node import BlockNode
from blockd.block.qcow2.create import create_qcow2

MiB = 1024 * 1024
RANDOM_IO = 64 * 1024


async def _with_node(path: Path, body: Callable[[BlockNode], Awaitable[None]]) -> float:
    graph = Graph()
    node = await graph.open_node(
        {
            "driver": "qcow2",
            "node-name": "bench",
            "file": {"driver": "file", "filename": str(path)},
        },
        top_level=True,
    )
    try:
        start = time.perf_counter()
        await body(node)
        await node.flush()
        return time.perf_counter() - start
    finally:
        await graph.close_all()


def _timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def _qemu_io(path: Path, commands: list[str]) -> float:
    script = []
    for command in commands:
        script += ["-c", command]
    return _timed(["qemu-io", "-f", "qcow2", "-t", "writeback", *script, str(path)])


def run(size: int, chunk: int, count: int, work: Path) -> list[tuple[str, float, float]]:
    """Return ``(figure, blockd MiB/s, QEMU MiB/s)`` rows."""
    ours, theirs = work / "ours.qcow2", work / "theirs.qcow2"
    payload = memoryview(os.urandom(chunk))
    rows: list[tuple[str, float, float]] = []

    # sequential write, then read
    create_qcow2(ours, size)
    create_qcow2(theirs, size)

    async def seq_write(node: BlockNode) -> None:
        for off in range(0, size, chunk):
            await node.write(off, payload)

    async def seq_read(node: BlockNode) -> None:
        buf = memoryview(bytearray(chunk))
        for off in range(0, size, chunk):
            await node.read(off, buf)

    n = size // chunk
    bench = ["qemu-img", "bench", "-f", "qcow2", "-t", "writeback", "-d", "1", "-q"]
    t_ours = trio.run(_with_node, ours, seq_write)
    t_theirs = _timed([*bench, "-w", "-c", str(n), "-s", str(chunk), str(theirs)])
    rows.append(("seq-write", size / MiB / t_ours, size / MiB / t_theirs))
    t_ours = trio.run(_with_node, ours, seq_read)
    t_theirs = _timed([*bench, "-c", str(n), "-s", str(chunk), str(theirs)])
    rows.append(("seq-read", size / MiB / t_ours, size / MiB / t_theirs))

    # random 64 KiB writes and reads at the same offsets
    rnd = random.Random(42)
    offsets = [rnd.randrange(size // RANDOM_IO) * RANDOM_IO for _ in range(count)]
    small = payload[:RANDOM_IO]
    create_qcow2(ours, size)
    create_qcow2(theirs, size)

    async def rand_write(node: BlockNode) -> None:
        for off in offsets:
            await node.write(off, small)

    async def rand_read(node: BlockNode) -> None:
        buf = memoryview(bytearray(RANDOM_IO))
        for off in offsets:
            await node.read(off, buf)

    moved = count * RANDOM_IO / MiB
    t_ours = trio.run(_with_node, ours, rand_write)
    t_theirs = _qemu_io(theirs, [f"write -q {off} {RANDOM_IO}" for off in offsets])
    rows.append(("rand-write", moved / t_ours, moved / t_theirs))
    t_ours = trio.run(_with_node, ours, rand_read)
    t_theirs = _qemu_io(theirs, [f"read -q {off} {RANDOM_IO}" for off in offsets])
    rows.append(("rand-read", moved / t_ours, moved / t_theirs))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image size in MiB")
    parser.add_argument("--chunk", type=int, default=1024, help="sequential request KiB")
    parser.add_argument("--random-count", type=int, default=4096, help="random requests")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the images")
    args = parser.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = run(args.size * MiB, args.chunk * 1024, args.random_count, Path(tmp))
    print(f"{'figure':<12}{'blockd MiB/s':>14}{'QEMU MiB/s':>12}{'ratio':>8}")
    for name, ours, theirs in rows:
        print(f"{name:<12}{ours:>14.0f}{theirs:>12.0f}{ours / theirs:>8.2f}")


if __name__ == "__main__":
    main()
