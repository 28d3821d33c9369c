"""blockdev-add, blockdev-del and query-named-block-nodes as handlers run on a Daemon."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from kit.chains import file_ref
from kit.cli import BLOCKD
from kit.daemons import replies
from kit.qemu import image_info, qemu_img, qemu_io
from kit.schema import schema_errors

from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from blockd.errors import QMPError

COMMANDS = load_all()


async def run(d: Daemon, name: str, **arguments: Any) -> Any:
    if name != "blockdev-add":
        assert not schema_errors(f"commands/{name}.json", arguments)
    return await COMMANDS[name].call(d, arguments)


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        await d.graph.close_all()


def top_options(chain: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": "top", "file": file_ref(chain["top"]), **extra}


async def test_add_query_and_delete(daemon: Daemon, chain: dict[str, Path]) -> None:
    options = top_options(chain)
    assert not schema_errors("commands/blockdev-add.json", options)
    assert await run(daemon, "blockdev-add", **options) == {}
    nodes = await run(daemon, "query-named-block-nodes")
    assert not schema_errors("types/BlockDeviceInfo.json", nodes[0])
    assert [n["drv"] for n in nodes] == ["raw", "file", "qcow2", "file", "qcow2", "file"]
    top = nodes[4]
    assert top["node-name"] == "top" and top["ro"] is False and top["file"] == str(chain["top"])
    assert top["backing_file"] == str(chain["mid"])
    assert top["backing_file_depth"] == 2
    assert top["children"] == [
        {"child": "file", "node-name": nodes[5]["node-name"]},
        {"child": "backing", "node-name": nodes[2]["node-name"]},
    ]
    assert top["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    assert (top["active"], top["encrypted"], top["detect_zeroes"]) == (True, False, "off")
    assert all(top[k] == 0 for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"))

    # ImageInfo against qemu-img's view of the same chain
    expected = image_info(chain["top"])
    image = top["image"]
    for key in (
        "filename",
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "dirty-flag",
    ):
        assert image[key] == expected[key], key
    assert image["format-specific"]["type"] == "qcow2"
    assert image["actual-size"] == os.stat(chain["top"]).st_blocks * 512
    mid_image = image["backing-image"]
    assert mid_image["filename"] == str(chain["mid"])
    assert mid_image["backing-filename"] == "base.raw"
    assert mid_image["full-backing-filename"] == str(chain["base"])
    assert mid_image["backing-image"]["format"] == "raw"
    assert "backing-image" not in mid_image["backing-image"]
    protocol = nodes[5]["image"]
    assert protocol["format"] == "file"
    assert protocol["virtual-size"] == -(-os.path.getsize(chain["top"]) // 512) * 512
    assert protocol["format-specific"] == {"type": "file", "data": {}}

    flat = await run(daemon, "query-named-block-nodes", flat=True)
    assert [n["node-name"] for n in flat] == [n["node-name"] for n in nodes]
    assert all(n["backing_file_depth"] == 0 and "backing-image" not in n["image"] for n in flat)
    assert not schema_errors("commands/query-named-block-nodes.json", {"flat": True})

    generated = nodes[5]["node-name"]  # top's file node
    with pytest.raises(QMPError) as info:
        await run(daemon, "blockdev-del", **{"node-name": generated})
    assert info.value.desc == f"Node {generated} is not owned by the monitor"
    backing = nodes[2]["node-name"]  # the backing blocker is checked first (QEMU's order)
    with pytest.raises(QMPError) as info:
        await run(daemon, "blockdev-del", **{"node-name": backing})
    assert info.value.desc == f"Node '{backing}' is busy: node is used as backing hd of 'top'"
    with pytest.raises(QMPError) as info:
        await run(daemon, "blockdev-del", **{"node-name": "nope"})
    assert info.value.desc == "Failed to find node with node-name='nope'"

    assert await run(daemon, "blockdev-del", **{"node-name": "top"}) == {}
    assert await run(daemon, "query-named-block-nodes") == []
    qemu_io("-c", "write -P 9 0 4096", chain["top"])  # locks released at once
    assert "No errors" in qemu_img("check", chain["top"]).stdout


async def test_delete_of_a_child_is_refused(daemon: Daemon, chain: dict[str, Path]) -> None:
    await run(
        daemon, "blockdev-add", driver="raw", **{"node-name": "base"}, file=file_ref(chain["base"])
    )
    await run(
        daemon,
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "mid", "read-only": True},
        file=file_ref(chain["mid"]),
        backing="base",
    )
    with pytest.raises(QMPError) as info:
        await run(daemon, "blockdev-del", **{"node-name": "base"})
    assert info.value.desc == "Node 'base' is busy: node is used as backing hd of 'mid'"
    node = daemon.graph.find("mid")
    assert node is not None
    node.block("block device is in use by block job: stream")
    with pytest.raises(QMPError) as info:
        await run(daemon, "blockdev-del", **{"node-name": "mid"})
    assert info.value.desc == "Node 'mid' is busy: block device is in use by block job: stream"
    node.unblock("block device is in use by block job: stream")
    await run(daemon, "blockdev-del", **{"node-name": "mid"})
    await run(daemon, "blockdev-del", **{"node-name": "base"})
    assert daemon.graph.nodes == {}


async def test_backing_null_keeps_header_strings(daemon: Daemon, chain: dict[str, Path]) -> None:
    await run(daemon, "blockdev-add", **top_options(chain, backing=None))
    nodes = await run(daemon, "query-named-block-nodes")
    top = nodes[0]
    assert "backing_file" not in top and top["backing_file_depth"] == 0
    assert top["image"]["backing-filename"] == str(chain["mid"])
    assert "backing-image" not in top["image"]
    assert json.loads(json.dumps(nodes)) == nodes


async def test_failed_add_leaves_nothing(
    daemon: Daemon, chain: dict[str, Path], tmp_path: Path
) -> None:
    options = top_options(chain)
    options["file"]["filename"] = str(tmp_path / "missing.qcow2")
    with pytest.raises(QMPError, match="No such file or directory"):
        await run(daemon, "blockdev-add", **options)
    with pytest.raises(QMPError, match="'node-name' must be specified for the root node"):
        await run(daemon, "blockdev-add", driver="file", filename=str(chain["base"]))
    assert await run(daemon, "query-named-block-nodes") == []


@pytest.mark.parametrize("size", [256, 1000, 8192])
async def test_l2_cache_entry_size_is_checked(
    daemon: Daemon, chain: dict[str, Path], size: int
) -> None:
    """QEMU's rule and words: a power of two from 512 up to the cluster size (top's is
    4 KiB)."""
    with pytest.raises(QMPError) as err:
        await run(daemon, "blockdev-add", **top_options(chain, **{"l2-cache-entry-size": size}))
    assert err.value.desc == (
        "L2 cache entry size must be a power of two between 512 and the cluster size (4096)"
    )
    assert err.value.error_class == "GenericError"
    assert await run(daemon, "query-named-block-nodes") == []
    await run(daemon, "blockdev-add", **top_options(chain, **{"l2-cache-entry-size": 512}))
    await run(daemon, "blockdev-del", **{"node-name": "top"})


async def test_raw_reads_and_writes_through_handlers(
    daemon: Daemon, chain: dict[str, Path]
) -> None:
    await run(
        daemon, "blockdev-add", driver="raw", **{"node-name": "b"}, file=file_ref(chain["base"])
    )
    node = daemon.graph.find("b")
    assert node is not None
    await node.write(4096, b"\x07" * 4096)
    await node.flush()
    await run(daemon, "blockdev-del", **{"node-name": "b"})
    assert chain["base"].read_bytes()[4096:8192] == b"\x07" * 4096
    assert (
        qemu_img("compare", "-f", "raw", "-F", "raw", chain["base"], chain["base"]).returncode == 0
    )


async def test_through_the_socket(sock_dir: Path, chain: dict[str, Path]) -> None:
    """A blockd process started like qemu-storage-daemon, driven over its QMP socket."""
    top = {"driver": "qcow2", "node-name": "top", "file": file_ref(chain["top"])}
    commands: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"driver": "raw", "node-name": "r", "backing": None, "file": "x"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "backing": 5, "file": "x"}),
        ("blockdev-add", {"driver": "file", "node-name": "q"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {"driver": "file"}}),
        ("blockdev-del", {}),
        ("query-named-block-nodes", {"flat": "yes"}),
        ("blockdev-add", {**top, "file": {**file_ref(chain["top"]), "locking": "maybe"}}),
        ("blockdev-add", top),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "top"}),
    ]
    answers = await trio.to_thread.run_sync(replies, BLOCKD, sock_dir, commands, [chain["top"]])
    errors = [reply["error"]["desc"] for reply in answers[:7]]
    assert errors == [
        "Parameter 'backing' is unexpected",
        "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
        "Parameter 'filename' is missing",
        "Parameter 'file.filename' is missing",
        "Parameter 'node-name' is missing",
        "Invalid parameter type for 'flat', expected: boolean",
        "Parameter 'locking' does not accept value 'maybe'",
    ]
    assert answers[7] == {"return": {}}
    nodes = answers[8]["return"]
    assert [n["drv"] for n in nodes] == ["raw", "file", "qcow2", "file", "qcow2", "file"]
    assert all(not schema_errors("types/BlockDeviceInfo.json", n) for n in nodes)
    assert answers[9] == {"return": {}}
    assert answers[10] == {"return": [[]]}  # no lock byte left on the image after del
