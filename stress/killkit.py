"""kill -9 during block jobs: one round copies chains, starts blockd, starts a job on each
chain (a stream, a non-active commit or an active commit: :class:`Kind`), kills the
daemon at a random moment, judges every image with the real tools, then runs the jobs
again to completion and judges once more. Shared by ``tests/reliability/test_kill.py``
and ``python -m stress.kill``.

The chains (:func:`make_chain`) are made once per layout by :class:`Templates` and
copied for every job, together with a copy of their guest view made before any job.
After the kill, for every chain:

* each image passes ``qemu-img check`` without corruption (leaked clusters are fine: a
  kill may leave clusters allocated that nothing points to yet), or is byte for byte the
  template it was copied from (which did);
* the guest view of the chain as it is on disk, from the top through whatever backing
  file its header names, equals the copy made before the job;
* the top's header names what it may: a stream's the mid or nothing; a non-active
  commit's the mid (not done) or the base (its prepare finished); an active commit's
  the mid, always (it changes no header).

After the second run the same holds, and the job's end is on disk: a stream's top has no
backing file, a commit's names the base, and an active commit's base alone holds the
guest view.

Kill points (:class:`Point`) are the jobs the last ``query-block-jobs`` before the kill
listed, with their status, ``offset`` and ``len``: where each job was when it died.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from blockd.client.lab import running_daemon
from stress.fuzzkit import FuzzClient

TIMEOUT = 60

#: the images of every chain, top first
LAYERS: Final = ("top", "mid", "base")


class Kind(StrEnum):
    """The job a chain gets."""

    STREAM = "stream"  #: block-stream of the whole chain into the top
    COMMIT = "commit"  #: non-active block-commit of the mid into the base
    ACTIVE = "active"  #: active block-commit of the top (and the mid) into the base


#: the image each kind of job writes: it gets the chain's small clusters
WRITTEN: Final = {Kind.STREAM: "top", Kind.COMMIT: "base", Kind.ACTIVE: "base"}


def tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)  # fmt: skip


def check_image(path: Path) -> str | None:
    """None if ``qemu-img check`` finds no corruption (leaks are fine), else the problem."""
    result = tool("qemu-img", "check", "-U", "--output=json", path)
    if result.returncode not in (0, 3):
        return f"qemu-img check {path.name}: rc {result.returncode} {result.stdout}{result.stderr}"
    report = json.loads(result.stdout)
    if report.get("corruptions", 0) or report.get("check-errors", 0):
        return f"qemu-img check {path.name}: {report}"
    return None


def same_view(a: Path, b: Path) -> str | None:
    result = tool("qemu-img", "compare", "-U", a, b)
    if result.returncode != 0:
        return f"qemu-img compare {a.name} {b.name}: {result.stdout}{result.stderr}"
    return None


def backing_name(path: Path) -> str | None:
    """The backing file name ``path``'s header records (None: none)."""
    info = json.loads(tool("qemu-img", "info", "-U", "--output=json", path).stdout)
    name: str | None = info.get("backing-filename")
    return name


def make_chain(directory: Path, kind: Kind, size: int = 16 << 20, cluster: int = 65536) -> Path:
    """``base.qcow2 ← mid.qcow2 ← top.qcow2`` (backing files named relative) in
    ``directory``, with data in every layer, for a job of ``kind``; returns the top.

    In eighths ``u`` of ``size``: the mid holds 0x22 in ``[u, 2u)``, 0x23 in ``[3u, 5u)``
    and a zero cluster at ``6u``; the top 0x33 in its first 64 KiB and 0x44 in 8 KiB at
    ``3u``. For a stream the base is 0x11 all over; for a commit only in ``[0, 2u)`` and
    ``[6u, 8u)``, so the commit both overwrites and allocates clusters. The image the job
    writes (:data:`WRITTEN`) has ``cluster``-byte clusters, the others 64 KiB.
    """
    u = size // 8
    paths = {layer: directory / f"{layer}.qcow2" for layer in LAYERS}
    sparse = [(0, 2 * u, 0x11), (6 * u, 2 * u, 0x11)]
    writes = {
        "base": [(0, size, 0x11)] if kind is Kind.STREAM else sparse,
        "mid": [(u, u, 0x22), (3 * u, 2 * u, 0x23)],
        "top": [(0, 64 << 10, 0x33), (3 * u, 8 << 10, 0x44)],
    }
    below: str | None = None
    for layer in reversed(LAYERS):
        args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if layer == WRITTEN[kind]:
            args += ["-o", f"cluster_size={cluster}"]
        if below is not None:
            args += ["-b", f"{below}.qcow2", "-F", "qcow2", paths[layer]]
        else:
            args += [paths[layer], str(size)]
        _checked(tool(*args))
        commands = [f"write -P {p} {offset} {length}" for offset, length, p in writes[layer]]
        if layer == "mid":
            commands.append(f"write -z {6 * u} 64k")
        _checked(tool("qemu-io", "-f", "qcow2", *[a for c in commands for a in ("-c", c)],
                      paths[layer]))  # fmt: skip
        below = layer
    return paths["top"]


def _checked(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{result.args!r} failed: {result.stdout}{result.stderr}")


class Templates:
    """Chains made once per layout (:func:`make_chain`) in ``directory``, each with a
    qcow2 copy of its guest view (``before.qcow2``); :meth:`chain` hands out copies. A
    commit and an active commit share a layout."""

    def __init__(self, directory: Path, size: int = 16 << 20, cluster: int = 65536) -> None:
        self.directory = directory
        self.size = size
        self.cluster = cluster
        self._made: dict[str, Path] = {}

    def folder(self, kind: Kind) -> Path:
        """The template of ``kind``'s layout, made on first use."""
        written = WRITTEN[kind]
        if written not in self._made:
            folder = self.directory / f"template-{written}"
            folder.mkdir(parents=True)
            top = make_chain(folder, kind, self.size, self.cluster)
            _checked(tool("qemu-img", "convert", "-O", "qcow2", top, folder / "before.qcow2"))
            self._made[written] = folder
        return self._made[written]

    def chain(self, kind: Kind, directory: Path, job_id: str, **options: Any) -> Chain:
        """A copy of ``kind``'s template chain in ``directory``, for job ``job_id``
        (``options``: the other :class:`Chain` fields)."""
        template = self.folder(kind)
        directory.mkdir(parents=True, exist_ok=True)
        for layer in LAYERS:
            shutil.copy(template / f"{layer}.qcow2", directory / f"{layer}.qcow2")
        return Chain(kind, directory, job_id, template, **options)


@functools.lru_cache(maxsize=6)
def _read_once(template: Path) -> bytes:
    """A template image's bytes (templates never change once made)."""
    return template.read_bytes()


@dataclass
class Chain:
    """One chain and the job it gets (made by :meth:`Templates.chain`).

    Attributes:
        kind: the job.
        directory: where its images are.
        job_id: the job's id; its node names are ``<job_id>-<layer>``.
        template: the folder it was copied from, with ``before.qcow2``, the copy of its
            guest view.
        backing_file: a commit's ``backing-file`` (None: the base's filename).
        complete: an active commit is to be completed (``job-complete``, sent once)
            when ready; else it stays ready until the kill.
        nodes: the node names added in the current daemon, top first.
    """

    kind: Kind
    directory: Path
    job_id: str
    template: Path
    backing_file: str | None = None
    complete: bool = True
    nodes: list[str] = field(default_factory=list)

    def path(self, layer: str) -> Path:
        return self.directory / f"{layer}.qcow2"

    def changed(self, layer: str) -> bool:
        """Whether ``layer`` differs from the template it was copied from."""
        return self.path(layer).read_bytes() != _read_once(self.template / f"{layer}.qcow2")

    def backing(self) -> str | None:
        """The backing file name the top's header records (None: none)."""
        return backing_name(self.path("top")) if self.changed("top") else "mid.qcow2"

    def node(self, layer: str) -> str:
        """The node name of ``layer`` (:func:`job_commands`)."""
        return f"{self.job_id}-{layer}"

    def node_names(self) -> list[str]:
        """The nodes :func:`job_commands` adds, top first (the order to delete them)."""
        return [self.node(layer) for layer in (("top",) if self.kind is Kind.STREAM else LAYERS)]

    @property
    def base_name(self) -> str:
        """What a finished commit writes into the top's header."""
        return self.backing_file if self.backing_file is not None else str(self.path("base"))


@dataclass(frozen=True)
class Point:
    """Where a job was when the daemon was killed (its last ``query-block-jobs`` entry)."""

    kind: Kind
    status: str
    offset: int
    length: int

    @property
    def fraction(self) -> float:
        return self.offset / self.length if self.length else 0.0


@dataclass
class RoundResult:
    """What :func:`kill_round` found: ``problems`` (none when every check held), the
    kill ``points`` (the jobs each kill interrupted) and the number of ``chains``."""

    problems: list[str]
    points: list[Point]
    chains: int

    @property
    def interrupted(self) -> int:
        return len(self.points)


def _ok(reply: dict[str, Any], what: str) -> None:
    if reply != {"return": {}}:
        raise AssertionError(f"{what}: {reply}")


def job_commands(
    chain: Chain, job: Mapping[str, Any] | None = None, written: Mapping[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands (wire names) that add ``chain``'s nodes and start its job, in
    order. ``job`` adds arguments to the job's command (``speed``, ``on-error``),
    ``written`` options to the node of the image the job writes (:data:`WRITTEN`).

    A stream adds the top alone (its chain comes from the headers); a commit adds the
    base and the mid read-only (the job reopens the base read-write), the top over them
    and commits the mid (non-active) or the top (active) into the base."""

    def node(layer: str, **options: Any) -> dict[str, Any]:
        extra = written if written is not None and layer == WRITTEN[chain.kind] else {}
        return {"driver": "qcow2", "node-name": chain.node(layer), **options, **extra,
                "file": {"driver": "file", "filename": str(chain.path(layer))}}  # fmt: skip

    args: dict[str, Any] = {"device": chain.node("top"), "job-id": chain.job_id, **(job or {})}
    if chain.kind is Kind.STREAM:
        return [("blockdev-add", node("top")), ("block-stream", args)]
    args["base-node"] = chain.node("base")
    if chain.kind is Kind.COMMIT:
        args["top-node"] = chain.node("mid")
        if chain.backing_file is not None:
            args["backing-file"] = chain.backing_file
    return [
        ("blockdev-add", node("base", **{"read-only": True})),
        ("blockdev-add", node("mid", backing=chain.node("base"), **{"read-only": True})),
        ("blockdev-add", node("top", backing=chain.node("mid"))),
        ("block-commit", args),
    ]


def start_job(client: FuzzClient, chain: Chain, speed: int) -> bool:
    """Add ``chain``'s nodes and start its job at ``speed`` (:func:`job_commands`); False
    when there is nothing left to do (a commit whose top already names the base)."""
    if chain.kind is Kind.COMMIT and chain.backing() != "mid.qcow2":
        return False
    for name, arguments in job_commands(chain, {"speed": speed} if speed else None):
        _ok(client.call(name, **arguments), name)
    chain.nodes = chain.node_names()
    return True


def poll(client: FuzzClient, chains: Sequence[Chain]) -> list[dict[str, Any]]:
    """``query-block-jobs``; an active commit that is ready and is to be completed gets
    ``job-complete``."""
    jobs: list[dict[str, Any]] = client.call("query-block-jobs")["return"]
    ready = {job["device"] for job in jobs if job["ready"]}
    for chain in chains:
        if chain.kind is Kind.ACTIVE and chain.complete and chain.job_id in ready:
            chain.complete = False
            _ok(client.call("job-complete", id=chain.job_id), "job-complete")
    return jobs


#: how long a first-run job is paced to take, picked per chain (0: unlimited speed)
DURATIONS: Final = (0.0, 0.15, 0.3, 0.6)


def work(kind: Kind, size: int) -> int:
    """About the bytes a job of ``kind`` copies in a chain of ``size`` (:func:`make_chain`)."""
    return size if kind is Kind.STREAM else 3 * size // 8


def _run_until_kill(client: FuzzClient, chains: Sequence[Chain], rnd: random.Random,
                    horizon: float) -> tuple[str, list[dict[str, Any]]]:  # fmt: skip
    """Poll until the kill moment: a random time within ``horizon`` seconds, or the
    moment a random job passes a random fraction of its work; the last poll's answer."""
    mode = rnd.choice(["progress", "time"])
    if not chains:
        return mode, []
    deadline = time.monotonic() + (rnd.uniform(0, horizon) if mode == "time" else TIMEOUT)
    watched, fraction = rnd.choice(chains).job_id, rnd.random()
    while True:
        jobs = poll(client, chains)
        if time.monotonic() >= deadline or not jobs:
            return mode, jobs
        if mode == "progress":
            job = next((j for j in jobs if j["device"] == watched), None)
            if job is None or job["ready"] or job["offset"] >= fraction * job["len"]:
                return mode, jobs
        time.sleep(0.005)


def _finish(client: FuzzClient, chains: Sequence[Chain]) -> list[str]:
    """Run every chain's job again, unlimited, until all are gone; then delete the nodes."""
    for chain in chains:
        chain.nodes.clear()
        chain.complete = True
        start_job(client, chain, 0)
    problems: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while jobs := poll(client, chains):
        if time.monotonic() > deadline:
            problems.append(f"the second run did not finish: {jobs}")
            break
        time.sleep(0.01)
    for chain in chains:
        for name in chain.nodes:
            reply = client.call("blockdev-del", **{"node-name": name})
            if reply != {"return": {}}:
                problems.append(f"blockdev-del {name}: {reply}")
    return problems


def judge(chain: Chain, *, finished: bool) -> list[str]:
    """The checks of the module docstring for ``chain``, after a kill or (``finished``)
    after the job ran to its end."""
    problems: list[str] = []
    for layer in LAYERS:
        if chain.changed(layer):
            problems += filter(None, [check_image(chain.path(layer))])
    before = chain.template / "before.qcow2"
    problems += filter(None, [same_view(chain.path("top"), before)])
    backing = chain.backing()
    allowed: set[str | None]
    if chain.kind is Kind.STREAM:
        allowed = {None} if finished else {None, "mid.qcow2"}
    elif chain.kind is Kind.COMMIT:
        allowed = {chain.base_name} if finished else {"mid.qcow2", chain.base_name}
    else:
        allowed = {"mid.qcow2"}
        if finished:  # the base alone holds the chain's view
            problems += filter(None, [same_view(chain.path("base"), before)])
    if backing not in allowed:
        problems.append(f"the top's header names {backing!r}, not one of {allowed}")
    return [f"{chain.kind} {chain.directory.name}: {p}" for p in problems]


def judge_all(chains: Sequence[Chain], *, finished: bool) -> list[str]:
    """:func:`judge` of every chain, a few at once (the tools are processes)."""
    with ThreadPoolExecutor(4) as pool:
        found = pool.map(lambda chain: judge(chain, finished=finished), chains)
        return [problem for problems in found for problem in problems]


def kill_round(directory: Path, rnd: random.Random, kinds: Sequence[Kind],
               templates: Templates, kills: int = 1) -> RoundResult:  # fmt: skip
    """One round with a chain per entry of ``kinds``: ``kills`` times, a daemon starts
    the jobs not yet done (each at a random speed) and is killed at a random moment; then
    one more runs them to their end. ``problems`` is empty when every check held."""
    chains: list[Chain] = []
    for i, kind in enumerate(kinds):
        chain = templates.chain(kind, directory / f"chain{i}", f"j{i}")
        if kind is Kind.COMMIT:
            chain.backing_file = rnd.choice([None, "base.qcow2"])
        chains.append(chain)
    problems: list[str] = []
    points: list[Point] = []
    tags: list[str] = []
    for _ in range(kills):
        for chain in chains:
            chain.complete = rnd.random() < 0.5
        durations = [rnd.choice(DURATIONS) for _ in chains]
        speeds = [int(work(c.kind, templates.size) / d) if d else 0
                  for c, d in zip(chains, durations, strict=True)]  # fmt: skip
        # a little past the slowest job's end: kills fall all over the jobs' lives
        horizon = 1.2 * max(*durations, 0.05)
        (directory / "qmp.sock").unlink(missing_ok=True)
        with running_daemon(directory) as daemon:
            client = FuzzClient(daemon.socket)
            try:
                pairs = zip(chains, speeds, strict=True)
                started = [c for c, speed in pairs if start_job(client, c, speed)]
                mode, jobs = _run_until_kill(client, started, rnd, horizon)
                daemon.process.send_signal(signal.SIGKILL)
                daemon.process.wait(timeout=TIMEOUT)
            finally:
                client.close()
        kind_of = {c.job_id: c.kind for c in chains}
        points += [
            Point(kind_of[j["device"]], j["status"], j["offset"], j["len"])
            for j in jobs
            if j["status"] not in ("concluded", "null")
        ]
        tag = f"[{mode} speeds={speeds}]"
        tags.append(tag)
        problems += [f"{tag} {p}" for p in judge_all(chains, finished=False)]
    (directory / "qmp.sock").unlink(missing_ok=True)
    with running_daemon(directory) as daemon:
        client = FuzzClient(daemon.socket)
        try:
            problems += _finish(client, chains)
        finally:
            client.close()
    problems += [f"[finished after {' '.join(tags)}] {p}" for p in judge_all(chains, finished=True)]
    return RoundResult(problems, points, len(chains))
