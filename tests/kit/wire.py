"""Byte-exact QMP exchanges: the same bytes sent to a qemu-storage-daemon monitor and to
blockd's sans-IO protocol core, and the reply lines each gives back.

A marker command (``query-version`` with id ``SYNC``) ends each exchange, so no reply is
waited for by time. Used where the exact bytes matter (parse errors, echoed ids, numbers):
``tests/qmp/test_qemu_differential.py``, ``tests/qmp/test_hostile_numbers.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from blockd.qmp.connection import NEED_DATA, Connection, Output, Request
from blockd.qmp.messages import version_info
from blockd.qmp.schema import Schema
from kit.daemons import daemon, monitor_args
from kit.qemu import QSD10

MARKER = b'{"execute": "query-version", "id": "SYNC"}'
NEGOTIATE = b'{"execute": "qmp_capabilities"}'
NEGOTIATE_OOB = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'


@contextlib.contextmanager
def qsd_monitor() -> Iterator[str]:
    """A QEMU 10.0 qemu-storage-daemon with one monitor socket; yields the socket path."""
    directory = tempfile.mkdtemp(prefix="blockd-")  # short: a socket path has <= 107 bytes
    path = Path(directory, "m.sock")
    try:
        with daemon([str(QSD10), *monitor_args(path)], ready=path, stderr=subprocess.DEVNULL):
            yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def qemu_replies(path: str, prelude: bytes, data: bytes) -> list[bytes]:
    """The reply lines QEMU sends for ``data`` after ``prelude`` (whose reply is skipped)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        if prelude:
            sock.sendall(prelude)
            reader.readline()
        sock.sendall(data + MARKER)
        replies = []
        while (line := reader.readline()) and b'"SYNC"' not in line:
            replies.append(line)
        return replies


def blockd_replies(schema: Schema, prelude: bytes, data: bytes) -> list[bytes]:
    """The reply lines blockd's protocol core gives for the same bytes (no command runs)."""
    conn = Connection(schema, version=version_info())
    replies: list[bytes] = []
    for chunk in (prelude, data + MARKER):
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, Request):
                assert event.id == "SYNC", f"{event} would run a command"
                return replies
            assert isinstance(event, Output)
            if b'"SYNC"' in event.data:
                return replies
            replies.append(event.data)
        if chunk is prelude and prelude:
            replies.clear()
    return replies
