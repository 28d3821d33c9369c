"""The trio QMP server over real UNIX sockets (docs/qemu-behaviour/qmp-protocol.md §1, §4, §7;
docs/clients.md §1, §7)."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from kit.daemons import Served
from kit.qmp import IO_TIMEOUT, RawClient

from blockd import QEMU_VERSION, __version__
from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from blockd.server import Endpoint, EndpointError, Server


async def test_greeting_is_one_compact_crlf_line(served: Served) -> None:
    client = await served.client(negotiate=False)
    raw = await client.line()
    assert raw.endswith(b"}\r\n") and raw.count(b"\n") == 1
    major, minor, micro = QEMU_VERSION
    assert json.loads(raw) == {
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": f"blockd {__version__}",
            },
            "capabilities": ["oob"],
        }
    }
    assert QEMU_VERSION >= (9, 0, 0)  # clients gate backing-mask-protocol on 9.0


async def test_negotiation_mode(served: Served) -> None:
    client = await served.client(negotiate=False)
    await client.recv()
    await client.execute("query-version", id=1)
    assert await client.recv() == {
        "id": 1,
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
    }
    await client.execute("qmp_capabilities", {}, id="neg")
    assert await client.recv() == {"return": {}, "id": "neg"}
    await client.execute("qmp_capabilities")
    assert await client.recv() == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        }
    }
    await client.execute("no-such-cmd")
    reply = await client.recv()
    assert reply["error"]["desc"] == "The command no-such-cmd has not been found"


@pytest.mark.parametrize("msg_id", ["a", 7, -1.5, {"complex": [1, 2]}, [None, True], None])
async def test_id_is_echoed_unchanged(served: Served, msg_id: Any) -> None:
    client = await served.client()
    await client.execute("query-version", id=msg_id)
    reply = await client.recv()
    assert "return" in reply and reply["id"] == msg_id


async def test_no_id_means_no_id_and_void_returns_empty_object(served: Served) -> None:
    client = await served.client()
    await client.execute("query-version")
    reply = await client.recv()
    assert set(reply) == {"return"}
    assert reply["return"]["package"] == f"blockd {__version__}"


async def test_many_commands_in_one_write_and_split_writes(served: Served) -> None:
    client = await served.client()
    batch = "".join(
        json.dumps({"execute": "query-version", "id": i}) + ("\n" if i % 2 else "")
        for i in range(5)
    )
    await client.send(batch)
    assert [(await client.recv())["id"] for _ in range(5)] == list(range(5))
    one = json.dumps({"execute": "query-commands", "id": "split"}).encode()
    for i in range(len(one)):  # one byte per write, no trailing newline
        await client.send(one[i : i + 1])
        await trio.sleep(0)
    reply = await client.recv()
    assert reply["id"] == "split"
    assert {"name": "query-version"} in reply["return"]


async def test_bad_input_gets_an_error_and_the_connection_keeps_working(served: Served) -> None:
    client = await served.client()
    await client.send(b'{"execute": @}[1]{"foo": 1}')
    descs = [(await client.recv())["error"]["desc"] for _ in range(4)]
    assert descs[0].startswith("JSON parse error")
    assert "QMP input must be a JSON object" in descs
    assert "QMP input member 'foo' is unexpected" in descs
    await client.execute("query-version", id="still")
    assert (await client.recv())["id"] == "still"


async def test_every_output_line_ends_in_crlf(served: Served) -> None:
    client = await served.client()
    await client.execute("query-qmp-schema", id=1)
    reply = await client.recv()
    assert any(entry["name"] == "query-version" for entry in reply["return"])
    assert all(line.endswith(b"\r\n") for line in client.lines)


async def test_events_reach_negotiated_monitors_only(served: Served) -> None:
    first, second = await served.client(), await served.client()
    waiting = await served.client(negotiate=False)
    await waiting.recv()  # greeting only
    served.daemon.events.emit("JOB_STATUS_CHANGE", {"status": "created", "id": "j"})
    for client in (first, second):
        event = await client.recv()
        assert event["event"] == "JOB_STATUS_CHANGE"
        assert event["data"] == {"status": "created", "id": "j"}
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    await waiting.execute("qmp_capabilities")
    assert await waiting.recv() == {"return": {}}  # the event was dropped, not queued


async def test_a_stalled_client_does_not_block_others(served: Served) -> None:
    stalled = await served.client()  # never reads again
    lively = await served.client()
    payload = "x" * 8192
    count = 400  # 3+ MiB: more than socket buffers plus the 256 KiB outbox limit
    received = 0

    async def read_all() -> None:
        nonlocal received
        while received < count:
            msg = await lively.recv()
            assert msg["event"] == "BLOCK_IO_ERROR"
            received += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for _ in range(count):
            served.daemon.events.emit("BLOCK_IO_ERROR", {"pad": payload})
            await trio.sleep(0)
    assert received == count
    await lively.execute("query-version", id="alive")
    assert (await lively.recv())["id"] == "alive"
    # The stalled client overflowed its queue and was disconnected.
    with trio.fail_after(IO_TIMEOUT):
        while not await stalled.at_eof():
            stalled.buffer = b""


async def test_quit_replies_then_shuts_down(served: Served) -> None:
    client = await served.client()
    await client.execute("quit", id="bye")
    assert await client.recv() == {"return": {}, "id": "bye"}
    assert served.daemon.shutdown_requested


async def test_connection_limit(nursery: trio.Nursery, sock_dir: Path) -> None:
    daemon = Daemon()
    server = Server(daemon, load_all(), max_connections=2)
    path = sock_dir / "lim.sock"
    await server.add_endpoint(Endpoint(str(path)))
    await nursery.start(server.run)
    kept = [await RawClient.connect(path) for _ in range(2)]
    for client in kept:
        assert "QMP" in await client.recv()
    extra = await RawClient.connect(path)
    assert await extra.at_eof()  # closed without a greeting
    await kept[0].aclose()
    with trio.fail_after(IO_TIMEOUT):
        while True:  # the freed slot is usable again
            again = await RawClient.connect(path)
            if not await again.at_eof():
                break
    assert again.buffer.startswith(b'{"QMP"')
    await server.aclose()


async def test_socket_mode_and_removal(nursery: trio.Nursery, sock_dir: Path) -> None:
    for umask, mode in [(0o022, 0o600), (0o000, 0o600), (0o277, 0o400)]:
        path = sock_dir / f"m{umask:o}.sock"
        old = os.umask(umask)
        try:
            server = Server(Daemon(), load_all())
            await server.add_endpoint(Endpoint(str(path)))
        finally:
            os.umask(old)
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == mode
        await server.aclose()
        assert not path.exists()


async def test_stale_socket_is_replaced_live_one_refused(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    path = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: stale
    first = Server(Daemon(), load_all())
    await first.add_endpoint(Endpoint(str(path)))
    await nursery.start(first.run)
    client = await RawClient.connect(path)
    assert "QMP" in await client.recv()

    second = Server(Daemon(), load_all())
    with pytest.raises(EndpointError, match="a running daemon is listening there"):
        await second.add_endpoint(Endpoint(str(path)))
    assert "QMP" in (await (await RawClient.connect(path)).recv())  # still the first one

    plain = sock_dir / "plain"
    plain.write_text("not a socket")
    with pytest.raises(EndpointError, match="not a socket"):
        await second.add_endpoint(Endpoint(str(plain)))
    assert plain.read_text() == "not a socket"
    await first.aclose()
    assert not path.exists()


async def test_client_mode_connects_to_a_listener(nursery: trio.Nursery, sock_dir: Path) -> None:
    path = sock_dir / "listen.sock"
    listener = trio.socket.socket(socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen(1)
    server = Server(Daemon(), load_all())
    await server.add_endpoint(Endpoint(str(path), listen=False))
    await nursery.start(server.run)
    with trio.fail_after(IO_TIMEOUT):
        conn, _ = await listener.accept()
    client = RawClient(trio.SocketStream(conn))
    await client.negotiate()
    await client.execute("query-version", id=3)
    assert (await client.recv())["id"] == 3
    await server.aclose()
    listener.close()
    with pytest.raises(EndpointError, match="Failed to connect to"):
        await Server(Daemon(), load_all()).add_endpoint(
            Endpoint(str(sock_dir / "nobody.sock"), listen=False)
        )


async def test_pretty_monitor(nursery: trio.Nursery, sock_dir: Path) -> None:
    server = Server(Daemon(), load_all())
    path = sock_dir / "pretty.sock"
    await server.add_endpoint(Endpoint(str(path), pretty=True))
    await nursery.start(server.run)
    stream = await trio.open_unix_socket(str(path))
    with trio.fail_after(IO_TIMEOUT):
        data = b""
        while not data.endswith(b"}\r\n"):
            data += await stream.receive_some(4096)
    assert data.count(b"\n") > 1 and json.loads(data)["QMP"]["capabilities"] == ["oob"]
    await stream.aclose()
    await server.aclose()


async def test_garbage_and_limits_never_break_the_daemon(served: Served) -> None:
    client = await served.client()
    rng = random.Random(1234)
    samples = [
        b"[" * 1025 + b"]" * 1025,  # nesting above QEMU's 1024
        b'{"execute": "query-version", "arguments": ' + b'{"a": ' * 600 + b"1" + b"}" * 601,
        b"\x00\x01\x02 not json at all }}}]]]",
        "{'execute': 'query-version', \"id\": \"\u00e9\u2603\"}".encode(),
        *(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))) for _ in range(30)),
    ]
    for number, garbage in enumerate(samples):
        await client.send(garbage)
        # 0xFF makes QEMU's lexer drop whatever it holds and start afresh
        # (docs/qemu-behaviour/qmp-protocol.md §7).
        await client.send(b"\xff" + json.dumps({"execute": "query-version", "id": number}).encode())
        while True:
            reply = await client.recv()
            if reply.get("id") == number and "return" in reply:
                break
            assert "error" in reply or "return" in reply, reply
    fresh = await served.client()
    await fresh.execute("query-version", id="fresh")
    assert (await fresh.recv())["id"] == "fresh"
