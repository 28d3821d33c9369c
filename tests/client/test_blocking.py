"""The blocking QMP client: the trio client's errors and texts, one-shot commands, and
``blockctl`` one-shot subcommands that never start an event loop."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.daemons import Lab

from blockd.client.blocking import connect_blocking
from blockd.client.errors import CommandError, ConnectError


def expect_connect_error(path: Path, match: str, timeout: float = 5.0) -> None:
    with pytest.raises(ConnectError, match=match), connect_blocking(str(path), timeout=timeout):
        pass


def test_no_socket(sock_dir: Path) -> None:
    expect_connect_error(sock_dir / "qmp.sock", "no such socket; is the daemon running")
    expect_connect_error(sock_dir / "missing" / "qmp.sock", "no such directory")


def test_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    expect_connect_error(tmp_path / "file", "not a socket")
    expect_connect_error(tmp_path, "not a socket")


def test_stale_socket(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        expect_connect_error(path, "connection refused; the daemon is not running")


def test_silent_server(sock_dir: Path) -> None:
    path = sock_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        expect_connect_error(path, "no QMP greeting within 0.2s", timeout=0.2)


@pytest.fixture
def http_server(sock_dir: Path) -> Iterator[Path]:
    """A UNIX socket that answers like an HTTP server."""
    path = sock_dir / "http.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.settimeout(10)
            conn.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        thread.join(timeout=10)
        listener.close()


def test_not_qmp(http_server: Path) -> None:
    expect_connect_error(http_server, "not a usable QMP monitor")


def test_execute_and_errors(lab: Lab) -> None:
    with connect_blocking(str(lab.socket), timeout=10) as qmp:
        assert qmp.greeting is not None and qmp.greeting.version_text.count(".") == 2
        assert set(qmp.execute("query-version")) >= {"qemu", "package"}
        lab.require("job-dismiss", "block-job-cancel")
        with pytest.raises(CommandError) as info:
            qmp.execute("job-dismiss", {"id": "nope"})
        assert (info.value.error_class, info.value.desc) == ("GenericError", "Job not found")
        with pytest.raises(CommandError) as info:
            qmp.execute("block-job-cancel", {"device": "nope"})
        assert info.value.error_class == "DeviceNotActive"
        with pytest.raises(CommandError) as info:
            qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"


def test_one_shot_blockctl_starts_no_event_loop(lab: Lab) -> None:
    # A short command pays for the event loop's import only when it follows a job.
    code = (
        "import sys\n"
        "from blockd.client import ctl\n"
        f"status = ctl.main(['-s', {str(lab.socket)!r}, 'jobs'])\n"
        "assert status == 0, status\n"
        "loaded = {'trio', 'blockd.client.connection', 'blockd.client.watch'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "no jobs" in result.stdout
