"""Power loss during block-stream: record the file layer, replay prefixes.

:func:`recording` is a recording mode of the ``file`` driver: while active, every write
(offset and bytes) and every flush that blockd issues to the files named is logged, in
order, before it is performed. :func:`record_stream` streams a chain in-process under it.
:func:`crash_images` then rebuilds what a disk could hold after a power cut: every write
before the last completed flush, plus any subset of the writes issued after it (a disk
may persist them in any order), and :func:`judge` checks each with ``qemu-img check``
(no corruption; leaks allowed) and ``qemu-img compare`` against the pre-stream copy.

Run long: ``python -m stress.powerloss --replays 2000``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from blockd.block.drivers.file import FileDriver
from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from stress.killkit import check_image, same_view, tool


@dataclass(frozen=True)
class Op:
    """One logged operation: a write (``data`` set) or a flush (``data`` None)."""

    offset: int
    data: bytes | None


@contextmanager
def recording(paths: set[str]) -> Iterator[list[Op]]:
    """Log the writes and flushes blockd's file driver issues to ``paths``."""
    log: list[Op] = []
    write, flush, copy_in = FileDriver.write, FileDriver.flush, FileDriver.copy_in

    async def rec_write(self: FileDriver, offset: int, data: Any) -> None:
        if self.path in paths:
            log.append(Op(offset, bytes(memoryview(data).cast("B"))))
        await write(self, offset, data)

    async def rec_copy_in(self: FileDriver, offset: int, extents: Any) -> None:
        await copy_in(self, offset, extents)
        if self.path in paths:  # an offloaded copy: log the bytes it wrote
            log.append(Op(offset, os.pread(self.fd, sum(e.length for e in extents), offset)))

    async def rec_flush(self: FileDriver) -> None:
        if self.path in paths and not self.no_flush:
            log.append(Op(0, None))
        await flush(self)

    FileDriver.write, FileDriver.flush = rec_write, rec_flush  # type: ignore[method-assign]
    FileDriver.copy_in = rec_copy_in  # type: ignore[method-assign]
    try:
        yield log
    finally:
        FileDriver.write, FileDriver.flush = write, flush  # type: ignore[method-assign]
        FileDriver.copy_in = copy_in  # type: ignore[method-assign]


def make_chain(directory: Path, size: str = "24M", cluster: int = 4096) -> Path:
    """base ← mid ← top (``cluster``-byte clusters in top) with data in every layer."""
    base, mid, top = (directory / f"{n}.qcow2" for n in ("base", "mid", "top"))
    tool("qemu-img", "create", "-q", "-f", "qcow2", base, size)
    tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {size}", base)
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x23 9M 3M", mid)
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
         "-b", mid.name, "-F", "qcow2", top)  # fmt: skip
    tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", "-c", "write -P 0x44 3M 8k", top)
    return top


async def _stream(top: Path) -> None:
    daemon = Daemon()
    commands = load_all()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await commands["blockdev-add"].call(daemon, {
            "driver": "qcow2", "node-name": "top", "l2-cache-size": 8192,
            "refcount-cache-size": 8192,
            "file": {"driver": "file", "filename": str(top)}})  # fmt: skip
        await commands["block-stream"].call(daemon, {"device": "top", "job-id": "j"})
        with trio.fail_after(60):
            while (job := daemon.jobs.find("j")) is not None and job.status != "null":
                await trio.sleep(0.005)
        await commands["blockdev-del"].call(daemon, {"node-name": "top"})
        daemon.request_shutdown()


def record_stream(directory: Path) -> tuple[Path, bytes, list[Op]]:
    """Stream a fresh chain in ``directory`` under :func:`recording`; returns the top,
    its bytes before the stream and the log. The stream's result is checked too."""
    top = make_chain(directory)
    before = directory / "before.qcow2"
    tool("qemu-img", "convert", "-O", "qcow2", top, before)
    initial = top.read_bytes()
    with recording({str(top)}) as log:
        trio.run(_stream, top)
    problems = [p for p in (check_image(top), same_view(top, before)) if p]
    assert not problems, problems
    return top, initial, log


def epochs(log: list[Op]) -> list[list[Op]]:
    """The writes between flushes: epoch ``i`` is stable once flush ``i`` completed."""
    out: list[list[Op]] = [[]]
    for op in log:
        if op.data is None:
            out.append([])
        else:
            out[-1].append(op)
    return out


def crash_image(initial: bytes, groups: list[list[Op]], upto: int, chosen: list[Op]) -> bytes:
    """The file after all writes of ``groups[:upto]`` and then ``chosen`` (in order)."""
    image = bytearray(initial)
    for op in [w for g in groups[:upto] for w in g] + chosen:
        assert op.data is not None
        end = op.offset + len(op.data)
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[op.offset : end] = op.data
    return bytes(image)


def crash_states(initial: bytes, log: list[Op], rnd: random.Random,
                 per_epoch: int) -> Iterator[tuple[str, bytes]]:  # fmt: skip
    """``(description, file bytes)`` of crash states: each flush boundary, plus per epoch
    ``per_epoch`` in-order prefixes and ``per_epoch`` random subsets (reordered)."""
    groups = epochs(log)
    for i, group in enumerate(groups):
        yield f"after flush {i}", crash_image(initial, groups, i, [])
        if not group:
            continue
        for _ in range(per_epoch):
            k = rnd.randrange(1, len(group) + 1)
            yield (
                f"epoch {i}: first {k}/{len(group)} writes",
                crash_image(initial, groups, i, group[:k]),
            )
        for _ in range(per_epoch):
            subset = [op for op in group if rnd.random() < 0.5]
            yield (
                f"epoch {i}: {len(subset)}/{len(group)} writes in any order",
                crash_image(initial, groups, i, subset),
            )
    yield "everything", crash_image(initial, groups, len(groups), [])


def judge(image: bytes, path: Path, before: Path) -> list[str]:
    path.write_bytes(image)
    return [p for p in (check_image(path), same_view(path, before)) if p]


def run(replays: int, seed: int) -> tuple[int, int, list[str]]:
    """Record one stream and judge up to ``replays`` crash states; returns (log length,
    states judged, problems)."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="blockd-power-") as tmp:
        directory = Path(tmp)
        top, initial, log = record_stream(directory)
        groups = epochs(log)
        # rounded up, so that the states cover ``replays`` (the loop stops there)
        per_epoch = max(1, -(-replays // (2 * max(1, sum(1 for g in groups if g)))))
        replay = directory / "replay" / top.name
        replay.parent.mkdir()
        for name in ("mid.qcow2", "base.qcow2"):
            shutil.copy(directory / name, replay.parent / name)
        problems: list[str] = []
        count = 0
        for desc, image in crash_states(initial, log, rnd, per_epoch):
            count += 1
            problems += [f"{desc}: {p}" for p in judge(image, replay, directory / "before.qcow2")]
            if count >= replays:
                break
    return len(log), count, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ops, count, problems = run(args.replays, args.seed)
    print(f"power loss: {ops} logged operations, {count} crash states judged; "
          f"problems: {len(problems)}")  # fmt: skip
    for problem in problems[:20]:
        print("  FAIL", problem)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
