"""The command line: parsing (pure) and the daemon process (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockd.cli import BlockdevSpec, ChardevSpec, CliError, MonitorSpec, parse_args

BLOCKD = [sys.executable, "-m", "blockd"]


def run_blockd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLOCKD, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


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
