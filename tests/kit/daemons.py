"""Daemons for the tests: blockd and qemu-storage-daemon as processes, and blockd
in-process.

Processes: :func:`daemon` starts one with QSD-style options (:func:`monitor_args`), waits
for the file that says it is ready, and always stops and reaps it; :func:`replies` and
:func:`transcript` run a list of commands or a script against one and return what it
answered, so one list runs on QEMU's daemon and on blockd alike. A daemon is ready when
its pidfile exists or its socket listens (``/proc/net/unix``): the tests never probe a
QEMU monitor by connecting, since it serves one client at a time and a probe would be
that client. :class:`Lab` wraps a
daemon started by ``blockd.client.lab``, shared by a module's tests.

In-process: :class:`Harness` drives a :class:`~blockd.daemon.Daemon` through its command
handlers (no socket), :func:`run_command` is one such call, and :class:`Served` is an
in-process server on a real UNIX socket.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import trio

from blockd.client.lab import (
    DaemonProcess,
    LabError,
    make_chain,
    query_commands,
    reset_daemon,
    running_daemon,
)
from blockd.commands.registry import Command, load_all
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.server import Server
from kit.chains import base_and_top, blockdev_args, file_ref
from kit.cli import BLOCKD, TEST_DAEMON, ctl_in_process
from kit.host import held_bytes, unix_listening
from kit.qemu import QSD, QSD10, qemu10_env
from kit.qmp import RawClient, Reply, SyncClient, short_name, sync_client

#: seconds a daemon may take to be ready, and to stop
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# --- processes -----------------------------------------------------------------------------


def monitor_args(path: Path | str, chardev: str = "m", *options: str) -> list[str]:
    """A QMP monitor listening on ``path``: ``--chardev socket,...,server=on,wait=off
    --monitor chardev=ID[,OPTIONS]``."""
    return [
        "--chardev", f"socket,id={chardev},path={path},server=on,wait=off",
        "--monitor", ",".join([f"chardev={chardev}", *options]),
    ]  # fmt: skip


def wait_for_file(proc: subprocess.Popen[Any], path: Path, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``path`` exists: a pidfile, or a socket file something listens on
    (:func:`kit.host.unix_listening`), by looking at it, never by connecting.

    Raises:
        AssertionError: the process exited first or ``timeout`` passed; it is killed and
            its stderr (when piped) is in the message.
    """
    deadline = time.monotonic() + timeout
    while not (path.exists() and (not path.is_socket() or unix_listening(path))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"{proc.args!r} did not create {path} ({proc.returncode}): {err}")
        time.sleep(0.01)


def start(
    argv: Sequence[str],
    *,
    ready: Path | None,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.PIPE,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[str]:
    """Start ``argv`` (stdin closed, text mode) and wait for ``ready`` to exist
    (:func:`wait_for_file`); the caller stops it with :func:`stop`."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True,
        env=None if env is None else dict(env), pass_fds=tuple(pass_fds),
    )  # fmt: skip
    if ready is not None:
        wait_for_file(proc, ready)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM ``proc`` if it still runs, wait for it (SIGKILL after ``timeout``), close
    its pipes; its exit status."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def daemon(
    argv: Sequence[str], *, ready: Path | None, **options: Any
) -> Iterator[subprocess.Popen[str]]:
    """:func:`start` for the ``with`` block, then :func:`stop`."""
    proc = start(argv, ready=ready, **options)
    try:
        yield proc
    finally:
        stop(proc)


@dataclass
class BlockdProcess:
    """``blockd --socket SOCK --pidfile PIDFILE`` started by :func:`start_blockd`."""

    proc: subprocess.Popen[str]
    sock: Path
    pidfile: Path


def start_blockd(sock_dir: Path, *args: str) -> BlockdProcess:
    """``blockd --socket S --pidfile P ARGS``, returned once the pidfile exists."""
    sock, pidfile = sock_dir / "d.sock", sock_dir / "d.pid"
    argv = [*BLOCKD, "--socket", str(sock), "--pidfile", str(pidfile), *args]
    return BlockdProcess(start(argv, ready=pidfile), sock, pidfile)


def replies(
    program: Sequence[str],
    sock_dir: Path,
    commands: Sequence[tuple[str, Mapping[str, Any]]],
    locks_of: Sequence[Path] = (),
) -> list[Reply]:
    """Start ``program`` with one monitor, run ``commands`` (each with a numbered ``id``,
    removed from its reply), record the lock bytes held on ``locks_of`` (as a last
    pseudo-reply), stop it; the replies."""
    path = sock_dir / "qmp.sock"
    path.unlink(missing_ok=True)
    argv = [*program, *monitor_args(path)]
    with (
        daemon(argv, ready=path, stderr=subprocess.DEVNULL),
        sync_client(path, negotiate=False) as client,
    ):
        answers: list[Reply] = []
        for number, (name, arguments) in enumerate([("qmp_capabilities", {}), *commands]):
            reply = client.request(name, arguments, id=number)
            assert reply.pop("id") == number, reply
            answers.append(reply)
        if locks_of:
            answers.append({"return": [sorted(held_bytes(p)) for p in locks_of]})
        return answers[1:]


def _job_chain(where: Path, inject: Mapping[str, Any] | None) -> list[str]:
    """``--blockdev`` options of ``base`` (through blkdebug ``base-dbg`` with ``inject``)
    <- ``top`` over the images of :func:`base_and_top`."""
    nodes: list[dict[str, Any]] = [file_ref(where / "base.qcow2", **{"node-name": "base-file"})]
    under_base = "base-file"
    if inject is not None:
        nodes.append({"driver": "blkdebug", "node-name": "base-dbg", "image": "base-file",
                      "inject-error": [dict(inject)]})  # fmt: skip
        under_base = "base-dbg"
    nodes += [
        {"driver": "qcow2", "node-name": "base", "file": under_base},
        file_ref(where / "top.qcow2", **{"node-name": "top-file"}),
        {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"},
    ]
    return blockdev_args(nodes)


def transcript(
    program: Sequence[str],
    where: Path,
    sock_dir: Path,
    script: Callable[[SyncClient], None],
    inject: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Run ``script`` against ``program`` (QSD's options) on a fresh 4 MiB chain
    ``base`` (all 0x01) <- ``top`` in ``where``, base's reads optionally through blkdebug
    ``inject`` rule; everything the client received, in order (:class:`SyncClient`)."""
    base_and_top(where, "4M", 1)
    path = sock_dir / "m.sock"
    path.unlink(missing_ok=True)
    env = qemu10_env() if program[0] == QSD and QSD10.exists() else None
    argv = [*program, *_job_chain(where, inject), *monitor_args(path)]
    with daemon(argv, ready=path, env=env), sync_client(path) as client:
        script(client)
        return client.transcript


def require_commands(available: set[str], *needed: str) -> None:
    """Skip the calling test while the daemon lacks one of ``needed``."""
    missing = sorted(set(needed) - available)
    if missing:
        pytest.skip(f"the daemon does not implement {', '.join(missing)} yet")


@contextmanager
def lab_daemon(prefix: str) -> Iterator[tuple[DaemonProcess, set[str]]]:
    """The daemon under test (:data:`TEST_DAEMON`, ``blockd.client.lab``) in a fresh
    folder, and the commands it lists, for the ``with`` block; when blockd itself does not
    start or answer, the calling test (or fixture) is skipped."""
    where = Path(tempfile.mkdtemp(prefix=prefix))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, where, ignore_errors=True)
        try:
            process = stack.enter_context(running_daemon(where, TEST_DAEMON))
            commands = query_commands(process.socket)
        except (LabError, OSError) as exc:
            if TEST_DAEMON is None:
                pytest.skip(f"blockd does not start or answer yet: {exc}")
            raise
        yield process, commands


@dataclass
class Lab:
    """A running daemon (``blockd.client.lab``) shared by a module's tests; images go to
    ``images``."""

    daemon: DaemonProcess
    commands: set[str]
    images: Path

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    def require(self, *commands: str) -> None:
        """Skip the calling test while the daemon lacks one of ``commands``."""
        require_commands(self.commands, *commands)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``blockctl -s SOCKET ARGS...`` (:func:`kit.cli.ctl_in_process`)."""
        return ctl_in_process("-s", str(self.socket), *args)

    def add_chain(self, size: str = "8M") -> list[Path]:
        """``blockd.client.lab.make_chain`` in ``images`` (top first), its top added as
        node ``top`` with ``blockctl add``."""
        self.require("blockdev-add")
        paths = make_chain(self.images, size)
        proc = self.ctl("add", "driver=qcow2", "node-name=top", "file.driver=file",
                        f"file.filename={paths[0]}")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "added node top\n"
        return paths

    def reset(self) -> None:
        """Fail if the daemon died; else empty it (no jobs, no nodes) for the next test."""
        if self.daemon.process.poll() is not None:
            raise AssertionError(f"the daemon died: {self.daemon.log.read_text()}")
        if {"query-jobs", "query-named-block-nodes", "blockdev-del"} <= self.commands:
            reset_daemon(self.daemon.socket)


# --- in-process ----------------------------------------------------------------------------


async def run_command(
    d: Daemon, name: str, arguments: Mapping[str, Any],
    commands: Mapping[str, Command] | None = None,
) -> Any:  # fmt: skip
    """Run command ``name`` on ``d`` as the server does: the arguments validated against
    the schema first, the handler called, its return value checked against the schema."""
    d.schema.validate_arguments(name, arguments)
    value = await (commands or load_all())[name].call(d, arguments)
    d.schema.validate_return(name, value)
    return value


class Harness:
    """A daemon whose commands are called in-process, recording every event."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.events: list[dict[str, Any]] = []
        self.commands = load_all()
        self._changed = trio.Event()
        daemon.events.subscribe(self._sink)

    def _sink(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()

    async def cmd(self, name: str, **arguments: Any) -> Any:
        """Run ``name`` (:func:`run_command`) with keyword arguments (``job_id`` for
        ``job-id``; ``new_state`` stays as it is)."""
        wire = {
            key.replace("_", "-") if key != "new_state" else key: value
            for key, value in arguments.items()
        }
        return await run_command(self.d, name, wire, self.commands)

    async def raw(self, name: str, arguments: Mapping[str, Any]) -> Any:
        """Run ``name`` with ``arguments`` as given (wire names)."""
        return await run_command(self.d, name, arguments, self.commands)

    async def add(self, *nodes: Mapping[str, Any]) -> None:
        """``blockdev-add`` each of ``nodes`` (options: :mod:`kit.chains`), in order."""
        for node in nodes:
            await self.raw("blockdev-add", node)

    async def error(self, name: str, **arguments: Any) -> str:
        """Run a command that must fail; return its error text."""
        try:
            await self.cmd(name, **arguments)
        except QMPError as exc:
            return exc.desc
        raise AssertionError(f"{name} {arguments} did not fail")

    def names(self, *, start: int = 0) -> list[str]:
        """The events since ``start`` as ``JSC(status)`` / event names."""
        return [short_name(e["event"], e.get("data")) for e in self.events[start:]]

    def last(self, name: str) -> dict[str, Any]:
        for event in reversed(self.events):
            if event["event"] == name:
                data: dict[str, Any] = event.get("data", {})
                return data
        raise AssertionError(f"no {name} event in {self.names()}")

    async def wait_event(
        self, name: str, *, status: str | None = None, timeout: float = 30, start: int = 0
    ) -> dict[str, Any]:
        """Wait for an event (``JOB_STATUS_CHANGE`` with ``status``) after index ``start``."""
        with trio.fail_after(timeout):
            while True:
                for event in self.events[start:]:
                    if event["event"] != name:
                        continue
                    data: dict[str, Any] = event.get("data", {})
                    if status is None or data.get("status") == status:
                        return data
                self._changed = trio.Event()
                await self._changed.wait()

    async def wait_progress(self, job_id: str, timeout: float = 30) -> None:
        """Wait until ``job_id`` has made some progress (real I/O: polls)."""
        with trio.fail_after(timeout):
            while True:
                job = self.d.jobs.find(job_id)
                if job is not None and job.progress_current > 0:
                    return
                await trio.sleep(0.005)

    async def wait_done(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """Wait until ``job_id`` reaches ``null`` or ``concluded``; return its completion."""
        with trio.move_on_after(timeout) as scope:
            return await self._wait_done(job_id)
        assert not scope.cancelled_caught, f"{job_id} not done; events: {self.names()}"
        raise AssertionError("unreachable")

    async def _wait_done(self, job_id: str) -> dict[str, Any]:
        while True:
            for event in self.events:
                data = event.get("data", {})
                if (
                    event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                    and data.get("device") == job_id
                ):
                    result: dict[str, Any] = {"event": event["event"], **data}
                    job = self.d.jobs.find(job_id)
                    if job is None or job.status in ("concluded", "null"):
                        return result
            self._changed = trio.Event()
            await self._changed.wait()


@dataclass
class Served:
    """An in-process server on a real UNIX socket (the ``served`` fixture)."""

    daemon: Daemon
    server: Server
    path: Path

    async def client(self, negotiate: bool = True) -> RawClient:
        client = await RawClient.connect(self.path)
        if negotiate:
            await client.negotiate()
        return client
