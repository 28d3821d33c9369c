"""Start, observe and stop the daemons under test: blockd and qemu-storage-daemon.

Both get the same command line shape, ten monitor sockets each (qemu-storage-daemon
serves one client per monitor socket, and figure 4 runs ten clients at once):

    <daemon> --chardev socket,id=mon0,path=D/m0.sock,server=on,wait=off --monitor chardev=mon0
             ... (mon1 .. mon9)

Every timed run uses a fresh process, so its peak RSS (``VmHWM``) and CPU time
(``utime + stime`` from ``/proc/PID/stat``) belong to that run alone. Processes are
stopped by their own pid: SIGTERM, then SIGKILL after a grace period.

Daemons run in Python's safe-path mode (``PYTHONSAFEPATH=1``, as the test suite's), so
``python -m blockd`` started from the checkout runs the installed package, as users have
it, and not the checkout's ``blockd/`` (which lacks the schema the build ships).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.qmp_client import QMPClient, connect_retry

MONITORS = 10
#: QEMU 10.0 unpacked by .ci/fetch-qemu10 (the tests read the same variable)
QSD10 = (
    Path(os.environ.get("BLOCKD_QEMU10_ROOT", "/work/qsd10/root")) / "usr/bin/qemu-storage-daemon"
)
QSD_SYSTEM = Path("/usr/bin/qemu-storage-daemon")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class DaemonSpec:
    """How to start one daemon.

    Attributes:
        key: short name used in tables and JSON ("reference" or "blockd").
        label: human-readable name with version.
        argv: the command before the ``--chardev``/``--monitor`` arguments.
        cwd: working directory for the process (None: inherit).
    """

    key: str
    label: str
    argv: tuple[str, ...]
    cwd: str | None = None


def default_reference() -> Path:
    """QEMU 10.0's qemu-storage-daemon when unpacked, else Debian's."""
    return QSD10 if QSD10.exists() else QSD_SYSTEM


def reference_spec(path: Path) -> DaemonSpec:
    """The reference daemon at ``path``; its label carries ``--version``'s first line."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        version = out.splitlines()[0].strip() if out else str(path)
    except OSError as exc:
        raise RuntimeError(f"cannot run reference daemon {path}: {exc}") from exc
    return DaemonSpec("reference", version, (str(path),))


def blockd_spec(command: str | None, repo_root: Path) -> DaemonSpec:
    """blockd started as ``command`` (shell words) or ``<this python> -m blockd``."""
    argv = tuple(shlex.split(command)) if command else (sys.executable, "-m", "blockd")
    label = "blockd"
    try:
        head = subprocess.run(
            ["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo_root), "status", "--porcelain", "--", "blockd"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        if head:
            label = f"blockd (commit {head}{' + uncommitted changes' if dirty else ''})"
    except OSError:
        pass
    return DaemonSpec("blockd", label, argv, str(repo_root))


def daemon_env() -> dict[str, str]:
    """This process's environment with ``PYTHONSAFEPATH=1``: a Python started in it does
    not put its working directory (or a script's) first on ``sys.path``."""
    return {**os.environ, "PYTHONSAFEPATH": "1"}


def monitor_args(sockets: list[Path]) -> list[str]:
    """The ``--chardev``/``--monitor`` pairs for ``sockets``, ids mon0, mon1, ..."""
    args: list[str] = []
    for i, sock in enumerate(sockets):
        args += ["--chardev", f"socket,id=mon{i},path={sock},server=on,wait=off"]
        args += ["--monitor", f"chardev=mon{i}"]
    return args


class Daemon:
    """One running daemon process with ``MONITORS`` monitor sockets in ``rundir``.

    Use as a context manager: the process is stopped (and waited for) on exit.

    Args:
        wait_bound: return once every monitor socket is bound (``startup_seconds`` is then
            the time from spawn to that); False: return right after the exec, the caller
            waits as it needs (``startup_seconds`` is NaN).

    Attributes:
        spawned: ``time.perf_counter()`` just before the process was spawned.

    Raises:
        RuntimeError: the process exits or no monitor accepts within ``timeout``.
    """

    def __init__(
        self, spec: DaemonSpec, rundir: Path, *, timeout: float = 30.0, wait_bound: bool = True
    ) -> None:
        self.spec = spec
        rundir.mkdir(parents=True, exist_ok=True)
        self.rundir = rundir
        self.sockets = [rundir / f"m{i}.sock" for i in range(MONITORS)]
        self.log_path = rundir / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            [*spec.argv, *monitor_args(self.sockets)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=spec.cwd,
            env=daemon_env(),
        )
        self.pid = self.proc.pid
        self._timeout = timeout
        self.startup_seconds = float("nan")
        if wait_bound:
            t0 = time.monotonic()
            self._wait_ready(t0 + timeout)
            self.startup_seconds = time.monotonic() - t0  # spawn to all monitor sockets bound

    def _wait_ready(self, deadline: float) -> None:
        while not all(s.exists() for s in self.sockets):
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"exited with status {self.proc.returncode}: {self.failure_line()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"monitor sockets missing after {self._timeout} s: {self.failure_line()}"
                )
            time.sleep(0.005)

    def connect(self, index: int = 0, *, timeout: float = 60.0) -> QMPClient:
        """A negotiated QMP connection on monitor ``index``.

        Raises:
            RuntimeError: the daemon died or did not answer.
        """
        try:
            return connect_retry(
                str(self.sockets[index]), deadline=time.monotonic() + self._timeout, timeout=timeout
            )
        except (TimeoutError, OSError) as exc:
            raise RuntimeError(f"{exc}; daemon says: {self.failure_line()}") from exc

    def failure_line(self) -> str:
        """The last non-blank line of the daemon's output (usually the error)."""
        lines = [ln for ln in self.log_tail(4000).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def log_tail(self, n: int = 600) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    # -- /proc -----------------------------------------------------------------------------

    def status_kib(self, field: str) -> int:
        """A ``kB`` field of /proc/PID/status (``VmHWM``, ``VmRSS``); 0 if unreadable."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads) so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                stat = f.read()
        except OSError:
            return float("nan")
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat

    # -- lifetime --------------------------------------------------------------------------

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; idempotent."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
