"""The trio QMP client: connecting (and failing to), executing, events."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from kit.chains import qcow2
from kit.daemons import Lab

from blockd.client.connection import CommandError, ConnectError, connect
from blockd.client.lab import make_chain

IO = 20.0


async def expect_connect_error(path: Path, match: str, timeout: float = 5.0) -> None:
    with trio.fail_after(IO), pytest.raises(ConnectError, match=match):
        async with connect(str(path), timeout=timeout):
            pass


async def test_no_socket(sock_dir: Path) -> None:
    await expect_connect_error(sock_dir / "qmp.sock", "no such socket; is the daemon running")
    await expect_connect_error(sock_dir / "missing" / "qmp.sock", "no such directory")


async def test_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    await expect_connect_error(tmp_path / "file", "not a socket")
    await expect_connect_error(tmp_path, "not a socket")


async def test_stale_socket(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound but never listening: what a dead daemon leaves behind
        await expect_connect_error(path, "connection refused; the daemon is not running")


async def test_silent_server(sock_dir: Path) -> None:
    """A server that accepts but never greets (a QEMU monitor busy with another client)."""
    path = sock_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        await expect_connect_error(path, "no QMP greeting within 0.2s", timeout=0.2)


async def test_not_qmp(sock_dir: Path, nursery: trio.Nursery) -> None:
    path = sock_dir / "http.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen(1)

    async def serve() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await trio.sleep_forever()

    nursery.start_soon(serve)
    await expect_connect_error(path, "not a usable QMP monitor")
    listener.close()


async def test_execute_and_errors(lab: Lab) -> None:
    with trio.fail_after(IO):
        async with connect(str(lab.socket)) as qmp:
            assert qmp.greeting is not None and qmp.greeting.version_text.count(".") == 2
            version = await qmp.execute("query-version")
            assert set(version) >= {"qemu", "package"}
            lab.require("job-dismiss", "block-job-cancel")
            with pytest.raises(CommandError) as info:
                await qmp.execute("job-dismiss", {"id": "nope"})
            assert (info.value.error_class, info.value.desc) == ("GenericError", "Job not found")
            with pytest.raises(CommandError) as info:
                await qmp.execute("block-job-cancel", {"device": "nope"})
            assert info.value.error_class == "DeviceNotActive"
            assert info.value.desc == "Block job 'nope' not found"
            with pytest.raises(CommandError) as info:
                await qmp.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"


async def test_events_before_reply(lab: Lab) -> None:
    """created and running arrive before block-stream's reply, so a listener opened
    before the command sees them as soon as execute() returns."""
    lab.require("blockdev-add", "block-stream", "query-jobs", "job-dismiss")
    top = make_chain(lab.images, "1M")[0]
    with trio.fail_after(IO):
        async with connect(str(lab.socket)) as qmp:
            await qmp.execute("blockdev-add", qcow2(top))
            with qmp.listen("JOB_STATUS_CHANGE") as events:
                await qmp.execute("block-stream", {"job-id": "j0", "device": "top",
                                                   "auto-dismiss": False})  # fmt: skip
                first = [events.receive_nowait(), events.receive_nowait()]
                assert [e.data["status"] for e in first] == ["created", "running"]
                async for event in events:
                    if event.data["status"] == "concluded":
                        break
            jobs = await qmp.execute("query-jobs")
            assert [(j["id"], j["status"], j.get("error")) for j in jobs] == [
                ("j0", "concluded", None)]  # fmt: skip
            await qmp.execute("job-dismiss", {"id": "j0"})
            assert await qmp.execute("query-jobs") == []
