"""Host I/O advice: write-behind (the file driver starts writeback while writing goes
on; a failure of that background call surfaces at the next flush) and hole punching."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from blockd.block.graph import Graph
from blockd.block.host import io as hostio
from blockd.block.host import writebehind
from blockd.block.node import BlockNode

MIB = 1024 * 1024


async def open_file(graph: Graph, path: Path, **options: object) -> BlockNode:
    path.write_bytes(b"")
    return await graph.open_node(
        {"driver": "file", "node-name": "f", "filename": str(path), **options}, top_level=True
    )


def record_calls(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    calls: list[int] = []

    def start(fd: int) -> None:
        calls.append(fd)
        if fail:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(hostio, "writeback_call", lambda: start)
    return calls


async def wait_calls(calls: list[int], count: int) -> None:
    with trio.fail_after(5):
        while len(calls) < count:
            await trio.sleep(0.001)


async def test_writeback_starts_every_threshold_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch)
    graph = Graph()
    try:
        node = await open_file(graph, tmp_path / "f")
        chunk = bytes(MIB)
        for k in range(writebehind.THRESHOLD // MIB - 1):
            await node.write(k * MIB, chunk)
        await trio.sleep(0.01)
        assert calls == []  # not enough written yet
        await node.write(writebehind.THRESHOLD - MIB, chunk)
        await wait_calls(calls, 1)
        assert calls == [node.driver.fd]  # type: ignore[attr-defined]
    finally:
        await graph.close_all()


async def test_a_failed_background_writeback_fails_the_next_flush_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch, fail=True)
    graph = Graph()
    try:
        node = await open_file(graph, tmp_path / "f")
        await node.write(0, bytes(writebehind.THRESHOLD))
        await wait_calls(calls, 1)
        await trio.sleep(0.01)  # the result is delivered back to the trio thread
        with pytest.raises(OSError) as raised:
            await node.flush()
        assert raised.value.errno == errno.EIO
        await node.flush()  # reported once
    finally:
        await graph.close_all()


@pytest.mark.parametrize("cache", [{"no-flush": True}, {"direct": True}])
async def test_no_writeback_without_flushes_or_with_direct_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: dict[str, bool]
) -> None:
    calls = record_calls(monkeypatch)
    graph = Graph()
    try:
        node = await open_file(graph, tmp_path / "f", cache=cache)
        await node.write(0, bytes(writebehind.THRESHOLD))
        await trio.sleep(0.01)
        assert calls == []
    finally:
        await graph.close_all()


async def test_the_real_call_starts_writeback(tmp_path: Path) -> None:
    """The C library's sync_file_range (or fdatasync) runs on a real file."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * MIB)
    with path.open("rb+") as f:
        hostio.writeback_call()(f.fileno())


def test_punch_hole_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * (4 * MIB))
    with path.open("rb+") as f:
        hostio.punch_hole(f.fileno(), MIB, 2 * MIB)
    data = path.read_bytes()
    assert len(data) == 4 * MIB  # the size is kept
    assert data[MIB : 3 * MIB] == bytes(2 * MIB)
    assert data[:MIB] == data[3 * MIB :] == b"x" * MIB
