"""block-stream's refusals, in QEMU's order and with its texts
(docs/qemu-behaviour/block-stream.md §3, iotest 030)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from kit.chains import qcow2
from kit.daemons import Harness
from kit.qemu import KIB, MIB, check, create, image_info, write

from blockd.block.host.locking import Perm
from blockd.block.node import NodeUser
from blockd.errors import QMPError

EXCLUSIVE = [
    (
        {"base": "x", "base_node": "y"},
        "'base' and 'base-node' cannot be specified at the same time",
    ),
    ({"base": "x", "bottom": "y"}, "'base' and 'bottom' cannot be specified at the same time"),
    (
        {"bottom": "x", "base_node": "y"},
        "'bottom' and 'base-node' cannot be specified at the same time",
    ),
]


@pytest.fixture
async def chain(harness: Harness, tmp_path: Path) -> Harness:
    """node0 (qcow2) <- node1 <- node2 <- node3, all added by name."""
    previous: str | None = None
    for index in range(4):
        path = create(tmp_path / f"img{index}.qcow2", 1 * MIB)
        write(path, index * 128 * KIB, 64 * KIB, 0x10 + index)
        options: dict[str, object] = qcow2(path, f"node{index}")
        options["backing"] = previous
        await harness.raw("blockdev-add", options)
        previous = f"node{index}"
    return harness


@pytest.mark.parametrize(("args", "text"), EXCLUSIVE)
async def test_exclusive_arguments_come_first(
    harness: Harness, args: dict[str, str], text: str
) -> None:
    # Checked before the device is even looked up.
    assert await harness.error("block-stream", device="nonexistent", **args) == text


async def test_device_not_found(harness: Harness) -> None:
    assert await harness.error("block-stream", device="nonexistent") == (
        "Cannot find device='nonexistent' nor node-name='nonexistent'"
    )


async def test_base_node_errors(chain: Harness) -> None:
    """test_stream_base_node_name."""
    h = chain
    assert await h.error("block-stream", device="node2", base_node="none") == (
        "Cannot find device='' nor node-name='none'"
    )
    assert await h.error("block-stream", device="node1", base_node="node3") == (
        "Node 'node3' is not a backing image of 'node1'"
    )
    assert await h.error("block-stream", device="node2", base_node="node2") == (
        "Node 'node2' is not a backing image of 'node2'"
    )
    assert await h.error("block-stream", device="node3", base="/no/such/file") == (
        "Can't find '/no/such/file' in the backing chain"
    )
    assert h.events == []
    await h.cmd("block-stream", device="node3", job_id="ok", base_node="node1")
    await h.wait_done("ok")


async def test_bottom_errors(chain: Harness) -> None:
    h = chain
    assert await h.error("block-stream", device="node2", bottom="none") == (
        "Cannot find device='' nor node-name='none'"
    )
    assert await h.error("block-stream", device="node1", bottom="node3") == (
        "Node 'node3' is not in a chain starting from 'node1'"
    )
    await h.raw("blockdev-add", {"driver": "copy-on-read", "node-name": "f", "file": "node3"})
    assert await h.error("block-stream", device="f", bottom="f") == (
        "Node 'f' is a filter, use a non-filter node as 'bottom'"
    )
    assert await h.error("block-stream", device="node3", bottom="node1", backing_file="x") == (
        "backing file specified, but streaming the entire chain"
    )
    assert await h.error("block-stream", device="node3", backing_file="x") == (
        "backing file specified, but streaming the entire chain"
    )


async def test_job_id_errors(chain: Harness) -> None:
    h = chain
    assert await h.error("block-stream", device="node3", job_id="1bad") == "Invalid job ID '1bad'"
    assert await h.error("block-stream", device="node3", job_id="") == "Invalid job ID ''"
    assert h.events == []
    # Nothing left behind: the filter is gone and nothing is blocked.
    names = {n["node-name"] for n in await h.cmd("query-named-block-nodes")}
    assert names == {"node0", "node1", "node2", "node3"} | {
        n.name for n in h.d.graph.nodes.values() if n.drv == "file"
    }
    assert all(not n.blockers for n in h.d.graph.nodes.values())
    assert all(n.drv != "copy-on-read" for n in h.d.graph.nodes.values())


async def test_bad_filter_node_name(chain: Harness) -> None:
    h = chain
    assert await h.error("block-stream", device="node3", job_id="j", filter_node_name="9x") == (
        "Could not create node: Invalid node-name: '9x'"
    )
    assert (
        await h.error("block-stream", device="node3", job_id="j", filter_node_name="node1")
        == "Could not create node: Duplicate nodes with node-name='node1'"
    )
    assert h.events == []
    assert all(n.drv != "copy-on-read" for n in h.d.graph.nodes.values())


async def test_invalid_speed_leaves_no_job(chain: Harness) -> None:
    """test_set_speed_invalid: created then null, then the error."""
    h = chain
    assert await h.error("block-stream", device="node3", job_id="j", speed=-1) == (
        "Parameter 'speed' expects a non-negative value"
    )
    assert h.names() == ["JSC(created)", "JSC(null)"]
    assert await h.cmd("query-block-jobs") == []
    assert all(not n.blockers and not n.users for n in h.d.graph.nodes.values())
    assert all(n.drv != "copy-on-read" for n in h.d.graph.nodes.values())
    # The chain still streams afterwards.
    await h.cmd("block-stream", device="node3", job_id="j")
    done = await h.wait_done("j")
    assert "error" not in done


async def test_read_only_top_with_read_only_file(harness: Harness, tmp_path: Path) -> None:
    """test_read_only: the file child is read-only, so the top cannot be reopened."""
    base = create(tmp_path / "base.qcow2", 1 * MIB)
    mid = create(tmp_path / "mid.qcow2", None, base)
    top = create(tmp_path / "top.qcow2", None, mid)
    h = harness
    await h.add(qcow2(base, "base"))
    await h.add(qcow2(mid, "mid", backing="base"))
    await h.raw(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "ro-top",
            "read-only": True,
            "backing": "mid",
            "file": {"driver": "file", "filename": str(top), "read-only": True},
        },
    )
    assert await h.error("block-stream", device="ro-top", job_id="j", base_node="base") == (
        "Block node is read-only"
    )
    assert h.events == []
    await h.cmd("blockdev-del", node_name="ro-top")


async def test_read_only_top_is_reopened_and_restored(harness: Harness, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 1 * MIB)
    write(base, 0, 64 * KIB, 0x77)
    top = create(tmp_path / "top.qcow2", None, base)
    h = harness
    await h.add(qcow2(top, "top", **{"read-only": True}))
    await h.cmd("block-stream", device="top", job_id="j")
    done = await h.wait_done("j")
    assert "error" not in done
    node = h.d.graph.find("top")
    assert node is not None and node.read_only
    nodes = {n["node-name"]: n for n in await h.cmd("query-named-block-nodes")}
    assert nodes["top"]["ro"] is True
    await h.cmd("blockdev-del", node_name="top")
    check(top)
    assert "backing-filename" not in image_info(top)


async def test_concurrent_requests_on_one_chain(chain: Harness) -> None:
    """Two block-stream requests at once (two clients): one wins, the other is refused
    by the busy check; they never both hold the chain."""
    h = chain
    results: dict[str, str] = {}

    async def request(job_id: str) -> None:
        try:
            await h.cmd("block-stream", device="node3", job_id=job_id, speed=1024)
            results[job_id] = "ok"
        except QMPError as exc:
            results[job_id] = exc.desc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "a")
        nursery.start_soon(request, "b")
    assert sorted(results.values()) == [
        "Node 'node3' is busy: block device is in use by block job: stream",
        "ok",
    ]
    [winner] = [job_id for job_id, text in results.items() if text == "ok"]
    await h.cmd("block-job-cancel", device=winner)
    await h.wait_done(winner)


async def test_permission_conflict_fails_early(harness: Harness, tmp_path: Path) -> None:
    """A writer on an intermediate node (here a stand-in for an export) conflicts with
    the job's hold on it: created then null, then QEMU's conflict text
    (docs/qemu-behaviour/block-stream.md §6)."""
    base = create(tmp_path / "base.qcow2", 1 * MIB)
    mid = create(tmp_path / "mid.qcow2", None, base)
    top = create(tmp_path / "top.qcow2", None, mid)
    h = harness
    await h.add(qcow2(mid, "fmt_base"))
    await h.add(qcow2(top, "top", backing="fmt_base"))
    node = h.d.graph.find("fmt_base")
    assert node is not None
    writer = NodeUser("an unnamed block device", "root", Perm.CONSISTENT_READ | Perm.WRITE)
    h.d.graph.add_user(node, writer)
    assert await h.error("block-stream", device="top", job_id="job0") == (
        "Permission conflict on node 'fmt_base': permissions 'write' are both required by "
        "an unnamed block device (uses node 'fmt_base' as 'root' child) and unshared by "
        "stream job 'job0' (uses node 'fmt_base' as 'intermediate node' child)."
    )
    assert h.names() == ["JSC(created)", "JSC(null)"]
    assert node.users == [writer] and not node.blockers
    assert all(n.drv != "copy-on-read" for n in h.d.graph.nodes.values())
    await h.d.graph.remove_user(node, writer)
    await h.cmd("block-stream", device="top", job_id="job0")
    assert "error" not in await h.wait_done("job0")
