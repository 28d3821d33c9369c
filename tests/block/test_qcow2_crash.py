"""Kill-at-any-point: a child writing through blockd is SIGKILLed at random moments; every
image it leaves behind passes ``qemu-img check`` without corruption (leaks are allowed).

The child is this module run as a script (:func:`crash_writer`), with ``tests/`` on its
``PYTHONPATH`` so that it imports the kit as the test process does."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from kit.chains import TINY_CACHES, open_qcow2
from kit.qemu import check_report, io_script, qemu_img

from blockd.block.qcow2.create import create_qcow2

CHILD = Path(__file__).resolve()
#: the child imports the kit (tests/) as the test process does
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(CHILD.parents[1]), os.environ.get("PYTHONPATH")])
    ),
}


async def crash_writer(path: Path, seed: int, tiny: bool = False) -> None:
    """The child of the kill test: write random data forever.

    Before each write or flush of the image file it prints ``op`` and pauses a
    millisecond, so a parent that kills it after reading N lines stops it right before
    the (N+1)-th file operation: kills land between any two metadata writes.
    """
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


def kill_after(path: Path, seed: int, writes: int, *, tiny: bool = False) -> None:
    """Run the writer until it announced ``writes`` file operations, then SIGKILL it."""
    with subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(seed), *(["tiny"] if tiny else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    ) as proc:
        try:
            assert proc.stdout is not None
            for _ in range(writes):
                if not proc.stdout.readline():
                    err = proc.stderr.read() if proc.stderr else ""
                    raise AssertionError(f"writer died: {err}")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_consistent(path: Path) -> None:
    result = check_report(path)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    assert result["exit"] in (0, 3), result


@pytest.mark.parametrize("setup", ["small-clusters", "snapshot", "backing", "tiny-caches"])
def test_kill_at_random_points(tmp_path: Path, setup: str) -> None:
    rnd = random.Random(setup)
    path = tmp_path / "img.qcow2"
    if setup in ("small-clusters", "tiny-caches"):
        # 512-byte clusters: new refcount blocks and refcount table growth under fire
        create_qcow2(path, 24 * 1024 * 1024, cluster_size=512)
    elif setup == "snapshot":
        create_qcow2(path, 8 * 1024 * 1024)
        io_script(path, "write -P 0x11 0 6M", "write -z 6M 1M")
        qemu_img("snapshot", "-c", "s1", path)
    else:
        base = tmp_path / "base.qcow2"
        create_qcow2(base, 6 * 1024 * 1024)
        io_script(base, "write -P 0x22 0 6M")
        create_qcow2(path, 8 * 1024 * 1024, cluster_size=4096, backing_file="base.qcow2",
                     backing_fmt="qcow2")  # fmt: skip
    for round_ in range(8):
        kill_after(path, rnd.randrange(1 << 30), rnd.randrange(1, 300), tiny=setup == "tiny-caches")
        assert_consistent(path)
        if setup == "snapshot":
            # the snapshot is never touched by writes to the active layer
            out = tmp_path / f"snap{round_}.raw"
            qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", path, out)
            data = out.read_bytes()
            assert data[: 6 << 20] == b"\x11" * (6 << 20)
            assert data[6 << 20 :] == bytes(2 << 20)


if __name__ == "__main__":
    trio.run(crash_writer, Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["tiny"])
