"""Kill-at-any-point: a child writing through blockd is SIGKILLed at random moments; every
image it leaves behind passes ``qemu-img check`` without corruption (leaks are allowed)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import qcow2_util
from qcow2_util import check, qemu_io, run

from blockd.block.qcow2.create import create_qcow2

CHILD = Path(qcow2_util.__file__)
#: the child imports the shared helpers of tests/ (qemutools) as the test process does
CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(CHILD.parents[1]), os.environ.get("PYTHONPATH")])
    ),
}


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
    result = check(path)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    assert result["_rc"] in (0, 3), result


@pytest.mark.parametrize("setup", ["small-clusters", "snapshot", "backing", "tiny-caches"])
def test_kill_at_random_points(tmp_path: Path, setup: str) -> None:
    rnd = random.Random(setup)
    path = tmp_path / "img.qcow2"
    if setup in ("small-clusters", "tiny-caches"):
        # 512-byte clusters: new refcount blocks and refcount table growth under fire
        create_qcow2(path, 24 * 1024 * 1024, cluster_size=512)
    elif setup == "snapshot":
        create_qcow2(path, 8 * 1024 * 1024)
        qemu_io(path, "write -P 0x11 0 6M", "write -z 6M 1M")
        run("qemu-img", "snapshot", "-c", "s1", path)
    else:
        base = tmp_path / "base.qcow2"
        create_qcow2(base, 6 * 1024 * 1024)
        qemu_io(base, "write -P 0x22 0 6M")
        create_qcow2(path, 8 * 1024 * 1024, cluster_size=4096, backing_file="base.qcow2",
                     backing_fmt="qcow2")  # fmt: skip
    for round_ in range(8):
        kill_after(path, rnd.randrange(1 << 30), rnd.randrange(1, 300), tiny=setup == "tiny-caches")
        assert_consistent(path)
        if setup == "snapshot":
            # the snapshot is never touched by writes to the active layer
            out = tmp_path / f"snap{round_}.raw"
            run("qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", path, out)
            data = out.read_bytes()
            assert data[: 6 << 20] == b"\x11" * (6 << 20)
            assert data[6 << 20 :] == bytes(2 << 20)
