"""Access: the QMP socket is created 0600 (or stricter per umask) in the directory the
user chose; paths that cannot be created safely are refused; the daemon package never
runs other programs."""

from __future__ import annotations

import ast
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import blockd
from stress.fuzzkit import wait_until

PACKAGE = Path(blockd.__file__).parent


def start(sock: Path, umask: int = 0o022) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sh", "-c", f'umask {umask:o}; exec "$0" -m blockd --socket "$1"', sys.executable,
         str(sock)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> bytes:
    if proc.poll() is None:
        proc.terminate()
    _, err = proc.communicate(timeout=15)
    return err


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o600), (0o000, 0o600), (0o277, 0o400)])
def test_socket_mode(sock_dir: Path, umask: int, mode: int) -> None:
    sock = sock_dir / "qmp.sock"
    proc = start(sock, umask)
    try:
        assert wait_until(sock.exists, 15), stop(proc)
        info = sock.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == mode
    finally:
        stop(proc)
    assert not sock.exists()  # removed on exit


def refused(sock: Path) -> str:
    proc = start(sock)
    try:
        proc.wait(timeout=15)
    finally:
        err = stop(proc)
    assert proc.returncode != 0
    return err.decode()


def test_symlink_at_the_socket_path_is_refused(sock_dir: Path) -> None:
    target = sock_dir / "victim"
    target.write_text("keep me")
    sock = sock_dir / "qmp.sock"
    sock.symlink_to(target)
    assert "File exists and is not a socket" in refused(sock)
    assert sock.is_symlink() and target.read_text() == "keep me"


def test_dangling_symlink_at_the_socket_path_is_refused(sock_dir: Path) -> None:
    sock = sock_dir / "qmp.sock"
    sock.symlink_to(sock_dir / "elsewhere.sock")
    assert "not a socket" in refused(sock)
    assert not (sock_dir / "elsewhere.sock").exists()


def test_world_writable_directory_without_sticky_bit_is_refused(sock_dir: Path) -> None:
    shared = sock_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by everyone and not sticky" in refused(shared / "qmp.sock")
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)  # sticky, as /tmp: fine
    proc = start(shared / "qmp.sock")
    try:
        assert wait_until((shared / "qmp.sock").exists, 15), stop(proc)
    finally:
        stop(proc)


def test_a_regular_file_at_the_socket_path_is_kept(sock_dir: Path) -> None:
    sock = sock_dir / "qmp.sock"
    sock.write_text("data")
    assert "not a socket" in refused(sock)
    assert sock.read_text() == "data"


def test_the_daemon_never_runs_programs() -> None:
    """No module the daemon runs imports subprocess or calls os.system/exec/spawn/popen
    (only the demo and the client lab, which run qemu-img for the user, do)."""
    allowed = {PACKAGE / "demo.py", PACKAGE / "client" / "lab.py"}
    banned_calls = {
        "system",
        "popen",
        "execv",
        "execve",
        "execvp",
        "execl",
        "spawnv",
        "posix_spawn",
    }  # fmt: skip (os.fork for --daemonize is fine)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("subprocess", "pty") for n in names):
                    offenders.append(f"{path}: imports {names}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in banned_calls
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                offenders.append(f"{path}:{node.lineno}: os.{node.attr}")
    assert offenders == []
