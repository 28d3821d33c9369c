"""A client that sends requests and never reads its replies costs the others nothing.

One client floods ``query-qmp-schema`` (about 25 KiB a reply) without reading; if its
connection is closed it connects again and goes on. Meanwhile a second client measures
``query-version`` round trips. Before output paced input (blockd/server.py), each flood
held the event loop while it filled a 16 MiB queue, so round trips took seconds and the
flooder was cut off, again and again. Now the flooder's session stops at
:data:`~blockd.server.OUTBOX_PAUSE` of unread replies and waits for it; the numbers below
are behaviour bounds, far from the figures of either case (about 1 ms now, seconds then).

QEMU 10.0 does neither: it keeps reading, one request at a time, and buffers every reply,
so its resident memory grows by some 15 MiB a second under this flood.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from blockd.client.lab import DaemonProcess
from blockd.server import OUTBOX_PAUSE
from stress.fuzzkit import FuzzClient, strict_json, vmrss_kib

Connect = Callable[[Path | str], FuzzClient]
FLOOD = b'{"execute": "query-qmp-schema"}' * 256
SECONDS = 4.0


class Flooder(threading.Thread):
    """Sends :data:`FLOOD` until told to stop, reading nothing; reconnects when cut off."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stopping = threading.Event()
        self.connections = 0
        self.sent = 0
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(0.2)
        sock.connect(str(self.path))
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        self.connections += 1
        return sock

    def run(self) -> None:
        self.sock = self.connect()
        while not self.stopping.is_set():
            try:
                self.sent += self.sock.send(FLOOD)
            except TimeoutError:
                continue  # the daemon reads no more: it is paused, as it should be
            except OSError:  # cut off
                self.sock.close()
                self.sock = self.connect()


def test_a_flooding_non_reader_does_not_slow_other_clients(
    daemon: DaemonProcess, connect: Connect
) -> None:
    probe = connect(daemon.socket)
    for _ in range(20):  # warm-up: the schema answer, allocator arenas
        assert "return" in probe.call("query-qmp-schema")
    before = vmrss_kib(daemon.process.pid)
    flooder = Flooder(daemon.socket)
    flooder.start()
    latencies: list[float] = []
    peak = before
    try:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            start = time.monotonic()
            assert "return" in probe.call("query-version")
            latencies.append(time.monotonic() - start)
            peak = max(peak, vmrss_kib(daemon.process.pid))
            time.sleep(0.01)
    finally:
        flooder.stopping.set()
        flooder.join(timeout=10)
    latencies.sort()
    median = statistics.median(latencies)
    p90 = latencies[int(len(latencies) * 0.9)]
    summary = (
        f"{len(latencies)} round trips, median {median * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms; RSS {before // 1024} -> {peak // 1024} MiB; "
        f"flooder sent {flooder.sent} bytes on {flooder.connections} connection(s)"
    )
    print(summary)  # the figures, with pytest -s
    assert median < 0.2, summary
    assert p90 < 0.5, summary
    assert flooder.connections == 1, summary  # paused, never cut off
    assert flooder.sent > 4 * len(FLOOD), summary  # it did flood: the daemon read some
    assert peak - before < 8 * OUTBOX_PAUSE // 1024, summary

    # When it reads at last, its replies come, in order; the daemon serves throughout.
    assert flooder.sock is not None
    flooder.sock.settimeout(10)
    reader = flooder.sock.makefile("rb")
    assert b'"QMP"' in reader.readline()
    assert strict_json(reader.readline()) == {"return": {}}
    for _ in range(50):
        reply = strict_json(reader.readline())
        assert any(entry["name"] == "query-version" for entry in reply["return"])
    flooder.sock.close()
    assert "return" in probe.call("query-version")
    assert daemon.process.poll() is None
