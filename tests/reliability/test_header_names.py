"""Backing names in image headers are data: ``json:`` pseudo-filenames and protocol
prefixes are not followed unless the daemon runs with ``--allow-header-json``, so an
image cannot pull an arbitrary host file into a chain. Plain paths still are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kit.chains import qcow2, raw
from kit.qemu import qemu_img

from blockd.block.graph import Graph
from blockd.client.lab import running_daemon
from blockd.errors import RequestError
from stress.fuzzkit import FuzzClient

SECRET = b"top secret host file\n" * 200


def qcow2_with_backing(path: Path, backing: str) -> Path:
    # -u: do not open the backing file (qemu-img would follow json: itself)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", path, "1M")
    return path


def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    return path


def json_name(target: Path) -> str:
    return "json:" + json.dumps(raw(target))


@pytest.mark.parametrize(
    "name",
    ["JSON", "file:SECRET", "nbd:localhost:10809", "nbd+unix:///x?socket=/tmp/s",
     "blkdebug::SECRET", "ssh://host/etc/passwd", "json:[]"],
)  # fmt: skip
async def test_header_json_and_protocol_names_are_refused(tmp_path: Path, name: str) -> None:
    target = secret(tmp_path)
    name = json_name(target) if name == "JSON" else name.replace("SECRET", str(target))
    top = qcow2_with_backing(tmp_path / "top.qcow2", name)
    before = top.read_bytes()
    graph = Graph()
    with pytest.raises(RequestError) as info:
        await graph.open_node(qcow2(top), top_level=True)
    assert info.value.desc.startswith("Could not open backing file: The backing file name '")
    assert "--allow-header-json" in info.value.desc
    assert graph.nodes == {}
    assert top.read_bytes() == before


async def test_plain_paths_are_followed(tmp_path: Path) -> None:
    target = secret(tmp_path)
    (tmp_path / "sub").mkdir()
    for name in (str(target), "../secret.txt"):
        top = qcow2_with_backing(tmp_path / "sub" / "top.qcow2", name)
        graph = Graph()
        node = await graph.open_node(qcow2(top), top_level=True)
        assert await node.pread(0, 512) == SECRET[:512]
        await graph.close_all()


async def test_explicit_backing_option_is_always_allowed(tmp_path: Path) -> None:
    target = secret(tmp_path)
    top = qcow2_with_backing(tmp_path / "top.qcow2", json_name(target))
    graph = Graph()
    node = await graph.open_node(qcow2(top, backing=raw(target)), top_level=True)
    assert await node.pread(0, 64) == SECRET[:64]
    await graph.close_all()


@pytest.mark.parametrize("allow", [False, True])
def test_daemon_option_allow_header_json(tmp_path: Path, sock_dir: Path, allow: bool) -> None:
    target = secret(tmp_path)
    top = qcow2_with_backing(tmp_path / "top.qcow2", json_name(target))
    extra = ["--allow-header-json"] if allow else []
    with running_daemon(sock_dir, extra=extra) as daemon:
        client = FuzzClient(daemon.socket)
        try:
            reply = client.call("blockdev-add", **qcow2(top))
            if allow:
                assert reply == {"return": {}}
                nodes = client.call("query-named-block-nodes")["return"]
                assert any(n["file"] == str(target) for n in nodes), nodes
            else:
                assert "--allow-header-json" in reply["error"]["desc"]
                assert client.call("query-named-block-nodes") == {"return": []}
        finally:
            client.close()
