"""Figure 8: what starting a daemon costs, and what blockd's start-up is made of.

``startup_run`` is one round against one daemon, started with the harness's command line
shape (``benchmarks/daemons.py``) in two fresh processes on fresh sockets:

- an idle one that no client ever connects to: its ``VmRSS`` once the monitor sockets are
  bound and the figure has settled (no node open, no client);
- a timed one: from the exec to the first successful ``connect()`` on its first monitor
  socket (the socket accepts), then, on that same connection, greeting,
  ``qmp_capabilities`` and a first ``blockdev-add`` (qcow2 over a file node) up to its
  reply; its settled ``VmRSS`` after that; then the wall time of one
  ``blockctl -s SOCK jobs`` against it (exec to exit, on another monitor socket).

``floor_run`` times what any Python program pays (``python -c pass``,
``python -c 'import trio'``, ``python -c 'import blockd.run'``) and splits
``import blockd.run`` by top-level package with ``python -X importtime``
(``import_breakdown``). It is the floor of blockd's start-up only.

Every process here runs in safe-path mode (``daemons.daemon_env``), so the installed
blockd is what is imported, and is reaped before the function returns. A misbehaving
daemon or tool raises :class:`~benchmarks.figures.RunFailed`; nothing is estimated.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.daemons import Daemon, DaemonSpec, daemon_env
from benchmarks.figures import Record, RunFailed
from benchmarks.qmp_client import QMPClient, QMPError, QMPProtocolError

#: seconds between two connect() attempts while a daemon starts
CONNECT_POLL = 0.0005
#: a start-up slower than this is a failure, not a figure
STARTUP_TIMEOUT = 30.0
#: the virtual size of the qcow2 image each timed daemon opens
IMAGE_SIZE = "1G"
#: the commands a daemon needs for ``startup_run`` (``blockctl jobs`` sends the last two)
STARTUP_CMDS = frozenset({"blockdev-add", "query-jobs", "query-block-jobs"})
#: the key prefixes of a floor record's per-package import times
IMPORT_CUMULATIVE = "import_us:"
IMPORT_SELF = "import_self_us:"


def _fresh_dir(work: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=work))


def find_blockctl(python: str = sys.executable) -> str | None:
    """``blockctl`` installed beside ``python`` (a console script of the same install),
    else the first on ``PATH``; None if there is neither."""
    beside = Path(python).parent / "blockctl"
    return str(beside) if beside.exists() else shutil.which("blockctl")


# -- figure 8: one start-up round against one daemon -----------------------------------------


def _first_connect(d: Daemon, deadline: float) -> socket.socket:
    """Connect to ``d``'s first monitor socket as soon as it accepts.

    Raises:
        RunFailed: the daemon exited, or nothing accepted before ``deadline``
            (``time.perf_counter()``).
    """
    path = str(d.sockets[0])
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()  # not bound yet, or bound and not listening yet
        except BaseException:
            sock.close()
            raise
        if d.proc.poll() is not None:
            raise RunFailed(f"exited with status {d.proc.returncode}: {d.failure_line()}")
        if time.perf_counter() > deadline:
            raise RunFailed(f"no monitor accepted in {STARTUP_TIMEOUT} s: {d.failure_line()}")
        time.sleep(CONNECT_POLL)


def settled_rss_mib(
    d: Daemon, since: float, *, wait: float = 0.2, quiet: float = 0.1, limit: float = 2.0
) -> float:
    """``d``'s ``VmRSS`` in MiB once it has settled: at least ``wait`` seconds after
    ``since`` (``time.perf_counter()``), the first reading equal to the one ``quiet``
    seconds before it, or the last reading at ``since + limit``.

    Raises:
        RunFailed: the daemon exited meanwhile.
    """
    time.sleep(max(0.0, since + wait - time.perf_counter()))
    last = -1
    while True:
        if d.proc.poll() is not None:
            raise RunFailed(f"exited with status {d.proc.returncode}: {d.failure_line()}")
        now = d.status_kib("VmRSS")
        if now == last or time.perf_counter() >= since + limit:
            return now / 1024
        last = now
        time.sleep(quiet)


def _make_image(qemu_img: str, path: Path) -> None:
    proc = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", str(path), IMAGE_SIZE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RunFailed(f"qemu-img create: {proc.stderr.strip()}")


def startup_run(spec: DaemonSpec, work: Path, *, qemu_img: str, blockctl: str | None) -> Record:
    """One start-up round of ``spec`` (see the module docstring) on a fresh empty qcow2
    image of ``IMAGE_SIZE``, made with ``qemu_img`` outside the timing.

    Returns:
        ``accept_seconds`` (exec to the first successful connect()),
        ``blockdev_add_seconds`` (exec to the blockdev-add reply), ``blockctl_seconds``
        (exec to exit of ``blockctl -s SOCK jobs``), ``idle_rss_mib`` (the idle process)
        and ``open_rss_mib`` (the timed one, after the blockdev-add).

    Raises:
        RunFailed: no ``blockctl``, a daemon that fails to start or answers with an
            error, or a ``blockctl`` that fails or prints something else than "no jobs".
    """
    if blockctl is None:
        raise RunFailed(f"no blockctl beside {sys.executable} or on PATH")
    rundir = _fresh_dir(work, f"startup-{spec.key}")
    try:
        image = rundir / "disk.qcow2"
        _make_image(qemu_img, image)
        try:
            with Daemon(spec, rundir / "idle", timeout=STARTUP_TIMEOUT) as d:
                idle = settled_rss_mib(d, time.perf_counter())
        except RuntimeError as exc:
            raise RunFailed(f"idle daemon: {exc}") from exc
        with Daemon(spec, rundir / "timed", timeout=STARTUP_TIMEOUT, wait_bound=False) as d:
            try:
                sock = _first_connect(d, d.spawned + STARTUP_TIMEOUT)
                accept = time.perf_counter() - d.spawned
                with QMPClient(str(d.sockets[0]), timeout=STARTUP_TIMEOUT, sock=sock) as c:
                    c.execute(
                        "blockdev-add",
                        {
                            "driver": "qcow2",
                            "node-name": "disk",
                            "file": {"driver": "file", "filename": str(image)},
                        },
                    )
                    added = time.perf_counter()
                    opened = settled_rss_mib(d, added, wait=0.1)
            except (QMPError, QMPProtocolError, TimeoutError, OSError) as exc:
                raise RunFailed(f"{type(exc).__name__}: {exc}; daemon: {d.failure_line()}") from exc
            t0 = time.perf_counter()
            ctl = subprocess.run(
                [blockctl, "-s", str(d.sockets[1]), "jobs"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=STARTUP_TIMEOUT,
                cwd=rundir,
                env=daemon_env(),
                check=False,
            )
            ctl_seconds = time.perf_counter() - t0
        if ctl.returncode != 0 or ctl.stdout.strip() != "no jobs":
            raise RunFailed(
                f"blockctl jobs exited {ctl.returncode}: {(ctl.stdout + ctl.stderr).strip()}"
            )
        return {
            "accept_seconds": accept,
            "blockdev_add_seconds": added - d.spawned,
            "blockctl_seconds": ctl_seconds,
            "idle_rss_mib": idle,
            "open_rss_mib": opened,
        }
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- figure 8: the floor of blockd's start-up ------------------------------------------------


def import_breakdown(stderr: str, root: str = "blockd") -> tuple[int, dict[str, tuple[int, int]]]:
    """Split the ``-X importtime`` report ``stderr`` of ``python -X importtime -c 'import
    ROOT...'`` by top-level package.

    Only the imports that the ``-c`` code made are counted: the trees whose outermost
    module is ``root`` or one of its submodules (the interpreter's own start-up imports,
    ``site`` and ``encodings``, are left out).

    Returns:
        (total, packages): total is the cumulative µs of those trees; packages maps each
        top-level package name to (cumulative, self) µs, where cumulative adds up the
        cumulative time of every import of one of its modules from outside the package
        (what importing it cost, the packages it imports included) and self the self
        time of all its modules (its own code alone; the selves add up to total, give or
        take the report's rounding to whole µs).
    """
    lines: list[tuple[int, int, int, str]] = []  # (level, self, cumulative, name)
    for text in stderr.splitlines():
        if not text.startswith("import time:"):
            continue
        fields = text[len("import time:") :].split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header line
        name = fields[2].rstrip()
        level = (len(name) - len(name.lstrip())) // 2
        lines.append((level, int(fields[0]), int(fields[1]), name.strip()))
    chosen: list[tuple[int, int, int, str]] = []
    pending: list[tuple[int, int, int, str]] = []
    for line in lines:  # children are reported before their parent
        pending.append(line)
        if line[0] == 0:
            if line[3].split(".")[0] == root:
                chosen += pending
            pending = []
    total = sum(cum for level, _, cum, _ in chosen if level == 0)
    packages: dict[str, tuple[int, int]] = {}
    parents: list[tuple[int, str]] = []  # (level, package) of the enclosing imports
    for level, own, cum, name in reversed(chosen):  # parents first
        while parents and parents[-1][0] >= level:
            parents.pop()
        package = name.split(".")[0]
        outer = parents[-1][1] if parents else None
        c, s = packages.get(package, (0, 0))
        packages[package] = (c + (cum if outer != package else 0), s + own)
        parents.append((level, package))
    return total, packages


def _wall(argv: Sequence[str], cwd: Path) -> tuple[float, str]:
    """Exec ``argv`` in safe-path mode and wait for it: (seconds, stderr).

    Raises:
        RunFailed: it exited non-zero.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=daemon_env(),
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RunFailed(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return seconds, proc.stderr


def floor_run(work: Path, python: str = sys.executable) -> Record:
    """One round of blockd's start-up floor with ``python`` (by default the harness's own,
    the one that runs blockd unless ``--blockd`` says otherwise).

    Returns:
        ``python_seconds``, ``trio_seconds`` and ``blockd_import_seconds``: exec to exit
        of ``python -c pass``, ``-c 'import trio'`` and ``-c 'import blockd.run'``;
        ``importtime_total_us``, the last under ``-X importtime``; and for each top-level
        package P of :func:`import_breakdown`, ``import_us:P`` (cumulative) and
        ``import_self_us:P`` (self).
    """
    rundir = _fresh_dir(work, "floor")
    try:
        rec: Record = {}
        for key, code in (
            ("python_seconds", "pass"),
            ("trio_seconds", "import trio"),
            ("blockd_import_seconds", "import blockd.run"),
        ):
            rec[key] = _wall([python, "-c", code], rundir)[0]
        _, report = _wall([python, "-X", "importtime", "-c", "import blockd.run"], rundir)
        total, packages = import_breakdown(report)
        if not total:
            raise RunFailed("python -X importtime reported no import of blockd")
        rec["importtime_total_us"] = total
        for name, (cumulative, own) in packages.items():
            rec[IMPORT_CUMULATIVE + name] = cumulative
            rec[IMPORT_SELF + name] = own
        return rec
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
