"""Image locks seen by the real QEMU tools, both ways (QEMU's file-posix lock bytes)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from kit.chains import qcow2
from kit.host import held_bytes
from kit.qemu import qemu_img, qemu_io

from blockd.block.graph import Graph
from blockd.block.host.locking import PERM_ALL, FileLocks, LockError, Perm
from blockd.errors import HostError

WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    return path


@pytest.fixture
def qemu_io_holding(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An interactive ``qemu-io`` with ``image`` open read-write (holds its locks)."""
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


async def wait_for_lock(path: Path, byte: int) -> None:
    with trio.fail_after(10):
        while byte not in held_bytes(path):
            await trio.sleep(0.01)


async def test_read_write_image_refuses_qemu_writers(graph: Graph, image: Path) -> None:
    await graph.open_node(qcow2(image, "img"), top_level=True)
    assert held_bytes(image) == {100, 101, 103, 201, 203}  # what QEMU 10 holds
    result = qemu_io("-c", "write 0 512", image, check=False)
    assert result.returncode != 0 and WRITE_LOCK in result.stderr
    result = qemu_img("info", image, check=False)
    assert result.returncode != 0 and SHARED_WRITE_LOCK in result.stderr
    qemu_img("info", "-U", image)  # force-share still reads
    await graph.delete("img")
    assert held_bytes(image) == set()
    qemu_io("-c", "write 0 512", image)  # released at once


async def test_read_only_image_lets_readers_in(graph: Graph, image: Path) -> None:
    await graph.open_node(qcow2(image, "img", **{"read-only": True}), top_level=True)
    assert held_bytes(image) == {100, 201, 203}
    qemu_img("info", image)
    result = qemu_io("-c", "write 0 512", image, check=False)
    assert WRITE_LOCK in result.stderr


async def test_locking_off(graph: Graph, image: Path) -> None:
    options = qcow2(image, "img")
    options["file"]["locking"] = "off"
    await graph.open_node(options, top_level=True)
    assert held_bytes(image) == set()


async def test_image_held_by_qemu_io_is_refused(
    graph: Graph, image: Path, qemu_io_holding: subprocess.Popen[bytes]
) -> None:
    await wait_for_lock(image, 201)
    with pytest.raises(HostError) as info:
        await graph.open_node(qcow2(image, "img"), top_level=True)
    assert info.value.desc == WRITE_LOCK
    with pytest.raises(HostError) as info:
        await graph.open_node(qcow2(image, "img", **{"read-only": True}), top_level=True)
    assert info.value.desc == SHARED_WRITE_LOCK
    assert graph.nodes == {}
    node = await graph.open_node(
        qcow2(image, "img", **{"read-only": True, "force-share": True}), top_level=True
    )
    assert node.read_only
    await graph.delete("img")
    assert qemu_io_holding.stdin is not None
    qemu_io_holding.stdin.close()
    qemu_io_holding.wait(timeout=10)
    await graph.open_node(qcow2(image, "img"), top_level=True)  # free again


def test_file_locks_conflicts_between_descriptors(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(512))
    fd1, fd2 = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        first, second = FileLocks(fd1), FileLocks(fd2)
        first.update(Perm.CONSISTENT_READ | Perm.WRITE, PERM_ALL & ~Perm.WRITE)
        with pytest.raises(LockError, match='Failed to get "write" lock'):
            second.update(Perm.WRITE, PERM_ALL)
        with pytest.raises(LockError, match='Failed to get shared "write" lock'):
            second.update(Perm.CONSISTENT_READ, Perm.CONSISTENT_READ)
        second.update(Perm.CONSISTENT_READ, PERM_ALL)  # a reader that shares everything
        first.release()
        second.update(Perm.WRITE, PERM_ALL)
    finally:
        os.close(fd1)
        os.close(fd2)
