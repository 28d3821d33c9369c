"""Power loss during a block job: record the file layer, replay crash states.

:func:`recording` is a recording mode of the ``file`` driver: while active, every write
blockd makes to the files named is logged (file, offset, bytes) once it has completed,
and every flush twice, when it starts and when it ends: a flush makes stable the writes
completed before it started, and only once it ended. :func:`record_job` runs a job
(:class:`~stress.killkit.Kind`: a stream, a non-active commit, an active commit)
in-process on a copy of a template chain under it.

:func:`crash_states` then rebuilds what the disks could hold after a power cut at some
point of the log: for each file, every write that a flush ended before the cut covers,
plus any subset of its other writes (a disk may persist them in any order). Enumerated
per epoch (the operations between the ends of two flushes of any file): the state right
after the flush (nothing pending survived), every in-order prefix (everything issued
reached the disk) and random subsets of what was pending at the epoch's end.
:func:`replay` rebuilds each distinct state in a folder of its own (:class:`Replay`) and
judges it with :func:`stress.killkit.judge`: every image changed checks without
corruption (leaks allowed), the top's guest view through whatever its header names
equals the pre-job copy, and the header names what it may; the state with every write
is judged as the job's end.

Run long: ``python -m stress.powerloss --kind commit --replays 2000``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from blockd.block.drivers.file import FileDriver
from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from stress.killkit import LAYERS, Chain, Kind, Templates, job_commands, judge


@dataclass(frozen=True)
class Op:
    """One logged operation on file ``path``: a write (``data`` set), the start of a
    flush, or its end (``started``: the log position of its start)."""

    path: str
    offset: int = 0
    data: bytes | None = None
    started: int | None = None


@contextmanager
def recording(paths: set[str]) -> Iterator[list[Op]]:
    """Log the writes and flushes blockd's file driver issues to ``paths``."""
    log: list[Op] = []
    write, flush, copy_in = FileDriver.write, FileDriver.flush, FileDriver.copy_in

    async def rec_write(self: FileDriver, offset: int, data: Any) -> None:
        await write(self, offset, data)
        if self.path in paths:
            log.append(Op(self.path, offset, bytes(memoryview(data).cast("B"))))

    async def rec_copy_in(self: FileDriver, offset: int, extents: Any) -> None:
        await copy_in(self, offset, extents)
        if self.path in paths:  # an offloaded copy: log the bytes it wrote
            data = os.pread(self.fd, sum(e.length for e in extents), offset)
            log.append(Op(self.path, offset, data))

    async def rec_flush(self: FileDriver) -> None:
        logged = self.path in paths and not self.no_flush
        start = len(log)
        if logged:
            log.append(Op(self.path))
        await flush(self)
        if logged:
            log.append(Op(self.path, started=start))

    FileDriver.write, FileDriver.flush = rec_write, rec_flush  # type: ignore[method-assign]
    FileDriver.copy_in = rec_copy_in  # type: ignore[method-assign]
    try:
        yield log
    finally:
        FileDriver.write, FileDriver.flush = write, flush  # type: ignore[method-assign]
        FileDriver.copy_in = copy_in  # type: ignore[method-assign]


#: small qcow2 metadata caches for the image the job writes: tables are evicted and
#: written back during the job, not only at its end
TINY_CACHES = {"l2-cache-size": 8192, "refcount-cache-size": 8192}


async def _run_job(chain: Chain) -> None:
    daemon = Daemon()
    commands = load_all()

    async def call(name: str, arguments: dict[str, Any]) -> Any:
        return await commands[name].call(daemon, arguments)

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for name, arguments in job_commands(chain, written=TINY_CACHES):
            await call(name, arguments)
        with trio.fail_after(60):
            while (job := daemon.jobs.find(chain.job_id)) is not None and job.status != "null":
                if job.status == "ready":
                    await call("job-complete", {"id": chain.job_id})
                await trio.sleep(0.005)
        for name in chain.node_names():
            await call("blockdev-del", {"node-name": name})
        daemon.request_shutdown()


@dataclass
class Recording:
    """A job run under :func:`recording`: the chain it ran on, the templates it was
    copied from (the files before the job) and the log."""

    chain: Chain
    templates: Templates
    log: list[Op]

    def initial(self) -> dict[str, bytes]:
        """The chain's files (by name) before the job."""
        folder = self.chain.template
        return {f"{layer}.qcow2": (folder / f"{layer}.qcow2").read_bytes() for layer in LAYERS}


def record_job(directory: Path, kind: Kind, size: int = 24 << 20) -> Recording:
    """Run a job of ``kind`` on a copy of a template chain (``size``, 4 KiB clusters in
    the image the job writes) in ``directory``, under :func:`recording`; the job's result
    is judged too, and the log must rebuild the files as they are after it."""
    templates = Templates(directory / "templates", size, cluster=4096)
    chain = templates.chain(kind, directory / "job", "j", backing_file="base.qcow2")
    with recording({str(chain.path(layer)) for layer in LAYERS}) as log:
        trio.run(_run_job, chain)
    problems = judge(chain, finished=True)
    assert not problems, problems
    rec = Recording(chain, templates, log)
    rebuilt = crash_files(rec.initial(), log, range(len(log)))
    for name, data in rebuilt.items():
        assert data == (chain.directory / name).read_bytes(), f"the log does not rebuild {name}"
    return rec


def epochs(log: list[Op]) -> list[range]:
    """The log positions between the ends of flushes (of any file): epoch ``i`` ends
    where flush ``i`` ended (the last epoch at the end of the log)."""
    out: list[range] = []
    start = 0
    for i, op in enumerate(log):
        if op.started is not None:
            out.append(range(start, i))
            start = i + 1
    out.append(range(start, len(log)))
    return out


def cut(log: list[Op], at: int) -> tuple[list[int], list[int]]:
    """A power cut before ``log[at]``: the writes already stable (a flush of their file
    started after them and ended before the cut) and those that may or may not have
    reached the disk, as log positions."""
    covered: dict[str, int] = {}  # per file: writes before this position are stable
    for op in log[:at]:
        if op.started is not None:
            covered[op.path] = max(covered.get(op.path, 0), op.started)
    stable: list[int] = []
    pending: list[int] = []
    for i, op in enumerate(log[:at]):
        if op.data is not None:
            (stable if i < covered.get(op.path, 0) else pending).append(i)
    return stable, pending


def crash_states(log: list[Op], rnd: random.Random,
                 per_epoch: int) -> Iterator[tuple[str, list[int]]]:  # fmt: skip
    """``(description, log positions of the writes on disk)`` of crash states: first
    every write (``"everything"``); then per epoch the state right after the flush that
    opens it, every in-order prefix of its writes, and ``per_epoch`` random subsets of
    what is pending at its end. Together the prefixes are every prefix of the log."""
    yield "everything", [i for i, op in enumerate(log) if op.data is not None]
    for i, epoch in enumerate(epochs(log)):
        stable, _ = cut(log, epoch.start)
        yield f"after flush {i}", stable
        if not epoch:
            continue
        for k in range(1, len(epoch) + 1):
            stable, pending = cut(log, epoch.start + k)
            yield f"epoch {i}: first {k}/{len(epoch)} operations", stable + pending
        stable, pending = cut(log, epoch.stop)
        for _ in range(per_epoch):
            subset = [p for p in pending if rnd.random() < 0.5]
            yield (
                f"epoch {i}: {len(subset)}/{len(pending)} pending writes in any order",
                stable + subset,
            )


def crash_files(initial: Mapping[str, bytes], log: list[Op],
                chosen: Iterable[int]) -> dict[str, bytes]:  # fmt: skip
    """The files (by name) after the writes at log positions ``chosen``, in log order,
    over their ``initial`` bytes."""
    files = {name: bytearray(data) for name, data in initial.items()}
    for i in sorted(chosen):
        op = log[i]
        if op.data is None:
            continue
        image = files[Path(op.path).name]
        end = op.offset + len(op.data)
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[op.offset : end] = op.data
    return {name: bytes(data) for name, data in files.items()}


class Replay:
    """A folder where crash states of ``rec`` are rebuilt, one after the other."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.initial = rec.initial()
        self.on_disk = dict(self.initial)
        job = rec.chain
        self.chain = rec.templates.chain(job.kind, job.directory.parent / "replay", "r",
                                         backing_file=job.backing_file)  # fmt: skip

    def judge(self, chosen: Iterable[int], *, finished: bool) -> list[str]:
        """Rebuild the state with the writes at log positions ``chosen`` and judge it
        (:func:`stress.killkit.judge`; ``finished``: as the job's end)."""
        for name, data in crash_files(self.initial, self.rec.log, chosen).items():
            if data != self.on_disk[name]:
                (self.chain.directory / name).write_bytes(data)
                self.on_disk[name] = data
        return judge(self.chain, finished=finished)


def replay(rec: Recording, states: Iterable[tuple[str, list[int]]],
           limit: int) -> tuple[int, list[str]]:  # fmt: skip
    """Judge up to ``limit`` distinct ``states``, the one with every write as finished;
    (states judged, problems)."""
    folder = Replay(rec)
    every = tuple(i for i, op in enumerate(rec.log) if op.data is not None)
    seen: set[tuple[int, ...]] = set()
    problems: list[str] = []
    for desc, chosen in states:
        key = tuple(sorted(chosen))
        if key in seen:
            continue
        seen.add(key)
        problems += [f"{desc}: {p}" for p in folder.judge(key, finished=key == every)]
        if len(seen) >= limit:
            break
    return len(seen), problems


def run(replays: int, seed: int, kind: Kind = Kind.STREAM) -> tuple[int, int, list[str]]:
    """Record one job of ``kind`` and judge up to ``replays`` distinct crash states;
    returns (log length, states judged, problems)."""
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="blockd-power-") as tmp:
        rec = record_job(Path(tmp), kind)
        # the prefixes, then enough random subsets to cover ``replays`` (rounded up)
        groups = epochs(rec.log)
        spare = replays - sum(op.data is not None for op in rec.log) - len(groups)
        per_epoch = max(1, -(-spare // max(1, sum(1 for e in groups if e))))
        count, problems = replay(rec, crash_states(rec.log, rnd, per_epoch), replays)
    return len(rec.log), count, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kind", type=Kind, choices=list(Kind), default=Kind.STREAM)
    args = parser.parse_args()
    ops, count, problems = run(args.replays, args.seed, args.kind)
    print(f"power loss ({args.kind}): {ops} logged operations, {count} crash states "
          f"judged; problems: {len(problems)}")  # fmt: skip
    for problem in problems[:20]:
        print("  FAIL", problem)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
