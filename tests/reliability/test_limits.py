"""Limits per daemon and per connection: at most 256 sessions, an endless token is cut at
QEMU's 64 MiB limit; memory stays bounded and other clients are served throughout. A
client that never reads is paused: tests/reliability/test_slow_reader.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from blockd.client.lab import DaemonProcess
from blockd.server import MAX_CONNECTIONS
from stress.fuzzkit import FuzzClient, vmrss_kib

Connect = Callable[[Path | str], FuzzClient]
MIB = 1 << 20


def _greeted(sock: socket.socket) -> bool:
    """True if the daemon greets this connection, False if it closes it."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    return b'"QMP"' in data


def test_connections_beyond_the_cap_are_closed(daemon: DaemonProcess, connect: Connect) -> None:
    probe = connect(daemon.socket)  # counts as one session
    socks = []
    try:
        greeted = []
        for _ in range(MAX_CONNECTIONS + 8):  # one by one: the listen backlog is 128
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(str(daemon.socket))
            socks.append(sock)
            greeted.append(_greeted(sock))
        assert sum(greeted) == MAX_CONNECTIONS - 1
        assert greeted[: MAX_CONNECTIONS - 1] == [True] * (MAX_CONNECTIONS - 1)
        assert "return" in probe.call("query-version")
        for sock in socks[:10]:  # freed places are served again
            sock.close()
        time.sleep(0.2)
        again = socket.socket(socket.AF_UNIX)
        socks.append(again)
        again.settimeout(10)
        again.connect(str(daemon.socket))
        assert _greeted(again)
    finally:
        for sock in socks:
            sock.close()
    assert daemon.process.poll() is None


def test_an_endless_token_is_cut_and_memory_stays_bounded(
    daemon: DaemonProcess, connect: Connect
) -> None:
    probe = connect(daemon.socket)
    client = connect(daemon.socket)
    before = vmrss_kib(daemon.process.pid)
    client.sock.sendall(b'{"execute": "query-version", "id": "')
    chunk = b"a" * MIB
    peak = 0
    for i in range(80):  # 80 MiB in one string that never ends, connection kept open
        client.sock.sendall(chunk)
        if i % 10 == 0:
            peak = max(peak, vmrss_kib(daemon.process.pid))
            assert "return" in probe.call("query-version")
    reply = client.line()  # the token limit (64 MiB) was passed: a parse error, no wait
    peak = max(peak, vmrss_kib(daemon.process.pid))
    assert peak - before < 200 * 1024, (before, peak)
    assert reply["error"]["desc"] == "JSON token size limit exceeded"
    # The tail lexes as one huge keyword whose parse error quotes it (as QEMU's does);
    # this client reads nothing meanwhile, so its output overflows and it is closed.
    assert "return" in probe.call("query-version")
    assert daemon.process.poll() is None
