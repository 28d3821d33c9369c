"""Opening node trees: names, inheritance, backing chains from headers, cleanup."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kit.chains import Layer, build, file_ref, qcow2
from kit.qemu import qemu_img, qemu_io, write

from blockd.block.graph import Graph
from blockd.block.host.locking import Perm
from blockd.block.node import NodeUser
from blockd.block.qcow2.create import create_qcow2
from blockd.errors import QMPError, RequestError

GENERATED = re.compile(r"#block\d+\d\d\Z")


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    """base.raw <- mid.qcow2 (format recorded) <- top.qcow2, relative backing names (this
    module's own, over the folder's: other data)."""
    base, mid, top = build(
        tmp_path,
        Layer("base.raw", "1M", ["write -P 0x11 0 65536"]),
        Layer("mid.qcow2", writes=["write -P 0x22 65536 65536"]),
        Layer("top.qcow2", writes=["write -P 0x33 131072 65536"]),
    )
    return {"base": base, "mid": mid, "top": top}


async def test_backing_chain_from_headers(graph: Graph, chain: dict[str, Path]) -> None:
    top = await graph.open_node(qcow2(chain["top"]), top_level=True)
    mid = top.backing
    assert mid is not None and mid.drv == "qcow2" and mid.filename == str(chain["mid"])
    base = mid.backing
    assert base is not None and base.drv == "raw" and base.filename == str(chain["base"])
    assert base.backing is None
    for node in (mid, base, mid.file, base.file):
        assert node is not None
        assert GENERATED.match(node.name), node.name
        assert node.read_only and not node.monitor_owned
    assert top.implicit_backing and mid.implicit_backing
    assert not top.read_only and top.monitor_owned
    # newest first: base raw, base file, mid qcow2, mid file, top qcow2, top file
    names = [n.name for n in graph.newest_first()]
    assert names == [base.name, base.file.name, mid.name, mid.file.name, "top", top.file.name]  # type: ignore[union-attr]
    data = await top.pread(0, 3 * 65536)
    assert data == b"\x11" * 65536 + b"\x22" * 65536 + b"\x33" * 65536


async def test_backing_null_and_by_name(graph: Graph, chain: dict[str, Path]) -> None:
    alone = await graph.open_node(qcow2(chain["top"], backing=None), top_level=True)
    assert alone.backing is None
    assert await alone.pread(0, 65536) == bytes(65536)
    await graph.delete("top")
    base = await graph.open_node(
        {"driver": "raw", "node-name": "base", "file": file_ref(chain["base"])}, top_level=True
    )
    mid = await graph.open_node(qcow2(chain["mid"], "mid", backing="base"), top_level=True)
    assert mid.backing is base and not mid.implicit_backing
    assert not base.read_only  # a node given by name keeps its own mode
    assert await mid.pread(0, 65536) == b"\x11" * 65536


async def test_backing_format_probed_when_not_recorded(graph: Graph, tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    write(base, 0, 512, 0x44)
    top = tmp_path / "t.qcow2"
    create_qcow2(top, 1024 * 1024, backing_file="b.qcow2")  # no recorded format
    node = await graph.open_node(qcow2(top), top_level=True)
    assert node.driver.header_backing() == ("b.qcow2", None)
    assert node.backing is not None and node.backing.drv == "qcow2"
    assert await node.pread(0, 512) == b"\x44" * 512


async def test_missing_backing_file(graph: Graph, tmp_path: Path) -> None:
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", top, "1M")
    with pytest.raises(QMPError) as info:
        await graph.open_node(qcow2(top), top_level=True)
    assert info.value.desc == (
        f"Could not open backing file: Could not open '{tmp_path}/gone.raw': "
        "No such file or directory"
    )
    assert graph.nodes == {}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("1abc", "Invalid node-name: '1abc'"),
        ("", "Invalid node-name: ''"),
        ("a b", "Invalid node-name: 'a b'"),
        ("#block1", "Invalid node-name: '#block1'"),
        ("a" * 32, "Node name too long"),
    ],
)
async def test_bad_node_names(graph: Graph, chain: dict[str, Path], name: str, text: str) -> None:
    with pytest.raises(RequestError) as info:
        await graph.open_node(qcow2(chain["top"], name), top_level=True)
    assert info.value.desc == text
    assert graph.nodes == {}


async def test_longest_name_and_duplicates(graph: Graph, chain: dict[str, Path]) -> None:
    await graph.open_node(qcow2(chain["top"], "a" * 31, backing=None), top_level=True)
    with pytest.raises(
        RequestError, match=re.escape(f"Duplicate nodes with node-name='{'a' * 31}'")
    ):
        await graph.open_node(qcow2(chain["mid"], "a" * 31), top_level=True)
    nested = {
        "driver": "raw",
        "node-name": "r",
        "file": {**file_ref(chain["base"]), "node-name": "r"},
    }
    with pytest.raises(RequestError, match="Duplicate nodes with node-name='r'"):
        await graph.open_node(nested, top_level=True)
    assert len(graph.nodes) == 2  # the first image and its file node only


async def test_child_errors_come_first(graph: Graph, tmp_path: Path) -> None:
    options = {"driver": "raw", "node-name": "bad name", "file": file_ref(tmp_path / "nope")}
    with pytest.raises(QMPError, match=r"Could not open '.*/nope': No such file"):
        await graph.open_node(options, top_level=True)


async def test_unknown_reference(graph: Graph) -> None:
    with pytest.raises(RequestError) as info:
        await graph.open_node({"driver": "raw", "node-name": "r", "file": "nope"}, top_level=True)
    assert info.value.desc == "Cannot find device='nope' nor node-name='nope'"


async def test_read_only_inherited_unless_set(graph: Graph, chain: dict[str, Path]) -> None:
    node = await graph.open_node(qcow2(chain["top"], **{"read-only": True}), top_level=True)
    assert node.read_only and node.file is not None and node.file.read_only
    with pytest.raises(OSError):
        await node.write(0, b"x" * 512)
    await graph.delete("top")
    options = qcow2(chain["top"], **{"read-only": True})
    options["file"]["read-only"] = False
    node = await graph.open_node(options, top_level=True)
    assert node.file is not None and not node.file.read_only


async def test_read_write_format_over_read_only_file(graph: Graph, chain: dict[str, Path]) -> None:
    await graph.open_node(
        {**file_ref(chain["top"]), "node-name": "f", "read-only": True}, top_level=True
    )
    with pytest.raises(RequestError, match="Block node is read-only"):
        await graph.open_node({"driver": "qcow2", "node-name": "q", "file": "f"}, top_level=True)
    assert list(graph.nodes) == ["f"]


async def test_cycle_refused(graph: Graph, chain: dict[str, Path]) -> None:
    with pytest.raises(RequestError, match="would create a cycle"):
        await graph.open_node(qcow2(chain["top"], backing="top"), top_level=True)
    assert graph.nodes == {}


async def test_shared_child_closes_with_last_parent(graph: Graph, chain: dict[str, Path]) -> None:
    await graph.open_node(
        {"driver": "raw", "node-name": "base", "file": file_ref(chain["base"])}, top_level=True
    )
    await graph.open_node(
        qcow2(chain["mid"], "m1", backing="base", **{"read-only": True}), top_level=True
    )
    await graph.open_node(
        qcow2(chain["mid"], "m2", backing="base", **{"read-only": True}), top_level=True
    )
    with pytest.raises(
        RequestError, match="Node 'base' is busy: node is used as backing hd of 'm2'"
    ):
        await graph.delete("base")
    await graph.delete("m1")
    with pytest.raises(
        RequestError, match="Node 'base' is busy: node is used as backing hd of 'm2'"
    ):
        await graph.delete("base")
    file_node = graph.find("base").file  # type: ignore[union-attr]
    assert file_node is not None
    file_node.monitor_owned = True  # as if added by name: still held by 'base'
    with pytest.raises(RequestError, match=f"Block device {file_node.name} is in use"):
        await graph.delete(file_node.name)
    file_node.monitor_owned = False
    await graph.delete("m2")
    await graph.delete("base")
    assert graph.nodes == {}


async def test_blockers_users_and_frozen_links(graph: Graph, chain: dict[str, Path]) -> None:
    top = await graph.open_node(qcow2(chain["top"]), top_level=True)
    mid = top.backing
    assert mid is not None and mid.backing is not None
    reason = "block device is in use by block job: stream"
    top.block(reason)
    with pytest.raises(RequestError, match=f"Node 'top' is busy: {reason}"):
        await graph.delete("top")
    top.unblock(reason)

    writer = NodeUser(
        "stream job 'job0'", "active node", Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ
    )
    graph.add_user(top, writer)
    second = NodeUser(
        "stream job 'job1'", "active node", Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE
    )
    with pytest.raises(RequestError) as info:
        graph.add_user(top, second)
    assert info.value.desc == (
        "Permission conflict on node 'top': permissions 'write' are both required by "
        "stream job 'job1' (uses node 'top' as 'active node' child) and unshared by stream "
        "job 'job0' (uses node 'top' as 'active node' child)."
    )
    with pytest.raises(RequestError, match="Block device top is in use"):
        await graph.delete("top")
    await graph.remove_user(top, writer)

    ro_writer = NodeUser("stream job 'job0'", "intermediate node", Perm.WRITE, Perm.CONSISTENT_READ)
    with pytest.raises(RequestError, match="Block node is read-only"):
        graph.add_user(mid, ro_writer)

    graph.freeze_chain(top, mid.backing)
    with pytest.raises(
        RequestError,
        match=f"Cannot change frozen 'backing' link from 'top' to '{mid.backing.name}'",
    ):
        await graph.set_child(top, "backing", mid.backing)
    with pytest.raises(
        RequestError, match=f"Cannot change 'backing' link from 'top' to '{mid.name}'"
    ):
        graph.freeze_chain(top, None)
    graph.unfreeze_chain(top, mid.backing)
    base = mid.backing
    await graph.set_child(top, "backing", base)
    assert top.backing is base
    assert mid.name not in graph.nodes  # the old backing lost its last reference


async def test_reopen_read_write_and_back(graph: Graph, chain: dict[str, Path]) -> None:
    top = await graph.open_node(qcow2(chain["top"], **{"read-only": True}), top_level=True)
    await graph.reopen(top, read_only=False)
    assert not top.read_only and top.file is not None and not top.file.read_only
    await top.write(0, b"\x55" * 512)
    await top.flush()
    await graph.reopen(top, read_only=True)
    assert top.read_only and top.file.read_only
    await graph.delete("top")
    assert "No errors" in qemu_img("check", chain["top"]).stdout
    out = qemu_img("compare", "-U", chain["top"], chain["top"]).returncode
    assert out == 0


async def test_reopen_refused_for_explicit_read_only_child(
    graph: Graph, chain: dict[str, Path]
) -> None:
    options = qcow2(chain["top"], **{"read-only": True})
    options["file"]["read-only"] = True
    top = await graph.open_node(options, top_level=True)
    with pytest.raises(RequestError, match="Block node is read-only"):
        await graph.reopen(top, read_only=False)
    assert top.read_only


async def test_filter_insert_and_remove(graph: Graph, chain: dict[str, Path]) -> None:
    top = await graph.open_node(qcow2(chain["top"]), top_level=True)
    mid = top.backing
    assert mid is not None
    filt = await graph.insert_filter({"driver": "raw", "file": mid.name}, mid)
    assert top.backing is filt and filt.file is mid and GENERATED.match(filt.name)
    await graph.remove_filter(filt)
    assert top.backing is mid and filt.name not in graph.nodes


async def test_json_backing_name_from_header(graph: Graph, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    write(base, 4096, 4096, 0x66, fmt="raw")
    name = json.dumps(
        {
            "driver": "raw",
            "offset": 4096,
            "size": 65536,
            "file.driver": "file",
            "file.filename": str(base),
        }
    )
    top = tmp_path / "top.qcow2"
    create_qcow2(top, 65536, backing_file=f"json:{name}")
    expected = qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x66 0 4096", top)
    assert "read 4096/4096" in expected.stdout  # qemu-io reads the window the same way
    graph.allow_header_json = True  # the opt-in (refused by default: tests/reliability)
    node = await graph.open_node(qcow2(top), top_level=True)
    assert node.backing is not None and node.backing.length() == 65536
    assert await node.pread(0, 4096) == b"\x66" * 4096
    assert node.backing.filename.startswith("json:") and '"offset": 4096' in node.backing.filename


async def test_backing_on_a_driver_without_backing(graph: Graph, chain: dict[str, Path]) -> None:
    options = {"driver": "raw", "node-name": "r", "file": file_ref(chain["base"]), "backing": None}
    with pytest.raises(RequestError) as info:
        await graph.open_node(options, top_level=True)
    assert info.value.desc == "Driver 'raw' of node 'r' does not support backing files"
    assert graph.nodes == {}
