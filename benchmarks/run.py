"""The benchmark: blockd against qemu-storage-daemon, interleaved, medians, ratios (issue 6).

    python -m benchmarks.run --quick            # under a minute: 64 MiB chains, 2 reps
    python -m benchmarks.run                    # 1 GiB chains, 5 reps, scale up to 4 GiB
    python -m benchmarks.run --qsd /usr/bin/qemu-storage-daemon --json out.json

Theory of operation: inputs are built once (benchmarks/chains.py) and only read; each
timed run streams a fresh copy of top in a fresh daemon process (benchmarks/figures.py).
For every repetition, every test runs on the reference and then on blockd (A B A B ...),
so slow drifts of the machine hit both alike; each figure is the median over the
repetitions (figure 8 runs several rounds per repetition, the daemons alternating each
round, and takes the median over all of them). A daemon that lacks a command a test
needs (blockd before block-stream landed) is reported as unavailable for that test; a run
that fails is reported as failed and the test is not retried on that daemon. Nothing is
ever estimated or filled in.
Progress goes to stderr; the table (benchmarks/report.py) to stdout, and its last line is
the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import commit, figures, noise, startup
from benchmarks.chains import Chain, GiB, MiB, build_chain, clone_chain
from benchmarks.daemons import (
    Daemon,
    DaemonSpec,
    blockd_spec,
    default_reference,
    reference_spec,
)
from benchmarks.figures import Record
from benchmarks.noise import free_bytes, mem_available
from benchmarks.report import render, rows_for, summary

REPO = Path(__file__).resolve().parent.parent

STREAM_CMDS = frozenset({"blockdev-add", "blockdev-del", "block-stream"})
RATE_CMDS = STREAM_CMDS | {"query-block-jobs"}
QMP_CMDS = frozenset({"query-block-jobs"})


@dataclass(frozen=True)
class Plan:
    """What one invocation measures."""

    quick: bool
    reps: int
    size: int  # figures 1 and 2
    rate_size: int  # figure 3
    speed: int  # figure 3
    qmp_sequential: int  # figure 4
    qmp_per_client: int  # figure 4, each of 10 clients
    streams: int  # figure 5
    stream_size: int  # figure 5, each chain
    scale_sizes: tuple[int, ...]  # figure 7
    verify: str  # "first" (first repetition only), "all" or "none"
    settle_cap: int | None  # bytes; noise control touches at most this much memory
    startup_rounds: int  # figure 8: start-ups of each daemon per repetition
    commit_size: int  # figure 9: the chain of the non-active commit
    active_size: int  # figure 9: the chain of the active commit
    figures: frozenset[int]
    seed: int


DaemonRun = Callable[[DaemonSpec, bool], Record]  # (daemon, verify outputs) -> record
HostRun = Callable[[], Record]


@dataclass
class Test:
    """One test: run against each daemon (``daemon_run``) or once on the host (``host_run``,
    figure 2), with the QMP commands a daemon needs for it.

    Each repetition runs it ``rounds`` times, the daemons alternating (A B A B ...); each
    round's record is one of the runs the figure's median is taken over. ``only``, a
    daemon's key, runs it against that daemon alone (the others get no outcome).
    """

    name: str
    figure: int
    needs: frozenset[str] = frozenset()
    daemon_run: DaemonRun | None = None
    host_run: HostRun | None = None
    rounds: int = 1
    only: str | None = None

    def targets(self, daemons: Sequence[DaemonSpec]) -> list[DaemonSpec]:
        """The daemons this test runs against, in order."""
        return [d for d in daemons if self.only in (None, d.key)]


@dataclass
class Outcome:
    runs: list[Record] = field(default_factory=list)
    failure: str | None = None
    unavailable: str | None = None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- setup ------------------------------------------------------------------------------------


def probe(spec: DaemonSpec, work: Path) -> tuple[frozenset[str] | None, str]:
    """Start ``spec`` once and ask ``query-commands``; (None, reason) if that fails."""
    rundir = work / f"probe-{spec.key}"
    try:
        with Daemon(spec, rundir, timeout=30) as d, d.connect() as c:
            names = frozenset(str(x["name"]) for x in c.execute("query-commands"))
            return names, ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _disk_needed(plan: Plan) -> int:
    chains = [plan.size, plan.rate_size, *plan.scale_sizes]
    if 9 in plan.figures:
        chains += [plan.commit_size, plan.active_size]
    need = int(1.6 * sum(set(chains)))  # base + mid + top of each distinct chain
    if 5 in plan.figures:
        need += plan.streams * int(2.6 * plan.stream_size)  # clones + their streamed tops
    return need + 2 * max(chains) + GiB  # one run's outputs + convert/copy/base, and a margin


def make_plan(args: argparse.Namespace) -> Plan:
    quick: bool = args.quick
    size = (args.size or (64 if quick else 1024)) * MiB
    scale = () if quick else (256 * MiB, GiB, 4 * GiB)
    figs = (
        frozenset(int(x) for x in args.figures.split(","))
        if args.figures
        else frozenset(range(1, 10))
    )
    return Plan(
        quick=quick,
        reps=args.reps or (2 if quick else 5),
        size=size,
        rate_size=size if quick else 256 * MiB,
        speed=64 * MiB,
        qmp_sequential=500 if quick else 2000,
        qmp_per_client=100 if quick else 500,
        streams=16,
        stream_size=64 * MiB,
        scale_sizes=scale if 7 in figs else (),
        verify=args.verify,
        settle_cap=(args.settle_cap if args.settle_cap is not None else 1024 if quick else 0) * MiB
        or None,
        startup_rounds=5,
        commit_size=size if quick else max(MiB, size // 2 // MiB * MiB),
        active_size=size,
        figures=figs,
        seed=args.seed,
    )


# -- the measurement loop -----------------------------------------------------------------------


def build_tests(plan: Plan, work: Path, qemu_img: str) -> list[Test]:
    """Build the inputs and return the tests in the order each repetition runs them."""
    inputs = work / "inputs"
    built: dict[int, Chain] = {}

    def chain(size: int) -> Chain:
        if size not in built:
            t0 = time.perf_counter()
            built[size] = build_chain(inputs / f"chain-{size // MiB}M", size, seed=plan.seed)
            _say(f"  built {size // MiB} MiB chain in {time.perf_counter() - t0:.1f} s")
        return built[size]

    def stream(ch: Chain, base_node: bool) -> DaemonRun:
        def run(spec: DaemonSpec, verify: bool) -> Record:
            return figures.stream_run(spec, work, ch, base_node=base_node, verify=verify)

        return run

    def rate(spec: DaemonSpec, verify: bool) -> Record:
        ch = chain(plan.rate_size)
        return figures.rate_run(spec, work, ch, speed=plan.speed, poll=0.02, verify=verify)

    def qmp(spec: DaemonSpec, verify: bool) -> Record:
        return figures.qmp_run(
            spec, work, sequential=plan.qmp_sequential, per_client=plan.qmp_per_client
        )

    def concurrent(spec: DaemonSpec, verify: bool) -> Record:
        return figures.concurrent_run(spec, work, clones, verify=verify)

    blockctl = startup.find_blockctl()

    def start(spec: DaemonSpec, verify: bool) -> Record:
        return startup.startup_run(spec, work, qemu_img=qemu_img, blockctl=blockctl)

    def floor(spec: DaemonSpec, verify: bool) -> Record:
        return startup.floor_run(work)

    def commit_of(ch: Chain, active: bool) -> DaemonRun:
        def run(spec: DaemonSpec, verify: bool) -> Record:
            return commit.commit_run(spec, work, ch, active=active, verify=verify)

        return run

    def commit_rate(active: bool) -> DaemonRun:
        def run(spec: DaemonSpec, verify: bool) -> Record:
            ch, speed = chain(plan.rate_size), plan.speed
            return commit.commit_rate_run(
                spec, work, ch, active=active, speed=speed, poll=0.02, verify=verify
            )

        return run

    tests: list[Test] = []
    f = plan.figures
    if f & {1, 6}:
        tests.append(Test("full", 1, STREAM_CMDS, stream(chain(plan.size), False)))
    if 1 in f:
        tests.append(Test("to_base", 1, STREAM_CMDS, stream(chain(plan.size), True)))
    if 2 in f:
        main = chain(plan.size)
        tests.append(Test("convert", 2, host_run=lambda: figures.convert_run(work, main, qemu_img)))
        tests.append(Test("copy", 2, host_run=lambda: figures.plain_copy_run(work, main)))
    if 3 in f:
        chain(plan.rate_size)
        tests.append(Test("rate", 3, RATE_CMDS, rate))
    if 4 in f:
        tests.append(Test("qmp", 4, QMP_CMDS, qmp))
    clones: list[Chain] = []
    if f & {5, 6}:
        src = chain(plan.stream_size)
        t0 = time.perf_counter()
        clones += [clone_chain(src, inputs / f"clone-{i}") for i in range(plan.streams)]
        dt = time.perf_counter() - t0
        _say(f"  copied {plan.streams} chains of {plan.stream_size // MiB} MiB in {dt:.1f} s")
        tests.append(Test("concurrent", 5, STREAM_CMDS, concurrent))
        tests.append(Test("durable", 5, host_run=lambda: figures.durable_copy_run(work, clones)))
    for size in plan.scale_sizes:
        if size == plan.size and 1 in f:
            continue  # figure 1's full stream is this point of the scale
        free = free_bytes(work)
        if size >= 4 * GiB and free < int(2.6 * size) + GiB:
            _say(f"  skipping the {size // GiB} GiB scale point: {free / GiB:.1f} GiB free")
            continue
        tests.append(Test(f"scale_{size // MiB}", 7, STREAM_CMDS, stream(chain(size), False)))
    if 8 in f:
        n = plan.startup_rounds
        tests.append(Test("startup", 8, startup.STARTUP_CMDS, start, rounds=n))
        tests.append(Test("startup_floor", 8, daemon_run=floor, rounds=n, only="blockd"))
    if 9 in f:
        tests.append(
            Test("commit", 9, commit.COMMIT_CMDS, commit_of(chain(plan.commit_size), False))
        )
        tests.append(
            Test("active", 9, commit.ACTIVE_CMDS, commit_of(chain(plan.active_size), True))
        )
        chain(plan.rate_size)
        tests.append(Test("commit_rate", 9, commit.RATE_CMDS, commit_rate(False)))
        tests.append(Test("active_rate", 9, commit.RATE_CMDS, commit_rate(True)))
    return tests


def measure(
    plan: Plan,
    tests: Sequence[Test],
    daemons: Sequence[DaemonSpec],
    commands: dict[str, frozenset[str] | None],
    reasons: dict[str, str],
) -> dict[str, dict[str, Outcome]]:
    """Run every test ``plan.reps`` times, daemons interleaved; returns test -> key -> Outcome."""
    out: dict[str, dict[str, Outcome]] = {t.name: {} for t in tests}
    for t in tests:
        if t.host_run is not None:
            out[t.name]["host"] = Outcome()
            continue
        for d in t.targets(daemons):
            o = out[t.name][d.key] = Outcome()
            cmds = commands[d.key]
            if cmds is None:
                o.unavailable = f"did not start: {reasons[d.key]}"
            elif not t.needs <= cmds:
                o.unavailable = "lacks " + ", ".join(sorted(t.needs - cmds))
    for rep in range(plan.reps):
        verify = plan.verify == "all" or (plan.verify == "first" and rep == 0)
        for t in tests:
            targets: list[DaemonSpec | None] = [None] if t.host_run else [*t.targets(daemons)]
            for spec in (s for _ in range(t.rounds) for s in targets):
                key = "host" if spec is None else spec.key
                o = out[t.name][key]
                if o.unavailable or o.failure:
                    continue
                t0 = time.perf_counter()
                try:
                    if spec is None:
                        assert t.host_run is not None
                        rec = t.host_run()
                    else:
                        assert t.daemon_run is not None
                        rec = t.daemon_run(spec, verify)
                except figures.RunFailed as exc:
                    o.failure = str(exc)
                    _say(f"  rep {rep + 1} {t.name:10s} {key:9s} FAILED: {exc}")
                    continue
                o.runs.append(rec)
                dt = time.perf_counter() - t0
                _say(f"  rep {rep + 1} {t.name:10s} {key:9s} {_brief(rec)} ({dt:.1f} s)")
    return out


def _brief(rec: Record) -> str:
    for k in ("virtual_mibps", "aggregate_virtual_mibps", "mibps", "readwrite_mibps"):
        if k in rec:
            return f"{rec[k]:.0f} MiB/s"
    if "ratio" in rec:
        return f"rate {rec['ratio']:.3f}"
    if "seq_median_us" in rec:
        return f"median {rec['seq_median_us']:.0f} us"
    if "blockdev_add_seconds" in rec:
        return f"blockdev-add reply {rec['blockdev_add_seconds']:.3f} s after exec"
    if "importtime_total_us" in rec:
        return f"import blockd.run {rec['importtime_total_us'] / 1000:.0f} ms"
    return ""


# -- main ---------------------------------------------------------------------------------------


def _host_info() -> Record:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "mem_available_gib": round(mem_available() / GiB, 1),
        "loadavg": [round(x, 2) for x in load],
        "kernel": os.uname().release,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark blockd against qemu-storage-daemon (issue 6).",
    )
    p.add_argument(
        "--quick", action="store_true", help="64 MiB chains, 2 reps, no scale; under a minute"
    )
    p.add_argument("--reps", type=int, help="repetitions (default 2 quick, 5 full)")
    p.add_argument(
        "--size", type=int, help="chain size in MiB for figures 1-2 (default 64 quick, 1024 full)"
    )
    p.add_argument(
        "--qsd",
        type=Path,
        default=None,
        help="reference qemu-storage-daemon (default: QEMU 10.0's if unpacked, else /usr/bin's)",
    )
    p.add_argument(
        "--qemu-img", default=None, help="qemu-img for figure 2 (default: beside --qsd, else PATH)"
    )
    p.add_argument(
        "--blockd", default=None, help="command starting blockd (default: this python -m blockd)"
    )
    p.add_argument("--figures", default="", help="comma-separated subset of 1-9 (default all)")
    p.add_argument("--json", type=Path, default=None, help="save all runs and the table here")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the temporary directory (default $TMPDIR or /tmp)",
    )
    p.add_argument(
        "--verify",
        choices=("first", "all", "none"),
        default="first",
        help="check streamed images with qemu-img: first repetition (default), all, none",
    )
    p.add_argument(
        "--settle-cap",
        type=int,
        default=None,
        help="MiB noise control may touch per run (default: 1024 quick, no cap full; 0: no cap)",
    )
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    qsd = args.qsd or default_reference()
    qemu_img = args.qemu_img or (
        str(qsd.parent / "qemu-img") if (qsd.parent / "qemu-img").exists() else "qemu-img"
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    noise.configure(plan.settle_cap)
    started = time.perf_counter()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="blockd-bench-", dir=args.workdir))
    try:
        need, free = _disk_needed(plan), free_bytes(work)
        if need > free:
            dropped = tuple(s for s in plan.scale_sizes if s < 4 * GiB)
            _say(f"only {free / GiB:.1f} GiB free in {work}, need about {need / GiB:.1f} GiB")
            plan = Plan(**{**asdict(plan), "scale_sizes": dropped, "figures": plan.figures})
            if _disk_needed(plan) > free:
                print(
                    f"not enough disk space in {work}: {free / GiB:.1f} GiB free", file=sys.stderr
                )
                return 2
        daemons = [reference_spec(qsd), blockd_spec(args.blockd, REPO)]
        host_before = _host_info()
        _say(f"blockd benchmark ({'quick' if plan.quick else 'full'} mode) in {work}")
        commands: dict[str, frozenset[str] | None] = {}
        reasons: dict[str, str] = {}
        for spec in daemons:
            commands[spec.key], reasons[spec.key] = probe(spec, work)
            status = "ok" if commands[spec.key] is not None else f"unusable: {reasons[spec.key]}"
            _say(f"  {spec.key}: {spec.label}: {status}")
        tests = build_tests(plan, work, qemu_img)
        out = measure(plan, tests, daemons, commands, reasons)
        host_after = _host_info()
        rows = rows_for(plan, tests)
        lines, table = render(plan, rows, out, daemons)
        sizes = sorted({plan.size, plan.stream_size, *plan.scale_sizes})
        if 9 in plan.figures:
            sizes = sorted({*sizes, plan.commit_size, plan.active_size})
        size_list = ", ".join(f"{s // MiB} MiB" for s in sizes)
        header = [
            f"blockd benchmark, {'quick' if plan.quick else 'full'} mode: {plan.reps} repetitions, "
            f"interleaved reference/blockd, medians; chains of {size_list}",
            f"  reference: {daemons[0].label} ({' '.join(daemons[0].argv)})",
            f"  blockd:    {daemons[1].label} ({' '.join(daemons[1].argv)})",
            f"  host: {host_before['cpus']} CPUs, load average {host_before['loadavg'][0]} before, "
            f"{host_after['loadavg'][0]} after (other work on the machine makes figures noisy); "
            f"took {time.perf_counter() - started:.0f} s",
            "",
        ]
        final = summary(plan, out, daemons)
        print("\n".join([*header, *lines, "", final]), flush=True)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "plan": {**asdict(plan), "figures": sorted(plan.figures)},
                        "daemons": [asdict(d) for d in daemons],
                        "host": {"before": host_before, "after": host_after},
                        "table": table,
                        "runs": {
                            t: {k: asdict(o) for k, o in per.items()} for t, per in out.items()
                        },
                        "summary": final,
                    },
                    indent=1,
                )
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
