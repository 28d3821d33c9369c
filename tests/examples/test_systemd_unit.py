"""examples/blockd.service runs as systemd would run it: its ExecStart with
``Type=forking`` and ``PIDFile=``, then ``KillSignal=`` to stop it.

The unit's paths are moved into a temporary directory (systemd's ``RuntimeDirectory``
would create ``/run/blockd``) and its ``/usr/local/bin/blockd`` becomes this Python's
``-m blockd``; everything else is taken from the file as written.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from kit.repo import EXAMPLES

UNIT = EXAMPLES / "blockd.service"


def unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_unit_starts_forks_and_stops_cleanly(sock_dir: Path) -> None:
    unit = unit_settings()
    assert unit["Type"] == "forking" and unit["KillSignal"] == "SIGTERM"
    runtime = f"/run/{unit['RuntimeDirectory']}"
    argv = shlex.split(unit["ExecStart"].replace(runtime, str(sock_dir)))
    assert argv[0] == "/usr/local/bin/blockd"
    pidfile = Path(unit["PIDFile"].replace(runtime, str(sock_dir)))
    qmp = sock_dir / "qmp.sock"

    # Type=forking: the command returns once the daemon is ready, leaving the pidfile.
    started = subprocess.run(
        [sys.executable, "-m", "blockd", *argv[1:]], capture_output=True, text=True, timeout=30
    )
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    try:
        assert stat.S_IMODE(qmp.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(qmp))
            greeting = client.makefile("rb").readline()
            assert greeting.startswith(b'{"QMP"')
    finally:
        os.kill(pid, getattr(signal, unit["KillSignal"]))
    deadline = time.monotonic() + float(unit["TimeoutStopSec"])
    while _alive(pid):
        assert time.monotonic() < deadline, "blockd did not stop within TimeoutStopSec"
        time.sleep(0.05)
    assert not qmp.exists() and not pidfile.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes; the daemonized process is not our child
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
