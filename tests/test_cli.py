"""The command line: parsing (pure) and the daemon process (subprocesses)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from kit import daemons
from kit.chains import base_and_top
from kit.cli import BLOCKD, run_blockd
from kit.qemu import check, compare, image_info
from kit.qmp import SyncClient

from blockd import __version__
from blockd.cli import parse_args
from blockd.config import BlockdevSpec, ChardevSpec, CliError, MonitorSpec

# --- parsing ------------------------------------------------------------------------------


def test_qsd_style_command_line_in_order(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    config = parse_args(
        [
            "--blockdev", "driver=file,node-name=f,filename=/x",
            "--chardev", f"socket,id=mon0,path={sock},server=on,wait=off",
            "--monitor", "chardev=mon0,mode=control,pretty=on",
            "--chardev=socket,id=c2,path=rel.sock,server=on",
            "--monitor", "c2",
            "--pidfile", "pid",
            "--daemonize",
        ]
    )  # fmt: skip
    blockdev, char0, mon0, char2, mon2 = config.steps
    assert isinstance(blockdev, BlockdevSpec) and blockdev.keyval
    assert blockdev.options == {"driver": "file", "node-name": "f", "filename": "/x"}
    assert char0 == ChardevSpec("mon0", str(sock), None, True, char0.text)
    assert isinstance(mon0, MonitorSpec) and mon0.chardev is char0 and mon0.pretty
    assert isinstance(char2, ChardevSpec) and char2.path == os.path.abspath("rel.sock")
    assert isinstance(mon2, MonitorSpec) and mon2.chardev is char2 and not mon2.pretty
    assert config.monitors == (mon0, mon2)
    assert config.pidfile == os.path.abspath("pid")
    assert config.daemonize


def test_socket_short_form_and_client_mode(tmp_path: Path) -> None:
    config = parse_args(["--socket", "a.sock", "--chardev", "socket,id=c,path=/q"])
    char, monitor, client = config.steps
    assert isinstance(char, ChardevSpec) and char.server and char.path == os.path.abspath("a.sock")
    assert isinstance(monitor, MonitorSpec) and monitor.chardev is char
    assert isinstance(client, ChardevSpec) and not client.server  # server=off: connect to /q
    assert parse_args(["-V"]).version and parse_args(["-h"]).help


def test_json_blockdev_is_kept_as_json() -> None:
    (step,) = parse_args(["--blockdev", '{"driver": "raw", "read-only": true}']).steps
    assert isinstance(step, BlockdevSpec) and not step.keyval
    assert step.options == {"driver": "raw", "read-only": True}


OPTION_ERRORS = [
    (["--monitor", "chardev=nochar"], '--monitor chardev=nochar: chardev "nochar" not found'),
    (["--monitor", "nochar"], '--monitor nochar: chardev "nochar" not found'),
    (["--bogus"], "--bogus: unrecognized option"),
    (["stray"], "Unexpected argument: stray"),
    (["--chardev"], "--chardev: option requires an argument"),
    (["--chardev", "socket,id=a"], "--chardev socket,id=a: chardev: socket: 'path' is missing"),
    (["--chardev", "socket,path=/a"], "--chardev socket,path=/a: chardev: no id specified"),
    (
        ["--chardev", "pty,id=a"],
        "--chardev pty,id=a: 'pty' is not a supported chardev backend (only 'socket')",
    ),
    (
        ["--chardev", "socket,id=a,path=/a,bogus=1"],
        "--chardev socket,id=a,path=/a,bogus=1: Invalid parameter 'bogus'",
    ),
    (
        ["--chardev", "socket,id=a,path=/a", "--chardev", "socket,id=a,path=/b"],
        "--chardev socket,id=a,path=/b: Duplicate ID 'a' for chardev",
    ),
    (
        ["--chardev", "socket,id=a,path=/a", "--monitor", "a,pretty=maybe"],
        "--monitor a,pretty=maybe: Parameter 'pretty' expects 'on' or 'off'",
    ),
    (
        ["--chardev", "socket,id=a,path=/a", "--monitor", "a,mode=readline"],
        "--monitor a,mode=readline: Only QMP is supported",
    ),
    (
        ["--chardev", "socket,id=a,path=/a", "--monitor", "a", "--monitor", "a"],
        "--monitor a: Device 'a' is in use",
    ),
    (["--monitor", "chardev=a,foo=1"], "--monitor chardev=a,foo=1: Parameter 'foo' is unexpected"),
    (["--blockdev", "a=1,b"], "--blockdev a=1,b: Expected '=' after parameter 'b'"),
    (["--object", "iothread,id=t"], "--object iothread,id=t: --object is not supported by blockd"),
    (["--version=1"], "--version: option does not take a value"),
]


@pytest.mark.parametrize(("argv", "message"), OPTION_ERRORS)
def test_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(CliError) as info:
        parse_args(argv)
    assert str(info.value) == message


# --- the daemon process -------------------------------------------------------------------

TIMEOUT = 15.0


def test_version_and_help() -> None:
    result = run_blockd("--version")
    assert result.returncode == 0 and result.stdout.startswith(f"blockd {__version__}\n")
    result = run_blockd("-h")
    assert result.returncode == 0 and result.stdout.startswith("Usage: blockd")
    assert "--chardev" in result.stdout and "--pidfile" in result.stdout


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        (
            ["--monitor", "chardev=nochar"],
            'blockd: --monitor chardev=nochar: chardev "nochar" not found\n',
        ),
        (["--frobnicate"], "blockd: --frobnicate: unrecognized option\n"),
        (
            ["--blockdev", "driver=nbd2,node-name=x"],
            "blockd: --blockdev driver=nbd2,node-name=x: "
            "Parameter 'driver' does not accept value 'nbd2'\n",
        ),
        (
            ["--blockdev", "node-name=x"],
            "blockd: --blockdev node-name=x: Parameter 'driver' is missing\n",
        ),
    ],
)  # fmt: skip
def test_option_errors_exit_1(argv: list[str], stderr: str) -> None:
    result = run_blockd(*argv)
    assert (result.returncode, result.stderr, result.stdout) == (1, stderr, "")


def start(sock_dir: Path, *args: str) -> subprocess.Popen[str]:
    """Start the daemon and wait for its pidfile (``sock_dir/pid``)."""
    return daemons.start([*BLOCKD, *args], ready=sock_dir / "pid")


def qmp_quit(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "quit", "id": 1}')
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, "quit"])
def test_pidfile_lifecycle_and_clean_exit(sock_dir: Path, stop: signal.Signals | str) -> None:
    sock, pid = sock_dir / "s", sock_dir / "pid"
    proc = start(sock_dir, "--socket", str(sock), "--pidfile", str(pid))
    try:
        assert pid.read_text() == f"{proc.pid}\n"
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        # A second daemon is refused: the pidfile is locked, the socket is live.
        other = run_blockd("--socket", str(sock_dir / "t"), "--pidfile", str(pid))
        assert other.returncode == 1 and "--pidfile" in other.stderr
        assert "another running daemon" in other.stderr
        assert not (sock_dir / "t").exists()
        other = run_blockd("--socket", str(sock))
        assert other.returncode == 1
        live = "a running daemon is listening there"
        assert other.stderr == f"blockd: --socket {sock}: Failed to bind socket to {sock}: {live}\n"
        if stop == "quit":
            replies = qmp_quit(sock).splitlines()
            assert replies[-1] == b'{"return": {}, "id": 1}'
        else:
            assert isinstance(stop, signal.Signals)
            proc.send_signal(stop)
        assert proc.wait(timeout=TIMEOUT) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
        assert not sock.exists() and not pid.exists()
    finally:
        daemons.stop(proc)


def test_stale_socket_and_pidfile_of_a_killed_daemon(sock_dir: Path) -> None:
    sock, pid = sock_dir / "s", sock_dir / "pid"
    proc = start(sock_dir, "--socket", str(sock), "--pidfile", str(pid))
    proc.kill()
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()
    assert sock.exists() and pid.exists()  # left behind by SIGKILL
    pid.unlink()  # `start` waits for a fresh one
    proc = start(sock_dir, "--socket", str(sock), "--pidfile", str(pid))
    try:
        assert pid.read_text() == f"{proc.pid}\n"
        proc.terminate()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        daemons.stop(proc)


def test_failed_start_leaves_nothing_behind(sock_dir: Path) -> None:
    good, pid = sock_dir / "good", sock_dir / "pid"
    bad = sock_dir / "missing-dir" / "s"
    result = run_blockd("--socket", str(good), "--socket", str(bad), "--pidfile", str(pid))
    assert result.returncode == 1
    assert result.stderr == (
        f"blockd: --socket {bad}: Failed to bind socket to {bad}: No such file or directory\n"
    )
    assert not good.exists() and not pid.exists()


def test_daemonize(sock_dir: Path) -> None:
    sock, pid = sock_dir / "s", sock_dir / "pid"
    result = run_blockd("--daemonize", "--socket", str(sock), "--pidfile", str(pid))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    daemon_pid = int(pid.read_text())  # ready: the pidfile exists when the parent exits
    try:
        assert sock.exists()
        os.kill(daemon_pid, 0)  # alive
        assert qmp_quit(sock).endswith(b'{"return": {}, "id": 1}\r\n')
        deadline = time.monotonic() + TIMEOUT
        while pid.exists() or sock.exists():
            assert time.monotonic() < deadline, "daemon did not clean up"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon_pid, signal.SIGKILL)
    # A daemon that fails to start makes the command fail, with its error.
    blocker = run_blockd("--daemonize", "--socket", str(sock), "--pidfile", str(pid))
    assert blocker.returncode == 0
    try:
        result = run_blockd("--daemonize", "--socket", str(sock))
        assert result.returncode == 1 and "a running daemon is listening there" in result.stderr
    finally:
        os.kill(int(pid.read_text()), signal.SIGTERM)


def test_sigterm_cancels_a_running_job_and_closes_images(sock_dir: Path, tmp_path: Path) -> None:
    base, top = base_and_top(tmp_path)
    sock, pid = sock_dir / "s", sock_dir / "pid"
    proc = start(
        sock_dir,
        "--blockdev", f"driver=file,node-name=top-file,filename={top}",
        "--blockdev", '{"driver": "qcow2", "node-name": "top", "file": "top-file"}',
        "--chardev", f"socket,id=m0,path={sock},server=on,wait=off",
        "--monitor", "chardev=m0,mode=control",
        "--socket", str(sock_dir / "second"),
        "--pidfile", str(pid),
    )  # fmt: skip
    try:
        first, second = SyncClient(sock), SyncClient(sock_dir / "second")
        args = {"job-id": "j0", "device": "top", "speed": 1 << 20}  # 64 s at this speed
        assert first.execute("block-stream", args) == {}
        # Both monitors saw the job start (events go to every negotiated monitor).
        statuses = [second.recv()["data"]["status"] for _ in range(2)]
        assert statuses == ["created", "running"]
        assert [job["status"] for job in second.execute("query-jobs")] == ["running"]
        proc.terminate()
        assert proc.wait(timeout=TIMEOUT) == 0
        first.close()
        second.close()
    finally:
        daemons.stop(proc)
    assert not sock.exists() and not pid.exists()
    # The images were closed cleanly: consistent, unlocked, the chain intact.
    check(top, force_share=False)
    assert image_info(top, force_share=False)["backing-filename"] == str(base)
    compare(top, base, force_share=False)


def test_blockdev_errors_at_start_up(sock_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    option = f"driver=file,node-name=f,filename={missing}"
    result = run_blockd("--blockdev", option, "--socket", str(sock_dir / "s"))
    assert result.returncode == 1
    assert result.stderr == (
        f"blockd: --blockdev {option}: Could not open '{missing}': No such file or directory\n"
    )
    assert not (sock_dir / "s").exists()
    result = run_blockd("--blockdev", "driver=file,node-name=f,filename=/x,aio-max-batch=lots")
    assert result.returncode == 1
    assert result.stderr.endswith(": Parameter 'aio-max-batch' expects integer\n")
    text = '{"driver": "file", "node-name": "f", "filename": "/x", "read-only": "yes"}'
    result = run_blockd("--blockdev", text)  # JSON keeps JSON types: no keyval conversion
    assert result.stderr == (
        f"blockd: --blockdev {text}: Invalid parameter type for 'read-only', expected: boolean\n"
    )


def test_inherited_listening_fd(sock_dir: Path) -> None:
    path = sock_dir / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    fd = listener.fileno()
    argv = [*BLOCKD, "--chardev", f"socket,id=c,fd={fd},server=on", "--monitor", "c",
            "--pidfile", str(sock_dir / "pid")]  # fmt: skip
    proc = daemons.start(argv, ready=None, pass_fds=[fd])
    listener.close()  # the daemon has its own copy
    try:
        daemons.wait_for_file(proc, sock_dir / "pid")
        qmp = SyncClient(path)
        assert qmp.execute("query-version")["package"] == f"blockd {__version__}"
        qmp.close()
        proc.terminate()
        assert proc.wait(timeout=TIMEOUT) == 0
        assert path.exists()  # not ours to remove: whoever bound it owns it
    finally:
        daemons.stop(proc)
