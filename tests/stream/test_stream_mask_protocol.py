"""backing-mask-protocol with the base opened as a bare ``file`` node
(docs/qemu-behaviour/blockdev.md §4), and the copy-on-read filter used on its own through
blockdev-add."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from kit.chains import Layer, build, qcow2
from kit.daemons import Harness
from kit.qemu import KIB, MIB, check, compare, create, image_info, own_data, snapshot, write

from blockd.block.drivers.copy_on_read import CopyOnReadDriver
from blockd.block.node import BlockNode


@pytest.mark.parametrize(("mask", "fmt"), [(True, "raw"), (False, "file"), (None, "file")])
async def test_base_as_protocol_node(
    harness: Harness, tmp_path: Path, mask: bool | None, fmt: str
) -> None:
    base, mid, top = build(
        tmp_path,
        Layer("base.raw", 1 * MIB, ["write -P 0x21 0 1M"]),
        Layer("mid.qcow2", writes=["write -P 0x22 256k 64k"], absolute=True),
        Layer("top.qcow2", absolute=True),
    )
    before = snapshot(top, tmp_path / "before.qcow2")
    h = harness
    await h.raw("blockdev-add", {"driver": "file", "node-name": "base", "filename": str(base)})
    await h.add(qcow2(mid, "mid", backing="base"))
    await h.add(qcow2(top, "top", backing="mid"))
    extra = {} if mask is None else {"backing_mask_protocol": mask}
    await h.cmd("block-stream", device="top", job_id="j", base_node="base", **extra)
    done = await h.wait_done("j")
    assert "error" not in done
    for name in ("top", "mid", "base"):
        await h.cmd("blockdev-del", node_name=name)
    header = image_info(top)
    assert header["backing-filename"] == str(base)
    assert header["backing-filename-format"] == fmt
    check(top)
    compare(top, before)
    assert own_data(top) == [(256 * KIB, 64 * KIB)]


async def test_copy_on_read_filter_alone(harness: Harness, tmp_path: Path) -> None:
    """Reads through a copy-on-read node store what they read into its child; with
    ``bottom`` only data of layers down to the bottom are copied."""
    base = create(tmp_path / "base.qcow2", 1 * MIB)
    write(base, 0, 64 * KIB, 0x31)
    mid = create(tmp_path / "mid.qcow2", None, base)
    write(mid, 512 * KIB, 64 * KIB, 0x32)
    top = create(tmp_path / "top.qcow2", None, mid)
    h = harness
    await h.add(qcow2(mid, "mid"))
    await h.add(qcow2(top, "top", backing="mid"))
    assert (
        await h.error(
            "blockdev-add", driver="copy-on-read", node_name="bad", file="top", bottom="nowhere"
        )
        == "Bottom node 'nowhere' not found"
    )
    await h.raw(
        "blockdev-add",
        {"driver": "copy-on-read", "node-name": "cor", "file": "top", "bottom": "mid"},
    )
    cor = h.d.graph.find("cor")
    assert cor is not None
    data = await cor.pread(0, 1 * MIB)
    assert data[: 64 * KIB] == bytes([0x31]) * (64 * KIB)
    assert data[512 * KIB : 576 * KIB] == bytes([0x32]) * (64 * KIB)
    for name in ("cor", "top", "mid"):
        await h.cmd("blockdev-del", node_name=name)
    check(top)
    assert own_data(top) == [(512 * KIB, 64 * KIB)]  # mid's data copied, base's not


async def filter_over_top(h: Harness, tmp_path: Path) -> tuple[Path, BlockNode, BlockNode]:
    """top (empty) over base (1 MiB of 0x51), with a copy-on-read node ``cor`` on top:
    top's path, the filter node and top's node."""
    base = create(tmp_path / "base.qcow2", 1 * MIB)
    write(base, 0, 1 * MIB, 0x51)
    top = create(tmp_path / "top.qcow2", None, base)
    await h.add(qcow2(top, "top"))
    await h.raw("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top"})
    cor, top_node = h.d.graph.find("cor"), h.d.graph.find("top")
    assert cor is not None and top_node is not None
    return top, cor, top_node


async def test_copy_never_overwrites_a_concurrent_write(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write through the filter that arrives while a copy is between its read and its
    write is not lost to the stale copied data."""
    h = harness
    top, cor, top_node = await filter_over_top(h, tmp_path)
    driver = cor.driver
    assert isinstance(driver, CopyOnReadDriver)
    new = bytes([0x77]) * (64 * KIB)
    real_read = top_node.driver.read

    async with trio.open_nursery() as nursery:

        async def read_then_race(offset: int, buf: memoryview) -> None:
            await real_read(offset, buf)
            # The copy has read the old data: a guest write comes in now.
            nursery.start_soon(cor.write, 128 * KIB, new)
            await trio.testing.wait_all_tasks_blocked()

        monkeypatch.setattr(top_node.driver, "read", read_then_race)
        await driver.prefetch(0, 512 * KIB)
        monkeypatch.undo()
    assert await cor.pread(128 * KIB, 64 * KIB) == new
    assert await cor.pread(0, 64 * KIB) == bytes([0x51]) * (64 * KIB)
    await h.cmd("blockdev-del", node_name="cor")
    await h.cmd("blockdev-del", node_name="top")
    check(top)


async def test_a_write_waits_for_a_claimed_offloaded_copy(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream's way: a copy claimed under the filter's lock runs without it; a guest
    write to the claimed range arriving mid-copy waits for the copy, then wins."""
    h = harness
    top, cor, top_node = await filter_over_top(h, tmp_path)
    assert top_node.file is not None
    driver = cor.driver
    assert isinstance(driver, CopyOnReadDriver)
    new = bytes([0x77]) * (64 * KIB)
    file_driver = top_node.file.driver
    real_copy_in = file_driver.copy_in
    raced: list[bool] = []

    async with trio.open_nursery() as nursery:

        async def copy_then_race(offset: int, extents: object) -> None:
            await real_copy_in(offset, extents)  # type: ignore[arg-type]
            # The data is copied, the L2 entries not yet linked: a guest write comes in.
            nursery.start_soon(cor.write, 128 * KIB, new)
            await trio.testing.wait_all_tasks_blocked()
            raced.append(await top_node.pread(128 * KIB, 64 * KIB) == new)

        monkeypatch.setattr(file_driver, "copy_in", copy_then_race)
        async with driver.serial:
            driver.claim(0, 512 * KIB)
        await driver.copy_claimed(0, 512 * KIB)
        monkeypatch.undo()
    assert raced == [False]  # the copy really was offloaded, and the write waited
    assert await cor.pread(128 * KIB, 64 * KIB) == new
    assert await cor.pread(0, 64 * KIB) == bytes([0x51]) * (64 * KIB)
    await h.cmd("blockdev-del", node_name="cor")
    await h.cmd("blockdev-del", node_name="top")
    check(top)
    assert own_data(top) == [(0, 512 * KIB)]  # the copy and the write, both in top
