"""Figure 9: ``block-commit``, one run against one daemon (as :mod:`benchmarks.figures`).

Two kinds of commit, each into a fresh copy of the chain's base (the commit writes into
it) in a fresh daemon, the chain opened as figure 1 opens it (base and mid read-only):

* non-active: ``top-node`` = mid, ``base-node`` = base; mid's data goes into the base and
  top's header then names the base. Timed from sending ``block-commit`` to
  ``BLOCK_JOB_COMPLETED``.
* active: the device (top) itself, ``base-node`` = base; what top and mid store goes into
  the base. Timed to ``BLOCK_JOB_READY``; then ``job-complete``, timed to
  ``BLOCK_JOB_COMPLETED``.

Both are timed on to the end of the ``blockdev-del`` commands that close the chain (they
flush it), as figure 1 is. The rate runs commit at a set ``speed`` an image whose every
cluster is stored (the chain's base, as the layer between an empty overlay and an empty
base below it), so every byte the job's ``offset`` counts was copied and charged.

Outputs are checked outside the timing, in the repetitions asked for: ``qemu-img check``
of what the job wrote, and ``qemu-img compare`` of the chain's guest view after the job
(top over the base for a non-active commit, the base alone for an active one) with the
untouched chain's.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.chains import Chain, MiB, empty_image
from benchmarks.daemons import Daemon, DaemonSpec
from benchmarks.figures import (
    Record,
    RunFailed,
    check_image,
    close_timed,
    open_chain,
    rate_record,
    run_dir,
    sample_offsets,
    timeout_for,
    verify_image,
    wait_job,
)
from benchmarks.noise import settle
from benchmarks.qmp_client import QMPError, QMPProtocolError

#: the QMP commands each run sends (a daemon lacking one gets ``n/a``)
COMMIT_CMDS = frozenset({"blockdev-add", "blockdev-del", "block-commit"})
ACTIVE_CMDS = COMMIT_CMDS | {"job-complete"}
RATE_CMDS = ACTIVE_CMDS | {"query-block-jobs"}


@dataclass(frozen=True)
class _Timed:
    """What one commit in a daemon measured; seconds from sending ``block-commit``."""

    seconds: float  # to BLOCK_JOB_COMPLETED (non-active) or BLOCK_JOB_READY (active)
    completed: float  # to BLOCK_JOB_COMPLETED
    stable: float  # to the end of the blockdev-del commands
    cpu: float
    peak_rss: float
    startup: float
    noise: dict[str, float | str]
    samples: list[tuple[float, int, int]]


def _commit(
    spec: DaemonSpec,
    rundir: Path,
    files: tuple[Path, Path, Path],
    *,
    active: bool,
    copied: int,
    timeout: float,
    speed: int = 0,
    poll: float = 0.0,
) -> _Timed:
    """Open ``files`` (base, mid, top) in a fresh ``spec`` daemon and commit them; with
    ``poll``, sample the job's progress every ``poll`` seconds until it is done."""
    with Daemon(spec, rundir) as d:
        try:
            with d.connect() as c:
                open_chain(c, "", *files)
                args: Record = {"job-id": "bench", "device": "top", "base-node": "base"}
                if not active:
                    args["top-node"] = "mid"
                if speed:
                    args["speed"] = speed
                end = "BLOCK_JOB_READY" if active else "BLOCK_JOB_COMPLETED"
                noise = settle(copied)
                cpu0 = d.cpu_seconds()
                t0 = time.perf_counter()
                c.execute("block-commit", args)
                deadline = t0 + timeout
                samples = (
                    sample_offsets(c, t0, until=end, poll=poll, deadline=deadline) if poll else []
                )
                left = max(1.0, deadline - time.perf_counter())
                seconds = completed = wait_job(c, "bench", left, event=end) - t0
                if active:
                    c.execute("job-complete", {"id": "bench"})
                    completed = wait_job(c, "bench", timeout) - t0
                cpu, peak, stable = close_timed(d, c, cpu0, t0)
        except (QMPError, QMPProtocolError, TimeoutError, OSError) as exc:
            raise RunFailed(f"{type(exc).__name__}: {exc}; daemon: {d.failure_line()}") from exc
    return _Timed(seconds, completed, stable, cpu, peak, d.startup_seconds, noise, samples)


def _verify(base: Path, top: Path, original: Path, *, active: bool) -> None:
    """The guest view after the commit reads as ``original`` (with its chain) does."""
    if active:
        verify_image(base, original, None)  # the base is the whole disk now
    else:
        check_image(base)
        verify_image(top, original, base)  # top's header names the base


def commit_run(spec: DaemonSpec, work: Path, chain: Chain, *, active: bool, verify: bool) -> Record:
    """Commit the chain (non-active or active, see the module docstring) into a fresh
    copy of its base.

    Returns:
        seconds (to ``BLOCK_JOB_COMPLETED``, or ``BLOCK_JOB_READY`` for an active
        commit), ``completed_seconds``, virtual and copied bytes and MiB/s of each,
        ``stable_seconds`` up to the end of the ``blockdev-del`` commands, the daemon's
        CPU seconds during the job and its peak RSS.
    """
    rundir = run_dir(work, spec.key)
    try:
        base = chain.fresh_base(rundir / "base.qcow2")
        top = chain.fresh_top(rundir / "top.qcow2")
        copied = chain.commit_active if active else chain.commit_mid
        timed = _commit(
            spec,
            rundir,
            (base, chain.mid, top),
            active=active,
            copied=copied,
            timeout=timeout_for(chain.size),
        )
        tv = time.perf_counter()
        if verify:
            _verify(base, top, chain.top, active=active)
        return {
            "verify_seconds": time.perf_counter() - tv,
            "seconds": timed.seconds,
            "completed_seconds": timed.completed,
            "virtual_bytes": chain.size,
            "copied_bytes": copied,
            "virtual_mibps": chain.size / MiB / timed.seconds,
            "copied_mibps": copied / MiB / timed.seconds,
            "stable_seconds": timed.stable,
            "stable_virtual_mibps": chain.size / MiB / timed.stable,
            "cpu_seconds": timed.cpu,
            "peak_rss_mib": timed.peak_rss,
            "startup_seconds": timed.startup,
            "verified": verify,
            "settle_seconds": timed.noise["seconds"],
            "sync_seconds": timed.noise["sync_seconds"],
        }
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def commit_rate_run(
    spec: DaemonSpec,
    work: Path,
    chain: Chain,
    *,
    active: bool,
    speed: int,
    poll: float,
    verify: bool,
) -> Record:
    """Commit the chain's base (every cluster stored) at ``speed`` bytes/s: as the layer
    between an empty overlay and an empty image below it (non-active), or with that
    overlay as the device (active), into the empty image; the achieved speed as figure 3
    measures it (:func:`benchmarks.figures.rate_run`), up to the job's end (non-active)
    or to ``BLOCK_JOB_READY`` (active).
    """
    rundir = run_dir(work, spec.key)
    try:
        below = empty_image(rundir / "below.qcow2", chain.size)
        top = empty_image(rundir / "top.qcow2", chain.size, backing=chain.base)
        timed = _commit(
            spec,
            rundir,
            (below, chain.base, top),
            active=active,
            copied=chain.size,
            timeout=chain.size / speed * 3 + 30,
            speed=speed,
            poll=poll,
        )
        if verify:
            _verify(below, top, chain.base, active=active)
        return rate_record(timed.samples, speed=speed, copied=chain.size, total=timed.seconds)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
