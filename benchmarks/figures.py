"""One measurement each: a single run of one figure against one daemon (or the host).

Every function here starts what it needs, measures once, cleans up its own files, and
returns a flat dict of numbers (the JSON record of that run). It raises ``RunFailed``
when the daemon misbehaves (an error reply, a job error, a timeout, a wrong result), so
the caller can record the failure and carry on with the other daemon.

Timed sections are preceded by ``noise.settle`` (sync + touch/free 3x the bytes the run
writes). Stream outputs are checked afterwards, outside the timing: ``qemu-img check``,
the expected backing file, and ``qemu-img compare`` against the untouched chain.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import ForkContext, ForkServerContext
from pathlib import Path
from typing import Any

from benchmarks.chains import Chain, MiB
from benchmarks.daemons import MONITORS, Daemon, DaemonSpec
from benchmarks.noise import settle
from benchmarks.qmp_client import RECEIVED, QMPClient, QMPError, QMPProtocolError
from blockd.block.host.io import writeback_call

Record = dict[str, Any]
_counter = itertools.count()


class RunFailed(Exception):
    """A run could not produce a valid figure (the message says why)."""


def run_dir(work: Path, tag: str) -> Path:
    d = work / f"{tag}-{next(_counter)}"
    d.mkdir(parents=True)
    return d


def timeout_for(nbytes: int) -> float:
    return 60.0 + nbytes / (8 * MiB)  # generous: 8 MiB/s would already be a failure


# -- chains in a daemon ----------------------------------------------------------------------


def add_qcow2(
    c: QMPClient, name: str, path: Path, *, backing: str | None = None, read_only: bool = False
) -> None:
    """``blockdev-add`` a qcow2 node ``name`` over a ``file`` node of ``path``."""
    args: Record = {
        "driver": "qcow2",
        "node-name": name,
        "read-only": read_only,
        "file": {"driver": "file", "filename": str(path)},
    }
    if backing is not None:
        args["backing"] = backing
    c.execute("blockdev-add", args)


def open_chain(c: QMPClient, prefix: str, base: Path, mid: Path, top: Path) -> str:
    """blockdev-add base, mid (backing base) and top (backing mid); returns top's node name.

    Node names are ``<prefix>base``, ``<prefix>mid``, ``<prefix>top``; base and mid are
    read-only, as QEMU opens backing files.
    """
    add_qcow2(c, f"{prefix}base", base, read_only=True)
    add_qcow2(c, f"{prefix}mid", mid, backing=f"{prefix}base", read_only=True)
    add_qcow2(c, f"{prefix}top", top, backing=f"{prefix}mid")
    return f"{prefix}top"


def close_chain(c: QMPClient, prefix: str) -> None:
    """blockdev-del top, mid, base: closing flushes the images (qcow2 metadata included)."""
    for name in ("top", "mid", "base"):
        c.execute("blockdev-del", {"node-name": f"{prefix}{name}"})


def close_timed(d: Daemon, c: QMPClient, cpu0: float, t0: float) -> tuple[float, float, float]:
    """After a job: the daemon's CPU seconds since ``cpu0`` and its peak RSS; then the
    chain is closed (:func:`close_chain`), and the seconds from ``t0`` to that end."""
    cpu = d.cpu_seconds() - cpu0
    peak = d.peak_rss_mib()
    close_chain(c, "")
    return cpu, peak, time.perf_counter() - t0


def wait_job(
    c: QMPClient, job: str, timeout: float, *, event: str = "BLOCK_JOB_COMPLETED"
) -> float:
    """Wait for ``job``'s BLOCK_JOB_COMPLETED (or ``event``, e.g. BLOCK_JOB_READY);
    return its arrival time (perf_counter).

    Raises:
        RunFailed: the job reported an error, ended without ``event`` or stopped short
            of its length.
    """
    ev = c.wait_event((event, "BLOCK_JOB_COMPLETED"), device=job, timeout=timeout)
    data: Record = ev.get("data", {})
    if "error" in data:
        raise RunFailed(f"job {job} failed: {data['error']}")
    if ev.get("event") != event:
        raise RunFailed(f"job {job} completed without {event}: {data}")
    if data.get("offset") != data.get("len"):
        raise RunFailed(f"job {job} completed early: {data}")
    return float(ev[RECEIVED])


# -- checking outputs -------------------------------------------------------------------------


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def check_image(image: Path) -> None:
    """``qemu-img check`` of ``image``.

    Raises:
        RunFailed: the image is not consistent.
    """
    check = _qemu_img("check", "-q", "-f", "qcow2", str(image))
    if check.returncode != 0:
        raise RunFailed(
            f"qemu-img check {image.name}: {check.stdout.strip()} {check.stderr.strip()}"
        )


def verify_image(image: Path, original: Path, backing: Path | None) -> None:
    """Check a job's output (a streamed top, a committed overlay or base): consistent,
    backed by ``backing`` (None: standalone), and reading exactly what ``original`` (the
    untouched image, with its chain) reads.

    Raises:
        RunFailed: any of the three checks fails.
    """
    check_image(image)
    info = json.loads(_qemu_img("info", "--output=json", "-f", "qcow2", str(image)).stdout)
    got = info.get("backing-filename")
    want = None if backing is None else str(backing)
    if got != want:
        raise RunFailed(f"backing file of {image.name} is {got!r}, expected {want!r}")
    cmp = _qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", str(image), str(original))
    if cmp.returncode != 0:
        raise RunFailed(f"qemu-img compare: {image.name} differs ({cmp.stdout.strip()})")


# -- figures 1, 6, 7: one stream --------------------------------------------------------------


def stream_run(
    spec: DaemonSpec, work: Path, chain: Chain, *, base_node: bool, verify: bool
) -> Record:
    """Stream a fresh copy of top in a fresh daemon; full, or down to ``base-node`` = base.

    Returns:
        seconds (block-stream sent to BLOCK_JOB_COMPLETED received), virtual and copied
        bytes, MiB/s of each; ``stable_seconds`` up to the end of the ``blockdev-del``
        commands that close the chain (they flush it: the data is then on disk for both
        daemons, whichever flushed when); the daemon's CPU seconds during the job, its
        peak RSS (VmHWM) and its RSS once the chain is open.
    """
    rundir = run_dir(work, spec.key)
    try:
        top = chain.fresh_top(rundir / "top.qcow2")
        copied = chain.copy_to_base if base_node else chain.copy_full
        with Daemon(spec, rundir) as d:
            try:
                with d.connect() as c:
                    open_chain(c, "", chain.base, chain.mid, top)
                    idle = d.rss_mib()
                    args: Record = {"job-id": "bench", "device": "top"}
                    if base_node:
                        args["base-node"] = "base"
                    noise = settle(copied)
                    cpu0 = d.cpu_seconds()
                    t0 = time.perf_counter()
                    c.execute("block-stream", args)
                    seconds = wait_job(c, "bench", timeout_for(chain.size)) - t0
                    cpu, peak, stable = close_timed(d, c, cpu0, t0)
            except (QMPError, QMPProtocolError, TimeoutError, OSError) as exc:
                raise RunFailed(f"{type(exc).__name__}: {exc}; daemon: {d.failure_line()}") from exc
        tv = time.perf_counter()
        if verify:
            verify_image(top, chain.top, chain.base if base_node else None)
        return {
            "verify_seconds": time.perf_counter() - tv,
            "seconds": seconds,
            "virtual_bytes": chain.size,
            "copied_bytes": copied,
            "virtual_mibps": chain.size / MiB / seconds,
            "copied_mibps": copied / MiB / seconds,
            "stable_seconds": stable,
            "stable_virtual_mibps": chain.size / MiB / stable,
            "cpu_seconds": cpu,
            "peak_rss_mib": peak,
            "open_rss_mib": idle,
            "startup_seconds": d.startup_seconds,
            "verified": verify,
            "settle_seconds": noise["seconds"],
            "sync_seconds": noise["sync_seconds"],
        }
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- figure 3: rate limit ---------------------------------------------------------------------


def _slope(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) samples."""
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    my = sum(y for _, y in samples) / n
    num = sum((t - mt) * (y - my) for t, y in samples)
    den = sum((t - mt) ** 2 for t, _ in samples)
    return num / den


def sample_offsets(
    c: QMPClient, t0: float, *, until: str, poll: float, deadline: float
) -> list[tuple[float, int, int]]:
    """(seconds since ``t0``, ``offset``, ``len``) of job ``bench`` from
    ``query-block-jobs`` every ``poll`` seconds, until the job sends ``until`` (or
    completes) or ``deadline`` (perf_counter) passes."""
    samples: list[tuple[float, int, int]] = []
    ends = {until, "BLOCK_JOB_COMPLETED"}
    while not any(e.get("event") in ends for e in c.events) and time.perf_counter() < deadline:
        for job in c.execute("query-block-jobs"):
            if job.get("device") == "bench":
                t = time.perf_counter() - t0
                samples.append((t, int(job["offset"]), int(job["len"])))
        time.sleep(poll)
    return samples


def rate_record(
    samples: Sequence[tuple[float, int, int]], *, speed: int, copied: int, total: float
) -> Record:
    """The rate figures from the samples of a job that copies ``copied`` bytes, every one
    charged, in ``total`` seconds (see :func:`rate_run`)."""
    expected = copied / speed
    steady = [(t, float(off)) for t, off, ln in samples if t >= 0.1 * expected and off < ln]
    if len(steady) < 5:
        raise RunFailed(f"only {len(steady)} samples in the steady window ({total:.2f} s run)")
    achieved = _slope(steady)
    return {
        "requested_bps": speed,
        "achieved_bps": achieved,
        "ratio": achieved / speed,
        "job_average_ratio": copied / total / speed,
        "seconds": total,
        "samples": len(steady),
    }


def rate_run(
    spec: DaemonSpec, work: Path, chain: Chain, *, speed: int, poll: float, verify: bool
) -> Record:
    """Stream mid and base into an empty top at ``speed`` bytes/s (so every byte is copied
    and rate-limited) and measure the achieved speed.

    ``achieved`` is the least-squares slope of the job's ``offset`` (sampled by
    ``query-block-jobs`` every ``poll`` seconds) over the steady part of the run: after
    the first 10 % of the expected duration, before the job reaches its end. It is
    reported as a fraction of ``speed``; ``job_average`` is size / total job time.
    """
    rundir = run_dir(work, spec.key)
    try:
        top = chain.empty_top(rundir / "top.qcow2")
        expected = chain.size / speed
        with Daemon(spec, rundir) as d:
            try:
                with d.connect() as c:
                    open_chain(c, "", chain.base, chain.mid, top)
                    settle(chain.size)
                    t0 = time.perf_counter()
                    c.execute("block-stream", {"job-id": "bench", "device": "top", "speed": speed})
                    deadline = t0 + expected * 3 + 30
                    samples = sample_offsets(
                        c, t0, until="BLOCK_JOB_COMPLETED", poll=poll, deadline=deadline
                    )
                    total = wait_job(c, "bench", max(1.0, deadline - time.perf_counter())) - t0
                    close_chain(c, "")
            except (QMPError, QMPProtocolError, TimeoutError, OSError) as exc:
                raise RunFailed(f"{type(exc).__name__}: {exc}; daemon: {d.failure_line()}") from exc
        if verify:
            verify_image(top, chain.mid, None)
        return rate_record(samples, speed=speed, copied=chain.size, total=total)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- figure 4: QMP round trips ----------------------------------------------------------------

_QUERY = b'{"execute": "query-block-jobs", "id": 1}\r\n'


def _latencies(c: QMPClient, n: int) -> list[int]:
    lat: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        reply = c.roundtrip(_QUERY, 1)
        lat.append(clock() - t)
        if "return" not in reply:
            raise RunFailed(f"query-block-jobs failed: {reply}")
    return lat


def _client_worker(
    path: str,
    n: int,
    barrier: Any,
    conn: multiprocessing.connection.Connection,
) -> None:
    try:
        with QMPClient(path) as c:
            _latencies(c, 20)  # warm-up
            barrier.wait()
            t0 = time.perf_counter_ns()
            lat = _latencies(c, n)
            conn.send(("ok", t0, time.perf_counter_ns(), lat))
    except Exception as exc:  # report to the parent rather than die silently
        with contextlib.suppress(Exception):
            barrier.abort()
        conn.send(("error", 0, 0, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _pct(sorted_ns: Sequence[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def qmp_run(spec: DaemonSpec, work: Path, *, sequential: int, per_client: int) -> Record:
    """``sequential`` query-block-jobs on one connection, then ``per_client`` each from
    ten client processes at once (one per monitor socket), against a fresh idle daemon.

    Latencies are send-to-reply times in microseconds; commands/s is commands over the
    wall time (for ten clients: first start to last finish).
    """
    rundir = run_dir(work, spec.key)
    try:
        with Daemon(spec, rundir) as d:
            try:
                with d.connect(0) as c:
                    _latencies(c, 50)  # warm-up
                    cpu0 = d.cpu_seconds()
                    t0 = time.perf_counter_ns()
                    lat = _latencies(c, sequential)
                    wall = (time.perf_counter_ns() - t0) / 1e9
                    cpu = d.cpu_seconds() - cpu0
            except (QMPError, QMPProtocolError, TimeoutError, OSError) as exc:
                raise RunFailed(f"{type(exc).__name__}: {exc}; daemon: {d.failure_line()}") from exc
            lat.sort()
            rec: Record = {
                "seq_commands": sequential,
                "seq_median_us": statistics.median(lat) / 1000,
                "seq_p99_us": _pct(lat, 0.99),
                "seq_cmds_per_s": sequential / wall,
                "seq_cpu_us_per_cmd": cpu / sequential * 1e6,
            }
            # fork is cheapest; with other threads alive (e.g. under pytest) forking warns
            # on Python 3.12+, so start the clients from a fork server instead.
            ctx: ForkContext | ForkServerContext = (
                mp.get_context("fork")
                if threading.active_count() == 1
                else mp.get_context("forkserver")
            )
            barrier = ctx.Barrier(MONITORS + 1)
            pipes = []
            procs = []
            for i in range(MONITORS):
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_client_worker, args=(str(d.sockets[i]), per_client, barrier, child)
                )
                p.start()
                child.close()
                pipes.append(parent)
                procs.append(p)
            try:
                with contextlib.suppress(Exception):  # a failed worker reports via its pipe
                    barrier.wait(timeout=60)
                results = []
                for pipe in pipes:
                    if not pipe.poll(120):
                        raise RunFailed("a QMP client process did not finish in 120 s")
                    try:
                        results.append(pipe.recv())
                    except EOFError:
                        raise RunFailed("a QMP client process died before reporting") from None
            finally:
                for p in procs:
                    p.join(10)
                    if p.is_alive():
                        p.kill()
                        p.join()
            errors = [r[3] for r in results if r[0] != "ok"]
            if errors:
                raise RunFailed(f"10 clients: {errors[0]}; daemon: {d.failure_line()}")
            start = min(r[1] for r in results)
            end = max(r[2] for r in results)
            all_lat = sorted(x for r in results for x in r[3])
            rec.update(
                {
                    "conc_clients": MONITORS,
                    "conc_commands": len(all_lat),
                    "conc_cmds_per_s": len(all_lat) / ((end - start) / 1e9),
                    "conc_median_us": statistics.median(all_lat) / 1000,
                    "conc_p99_us": _pct(all_lat, 0.99),
                }
            )
            return rec
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- figures 5 and 6: concurrent streams ------------------------------------------------------


def concurrent_run(
    spec: DaemonSpec, work: Path, chains: Sequence[Chain], *, verify: bool
) -> Record:
    """One daemon, one chain per element of ``chains`` (distinct files), all streamed at
    once: jobs started back to back, timed until the last BLOCK_JOB_COMPLETED, and until
    every chain is closed (flushed) as ``stable_seconds``."""
    rundir = run_dir(work, spec.key)
    try:
        tops = [ch.fresh_top(rundir / f"top{i}.qcow2") for i, ch in enumerate(chains)]
        total_virtual = sum(ch.size for ch in chains)
        total_copied = sum(ch.copy_full for ch in chains)
        with Daemon(spec, rundir) as d:
            try:
                with d.connect() as c:
                    for i, (ch, top) in enumerate(zip(chains, tops, strict=True)):
                        open_chain(c, f"c{i}-", ch.base, ch.mid, top)
                    idle = d.rss_mib()
                    noise = settle(total_copied)
                    cpu0 = d.cpu_seconds()
                    t0 = time.perf_counter()
                    for i in range(len(chains)):
                        c.execute("block-stream", {"job-id": f"j{i}", "device": f"c{i}-top"})
                    seconds = (
                        max(
                            wait_job(c, f"j{i}", timeout_for(total_virtual))
                            for i in range(len(chains))
                        )
                        - t0
                    )
                    cpu = d.cpu_seconds() - cpu0
                    peak = d.peak_rss_mib()
                    for i in range(len(chains)):
                        close_chain(c, f"c{i}-")
                    stable = time.perf_counter() - t0
            except (QMPError, QMPProtocolError, TimeoutError, OSError) as exc:
                raise RunFailed(f"{type(exc).__name__}: {exc}; daemon: {d.failure_line()}") from exc
        tv = time.perf_counter()
        if verify:
            with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as ex:
                list(
                    ex.map(
                        lambda p: verify_image(p[1], p[0].top, None),
                        zip(chains, tops, strict=True),
                    )
                )
        return {
            "verify_seconds": time.perf_counter() - tv,
            "streams": len(chains),
            "seconds": seconds,
            "virtual_bytes": total_virtual,
            "copied_bytes": total_copied,
            "aggregate_virtual_mibps": total_virtual / MiB / seconds,
            "aggregate_copied_mibps": total_copied / MiB / seconds,
            "stable_seconds": stable,
            "stable_virtual_mibps": total_virtual / MiB / stable,
            "cpu_seconds": cpu,
            "peak_rss_mib": peak,
            "open_rss_mib": idle,
            "startup_seconds": d.startup_seconds,
            "verified": verify,
            "settle_seconds": noise["seconds"],
            "sync_seconds": noise["sync_seconds"],
        }
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def durable_copy_run(
    work: Path, chains: Sequence[Chain], *, block: int = 4 * MiB, behind: int = 8 * MiB
) -> Record:
    """The host's ceiling for figure 5: each chain's ``copy_full`` bytes (from its base)
    copied into a new file with ``os.copy_file_range``, all files at once (a thread
    each), with the copy's writeback started every ``behind`` bytes
    (``sync_file_range(WRITE)``, which overlaps the disk's work with the copying: about
    a fifth faster here than one ``fdatasync`` at the end) and each file
    ``fdatasync``ed when done; timed until every copy is on disk. A stream that makes its
    copy durable before it completes (as blockd's does) does the same work at least."""
    rundir = run_dir(work, "durable")
    start_writeback = writeback_call()
    try:
        total = sum(ch.copy_full for ch in chains)
        settle(total)

        def one(i: int, ch: Chain) -> None:
            src = os.open(ch.base, os.O_RDONLY)
            dst = os.open(rundir / f"copy{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pos = started = 0
                while pos < ch.copy_full:
                    got = os.copy_file_range(src, dst, min(block, ch.copy_full - pos), pos, pos)
                    if got <= 0:
                        raise RunFailed(f"copy_file_range: short copy at {pos}")
                    pos += got
                    if pos - started >= behind:
                        start_writeback(dst)
                        started = pos
                os.fdatasync(dst)
            finally:
                os.close(src)
                os.close(dst)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(chains)) as ex:
            list(ex.map(one, range(len(chains)), chains))
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "copied_bytes": total,
            "virtual_mibps": sum(ch.size for ch in chains) / MiB / seconds,
        }
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


# -- figure 2: the host's copy speeds on the same files ----------------------------------------


def convert_run(work: Path, chain: Chain, qemu_img: str) -> Record:
    """``qemu-img convert -O qcow2`` of the whole chain (read through top) to a new file."""
    rundir = run_dir(work, "convert")
    try:
        out = rundir / "out.qcow2"
        settle(chain.size)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [qemu_img, "convert", "-f", "qcow2", "-O", "qcow2", str(chain.top), str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RunFailed(f"qemu-img convert: {proc.stderr.strip()}")
        return {"seconds": seconds, "mibps": chain.size / MiB / seconds}
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def plain_copy_run(work: Path, chain: Chain, *, block: int = 4 * MiB) -> Record:
    """Sequential read+write of ``size`` bytes (from base.qcow2) into a new file with one
    reused buffer, and the same with ``os.copy_file_range``: the practical ceilings."""
    rundir = run_dir(work, "copy")
    try:
        rec: Record = {}
        buf = bytearray(block)
        view = memoryview(buf)
        for kind in ("readwrite", "copy_file_range"):
            out = rundir / f"{kind}.bin"
            settle(chain.size)
            src = os.open(chain.base, os.O_RDONLY)
            dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                t0 = time.perf_counter()
                pos = 0
                while pos < chain.size:
                    n = min(block, chain.size - pos)
                    if kind == "readwrite":
                        got = os.preadv(src, [view[:n]], pos)
                        os.pwrite(dst, view[:got], pos)
                    else:
                        got = os.copy_file_range(src, dst, n, pos, pos)
                    if got <= 0:
                        raise RunFailed(f"{kind}: short read at {pos}")
                    pos += got
                seconds = time.perf_counter() - t0
            finally:
                os.close(src)
                os.close(dst)
            out.unlink()
            rec[f"{kind}_seconds"] = seconds
            rec[f"{kind}_mibps"] = chain.size / MiB / seconds
        return rec
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
