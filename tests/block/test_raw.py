"""The ``raw`` format driver over a file, with ``offset``/``size`` windows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from kit.chains import file_ref

from blockd.block.driver import Status
from blockd.block.graph import Graph
from blockd.errors import RequestError

MiB = 1024 * 1024


def raw(path: Path, **options: Any) -> dict[str, Any]:
    return {"driver": "raw", "node-name": "r", "file": file_ref(path), **options}


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.raw"
    content = os.urandom(MiB)
    path.write_bytes(content)
    return path, content


async def test_whole_file(graph: Graph, disk: tuple[Path, bytes]) -> None:
    path, content = disk
    node = await graph.open_node(raw(path), top_level=True)
    assert node.length() == MiB and node.drv == "raw" and node.filename == str(path)
    assert await node.pread(0, MiB) == content
    await node.write(4096, b"q" * 512)
    await node.flush()
    assert path.read_bytes()[4096:4608] == b"q" * 512
    status = await node.block_status(0, MiB)
    assert Status.ALLOCATED in status.status and status.file_node is node.file


async def test_window(graph: Graph, disk: tuple[Path, bytes]) -> None:
    path, content = disk
    node = await graph.open_node(raw(path, offset=4096, size=8192), top_level=True)
    assert node.length() == 8192
    assert await node.pread(0, 8192) == content[4096 : 4096 + 8192]
    await node.write(8192 - 10, b"w" * 10)
    with pytest.raises(OSError):
        await node.write(8192 - 10, b"w" * 11)
    with pytest.raises(OSError):
        await node.pread(8000, 500)
    assert path.read_bytes()[4096 + 8182 : 4096 + 8192] == b"w" * 10
    assert len(path.read_bytes()) == MiB


@pytest.mark.parametrize(
    ("options", "text"),
    [
        (
            {"offset": 2000000},
            "Offset (2000000) cannot be greater than size of the containing file (1048576)",
        ),
        (
            {"offset": 512, "size": MiB},
            "The sum of offset (512) and size (1048576) has to be smaller or equal to the  "
            "actual size of the containing file (1048576)",
        ),
        ({"size": 1000}, "Specified size is not multiple of 512"),
        ({"offset": -1}, "Value '-1' is out of range for parameter 'offset'"),
    ],
)
async def test_option_errors(
    graph: Graph, disk: tuple[Path, bytes], options: dict[str, Any], text: str
) -> None:
    path, _ = disk
    with pytest.raises(RequestError) as info:
        await graph.open_node(raw(path, **options), top_level=True)
    assert info.value.desc == text
    assert graph.nodes == {}  # the file child was closed again
