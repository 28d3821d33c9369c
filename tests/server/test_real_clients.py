"""Real QMP clients against a daemon subprocess: qemu.qmp's QMPClient (asyncio), its
legacy sync API, qmp-shell, and socat (docs/clients.md §4)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from kit.cli import BLOCKD
from kit.daemons import BlockdProcess, start, start_blockd, stop
from kit.qmp import IO_TIMEOUT, legacy_quit
from kit.repo import EXAMPLES
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from blockd import QEMU_VERSION, __version__


def test_qmpclient_asyncio(daemon_process: BlockdProcess) -> None:
    async def session() -> None:
        qmp = QMPClient("blockd-test")
        await asyncio.wait_for(qmp.connect(str(daemon_process.sock)), IO_TIMEOUT)
        try:
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.version["package"] == f"blockd {__version__}"
            version = await qmp.execute("query-version")
            assert isinstance(version, dict)
            assert tuple(version["qemu"][k] for k in ("major", "minor", "micro")) == QEMU_VERSION
            names = await qmp.execute("query-commands")
            assert isinstance(names, list) and {"name": "quit"} in names
            schema = await qmp.execute("query-qmp-schema")
            assert isinstance(schema, list)
            # libvirt's probe: block-stream/arg-type/backing-mask-protocol, optional bool.
            entries = {entry["name"]: entry for entry in schema}
            arg_type = entries[entries["block-stream"]["arg-type"]]
            members = {member["name"]: member for member in arg_type["members"]}
            mask = members["backing-mask-protocol"]
            assert mask["type"] == "bool" and mask["default"] is None
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            # Several commands in flight at once: replies matched by id.
            many = await asyncio.gather(*(qmp.execute("query-version") for _ in range(20)))
            assert all(reply == version for reply in many)
        finally:
            await qmp.disconnect()

    asyncio.run(session())


def test_legacy_sync_client_and_quit(sock_dir: Path) -> None:
    daemon = start_blockd(sock_dir)
    try:
        qmp = QEMUMonitorProtocol(str(daemon.sock))
        greeting = qmp.connect(negotiate=True)
        assert greeting["QMP"]["version"]["package"] == f"blockd {__version__}"
        assert qmp.cmd_obj({"execute": "query-version"})["return"]["package"].startswith("blockd")
        legacy_quit(qmp)  # (qemu.qmp re-raises the server's EOF, QSD's too)
        assert daemon.proc.wait(timeout=IO_TIMEOUT) == 0
        assert not daemon.sock.exists() and not daemon.pidfile.exists()
    finally:
        stop(daemon.proc)


def test_qmp_shell(daemon_process: BlockdProcess) -> None:
    shell = shutil.which("qmp-shell")
    assert shell is not None, "qmp-shell comes with qemu.qmp"
    result = subprocess.run(
        [shell, str(daemon_process.sock)],
        input="query-version\nquery-commands\nno-such-command\n",
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT * 3,
        check=False,
    )
    major, minor, micro = QEMU_VERSION
    assert f"Connected to QEMU {major}.{minor}.{micro}" in result.stdout, result.stderr
    assert f'"package": "blockd {__version__}"' in result.stdout
    assert '{"name": "query-qmp-schema"}' in result.stdout
    assert "The command no-such-command has not been found" in result.stdout


def test_socat_example(daemon_process: BlockdProcess) -> None:
    script = EXAMPLES / "qmp-socat.sh"
    result = subprocess.run(
        [str(script), str(daemon_process.sock)],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[0].startswith('{"QMP": ') and lines[1] == '{"return": {}}'
    assert f'"package": "blockd {__version__}"' in lines[2] and lines[2].endswith('"id": 1}')


def test_iotests_style_client_mode_chardev(sock_dir: Path) -> None:
    """QEMU's iotests listen on a socket and let the daemon dial in (``server=off``)."""
    path = sock_dir / "qmp-listen.sock"
    qmp = QEMUMonitorProtocol(str(path), server=True)
    pidfile = sock_dir / "iotests.pid"
    argv = [*BLOCKD, "--chardev", f"socket,id=qmp-sock,path={path}", "--monitor", "qmp-sock",
            "--pidfile", str(pidfile)]  # fmt: skip
    proc = start(argv, ready=None, stdout=None, stderr=None)
    try:
        qmp.accept(IO_TIMEOUT)
        assert qmp.cmd_obj({"execute": "query-version"})["return"]["package"].startswith("blockd")
        assert int(pidfile.read_text()) == proc.pid  # iotests compare it with the child's pid
        legacy_quit(qmp)
        assert proc.wait(timeout=IO_TIMEOUT) == 0
        assert not pidfile.exists()
    finally:
        stop(proc)
