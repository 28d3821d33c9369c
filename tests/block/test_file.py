"""The ``file`` protocol driver against the file's real contents."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import trio
from kit.chains import file_ref

from blockd.block.driver import Status
from blockd.block.drivers.file import FileDriver
from blockd.block.graph import Graph
from blockd.errors import HostError, RequestError


async def test_read_write_match_the_file(graph: Graph, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    content = os.urandom(256 * 1024)
    path.write_bytes(content)
    with trio.fail_after(10):
        node = await graph.open_node({**file_ref(path), "node-name": "f"}, top_level=True)
        assert node.length() == len(content)
        assert await node.pread(1000, 5000) == content[1000:6000]
        await node.write(70000, b"x" * 3000)
        await node.flush()
    expected = bytearray(content)
    expected[70000:73000] = b"x" * 3000
    assert path.read_bytes() == bytes(expected)


async def test_reads_past_the_end_are_zeros_and_writes_grow(graph: Graph, tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    path.write_bytes(b"a" * 100)
    with trio.fail_after(10):
        node = await graph.open_node({**file_ref(path), "node-name": "f"}, top_level=True)
        assert await node.pread(50, 100) == b"a" * 50 + bytes(50)
        await node.write(200, b"b" * 10)
        assert node.length() == 512  # QEMU counts whole 512-byte sectors
    assert path.read_bytes() == b"a" * 100 + bytes(100) + b"b" * 10


async def test_read_only_refuses_writes(graph: Graph, tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    node = await graph.open_node(
        {**file_ref(path), "node-name": "f", "read-only": True}, top_level=True
    )
    assert isinstance(node.driver, FileDriver)
    assert os.get_blocking(node.driver.fd)  # a plain descriptor
    with pytest.raises(OSError) as info:
        await node.write(0, b"x")
    assert info.value.errno == errno.EPERM
    assert path.read_bytes() == bytes(4096)


@pytest.mark.parametrize(
    ("name", "text"),
    [("missing", "No such file or directory"), (".", "Is a directory")],
)
async def test_open_errors(graph: Graph, tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    with pytest.raises(HostError) as info:
        await graph.open_node({**file_ref(path), "node-name": "f"}, top_level=True)
    assert info.value.desc == f"Could not open '{path}': {text}"
    assert graph.nodes == {}


async def test_auto_read_only_falls_back(graph: Graph, tmp_path: Path) -> None:
    path = tmp_path / "locked.img"
    path.write_bytes(bytes(512))
    if os.geteuid() == 0:  # root writes any file, except an immutable one
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("cannot make a file unwritable for root here")
    else:
        path.chmod(0o444)
    try:
        options = {**file_ref(path), "node-name": "f"}
        with pytest.raises(
            HostError, match=r"Could not open .*: (Permission denied|Operation not permitted)"
        ):
            await graph.open_node(options, top_level=True)
        node = await graph.open_node({**options, "auto-read-only": True}, top_level=True)
        assert node.read_only
        assert await node.pread(0, 512) == bytes(512)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)


async def test_direct_io(graph: Graph, tmp_path: Path) -> None:
    path = tmp_path / "direct.img"
    content = os.urandom(64 * 1024)
    path.write_bytes(content)
    try:
        node = await graph.open_node(
            {**file_ref(path), "node-name": "f", "cache": {"direct": True}}, top_level=True
        )
    except HostError as exc:  # tmpfs has no O_DIRECT
        pytest.skip(exc.desc)
    assert node.driver.request_alignment == 4096
    assert await node.pread(100, 9000) == content[100:9100]
    await node.write(5000, b"z" * 100)
    await node.flush()
    expected = bytearray(content)
    expected[5000:5100] = b"z" * 100
    assert path.read_bytes() == bytes(expected)


async def test_block_status_data_and_holes(graph: Graph, tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(4 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(b"d" * 65536)
    node = await graph.open_node({**file_ref(path), "node-name": "f"}, top_level=True)
    first = await node.block_status(0, 4 * 1024 * 1024)
    if Status.DATA in first.status and first.length == 4 * 1024 * 1024:
        pytest.skip("the file system does not report holes")
    assert first.status == Status.ZERO | Status.ALLOCATED | Status.OFFSET_VALID
    assert first.length == 1024 * 1024
    data = await node.block_status(1024 * 1024, 4 * 1024 * 1024)
    assert data.status == Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
    assert data.offset_in_file == 1024 * 1024 and data.file_node is node
    tail = await node.block_status(1024 * 1024 + data.length, 4 * 1024 * 1024)
    assert Status.ZERO in tail.status
    assert (await node.block_status(4 * 1024 * 1024, 10)).length == 0


async def test_node_name_required_at_top_level(graph: Graph, tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="'node-name' must be specified for the root node"):
        await graph.open_node(file_ref(tmp_path / "x"), top_level=True)
