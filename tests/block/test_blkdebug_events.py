"""blkdebug driven by the debug events the format drivers fire
(docs/qemu-behaviour/blockdev.md §3).

A rule only arms when its event fires: qcow2 fires ``read_aio`` right before a data
read of its file, ``l2_load`` before an L2 table read, ``cluster_alloc``, ``write_aio``,
``cow_write``, ``l1_update``, ``refblock_update`` ... on its ``file`` child, raw fires
``read_aio``/``write_aio``. The comparison runs the same requests through QEMU 10.0's
block layer (its ``qemu-io``, shipped with its qemu-storage-daemon) and through blockd,
and compares which request fails with which error, then ``qemu-img check`` of both.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from kit.chains import BLKDEBUG_030_CONF, Layer, build, file_ref, qcow2
from kit.qemu import QEMU10_BIN, QEMU10_IO, check_report, qemu_img, qemu_io, run_tool

from blockd.block.drivers.blkdebug import InjectRule, RuleEngine, SetStateRule
from blockd.block.graph import Graph

KIB = 1024
needs_qemu10 = pytest.mark.skipif(
    not (QEMU10_IO.exists() and (QEMU10_BIN / "qemu-storage-daemon").exists()),
    reason="no QEMU 10.0 binaries",
)

# (operation, offset, length)
Op = tuple[str, int, int]


def make_chain(tmp_path: Path) -> Path:
    """base (1 MiB of 0x01) <- top (64 KiB of 0x02 at 512 KiB), both 2 MiB qcow2."""
    return build(
        tmp_path,
        Layer("base.qcow2", "2M", ["write -P 1 0 1M"]),
        Layer("top.qcow2", writes=["write -P 2 512k 64k"]),
    )[-1]


def options(top: Path, rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": "top",
        "file": {"driver": "blkdebug", **rules, "image": file_ref(top)},
    }


def qemu_results(top: Path, rules: dict[str, Any], ops: list[Op]) -> list[str]:
    """Run ``ops`` through QEMU 10.0's qemu-io; one result string per op."""
    args: list[str] = [str(QEMU10_IO)]
    for op, offset, length in ops:
        args += [
            "-c",
            f"{op} -P 3 {offset} {length}" if op == "write" else f"{op} {offset} {length}",
        ]
    args.append("json:" + json.dumps(options(top, rules)))
    out = run_tool(*args, check=False)
    results = []
    for line in (out.stdout + out.stderr).splitlines():
        if " failed: " in line:
            results.append(line.split(" failed: ", 1)[1])
        elif line.startswith(("read ", "wrote ")):
            results.append("ok")
    assert len(results) == len(ops), out
    return results


async def blockd_results(top: Path, rules: dict[str, Any], ops: list[Op]) -> list[str]:
    graph = new_graph()
    results = []
    try:
        with trio.fail_after(30):
            node = await graph.open_node(options(top, rules), top_level=True)
            for op, offset, length in ops:
                try:
                    if op == "read":
                        await node.pread(offset, length)
                    else:
                        await node.write(offset, b"\x03" * length)
                    results.append("ok")
                except OSError as exc:
                    assert exc.errno is not None
                    results.append(os.strerror(exc.errno))
    finally:
        with trio.fail_after(30):
            await graph.close_all()
    return results


def new_graph() -> Graph:
    return Graph()


READS: list[Op] = [("read", 0, 64 * KIB), ("read", 512 * KIB, 64 * KIB)] * 2
WRITES: list[Op] = [
    ("write", 1024 * KIB, 64 * KIB),
    ("write", 256 * KIB + 4 * KIB, 8 * KIB),
    ("read", 1024 * KIB, 64 * KIB),
    ("write", 512 * KIB, 64 * KIB),
]

RULE_SETS: dict[str, tuple[dict[str, Any], list[Op]]] = {
    # no sector: open reads the header and the L1 table unharmed; the first data read
    # of the qcow2 (not the backing read at 0, which fires read_backing_aio) fails
    "read_aio-any": ({"inject-error": [{"event": "read_aio", "once": True}]}, READS),
    "read_aio-sector": (
        {"inject-error": [{"event": "read_aio", "sector": 660}]},
        READS,
    ),
    "l2_load-once": ({"inject-error": [{"event": "l2_load", "once": True}]}, READS),
    "read_backing_aio": (
        {"inject-error": [{"event": "read_backing_aio", "errno": errno.ENOSPC, "once": True}]},
        READS,
    ),
    "state-machine": (
        {
            "inject-error": [{"event": "read_aio", "state": 2, "errno": errno.EIO}],
            "set-state": [
                {"event": "read_aio", "state": 1, "new_state": 2},
                {"event": "read_aio", "state": 2, "new_state": 1},
            ],
        },
        READS,
    ),
    "write_aio-once": (
        {"inject-error": [{"event": "write_aio", "errno": errno.ENOSPC, "once": True}]},
        WRITES,
    ),
    "cow_write": ({"inject-error": [{"event": "cow_write", "once": True}]}, WRITES),
}


@needs_qemu10
@pytest.mark.parametrize("name", sorted(RULE_SETS))
async def test_same_failures_as_qemu_10(tmp_path: Path, name: str) -> None:
    rules, ops = RULE_SETS[name]
    (tmp_path / "q").mkdir()
    (tmp_path / "b").mkdir()
    q_top = make_chain(tmp_path / "q")
    b_top = make_chain(tmp_path / "b")
    theirs = await trio.to_thread.run_sync(qemu_results, q_top, rules, ops)
    mine = await blockd_results(b_top, rules, ops)
    assert mine == theirs
    assert "ok" in theirs and any(r != "ok" for r in theirs)  # the rule set is a real test
    for top in (q_top, b_top):
        assert check_report(top).get("corruptions", 0) == 0
    # the data each side left behind is the same (a failed write changed nothing visible)
    assert qemu_img("compare", "-q", q_top, b_top, check=False).returncode == 0


async def test_read_aio_rule_without_sector_opens(tmp_path: Path) -> None:
    """QEMU opens such an image; the rule waits for the first data read."""
    top = make_chain(tmp_path)
    rules = {"inject-error": [{"event": "read_aio", "errno": errno.EIO}]}
    results = await blockd_results(top, rules, READS)
    assert results == ["ok", "Input/output error", "ok", "Input/output error"]


async def test_iotest_030_backing_fails_second_chunk_once(tmp_path: Path) -> None:
    """TestEIO's setup: raw backing over blkdebug with the state 1/2 flip; reading the
    image in 512 KiB chunks fails exactly the second chunk, once."""
    backing = tmp_path / "backing.img"
    qemu_img("create", "-q", "-f", "raw", backing, "2M")
    config = tmp_path / "blkdebug.conf"
    config.write_text(BLKDEBUG_030_CONF)
    top = tmp_path / "test.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", f"blkdebug:{config}:{backing}", top)
    graph = new_graph()
    graph.allow_header_json = True  # the daemon's --allow-header-json
    try:
        node = await graph.open_node(qcow2(top), top_level=True)
        outcome = []
        for _ in range(2):
            for chunk in range(4):
                try:
                    await node.pread(chunk * 512 * KIB, 512 * KIB)
                    outcome.append("ok")
                except OSError as exc:
                    outcome.append(errno.errorcode[exc.errno or 0])
        assert outcome == ["ok", "EIO", "ok", "ok", "ok", "ok", "ok", "ok"]
    finally:
        await graph.close_all()


async def test_failed_write_leaks_nothing(tmp_path: Path) -> None:
    """An allocating write that fails gives its clusters back: ``qemu-img check`` is
    clean (QEMU frees them as well); a later write still lands correctly."""
    top = make_chain(tmp_path)
    rules = {"inject-error": [{"event": "write_aio", "errno": errno.ENOSPC, "once": True}]}
    results = await blockd_results(
        top, rules, [("write", 1024 * KIB, 128 * KIB), ("write", 1536 * KIB, 4 * KIB)]
    )
    assert results == ["No space left on device", "ok"]
    report = check_report(top)
    assert report["exit"] == 0, report
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    assert await blockd_results(top, {}, [("write", 1024 * KIB, 128 * KIB)]) == ["ok"]
    assert qemu_img("check", top, check=False).returncode == 0
    expect = qemu_io("-f", "qcow2", "-c", "read -P 3 1M 128k", top, check=False)
    assert "Pattern verification failed" not in expect.stdout
    assert shutil.which("qemu-img") is not None


def test_first_matching_set_state_rule_wins() -> None:
    """QEMU keeps a node's rules per event newest first and applies the last new state
    it meets: the first rule given wins; every rule sees the state before the event."""
    engine = RuleEngine(
        [InjectRule("read_aio", state=2)],
        [SetStateRule("read_aio", 3), SetStateRule("read_aio", 4), SetStateRule("l2_load", 2, 3)],
    )
    engine.event("read_aio")
    assert engine.state == 3 and engine.active == []  # the inject rule needed state 2
    engine.event("l2_load")
    assert engine.state == 2
    engine.event("read_aio")
    assert engine.state == 3 and len(engine.active) == 1
    assert engine.check(0, 512, "read") is engine.active[0]


@needs_qemu10
@pytest.mark.parametrize("event", ["write_aio", "cow_write", "cluster_alloc"])
async def test_partial_writes_on_fresh_image_as_qemu_10(tmp_path: Path, event: str) -> None:
    """Copy-on-write areas that read as zeros (no backing, zero clusters): QEMU writes
    zeros and then the data (write_aio), not a COW write."""
    ops: list[Op] = [
        ("write", 4 * KIB, 4 * KIB),
        ("write", 200 * KIB, 300 * KIB),
        ("write", 68 * KIB, 4 * KIB),
        ("read", 0, 512 * KIB),
    ]
    rules = {"inject-error": [{"event": event, "errno": errno.EIO, "once": True}]}
    tops = []
    for side in ("q", "b"):
        (tmp_path / side).mkdir()
        top = tmp_path / side / "fresh.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", top, "1M")
        tops.append(top)
    theirs = await trio.to_thread.run_sync(qemu_results, tops[0], rules, ops)
    mine = await blockd_results(tops[1], rules, ops)
    assert mine == theirs
    for top in tops:
        assert qemu_img("check", top, check=False).returncode == 0
    assert qemu_img("compare", "-q", *tops, check=False).returncode == 0
