"""``blockd demo``: a self-contained tour, and a smoke test of a fresh install.

It needs nothing but blockd: the images are made with blockd's own code (no
``qemu-img``), the daemon is the real ``blockd`` command line started as a subprocess on a
temporary socket, and the QMP client is :mod:`blockd.client`. Each step is one function
taking the shared :class:`Demo` state; :data:`STEPS` lists them in order, and a step that
the installed blockd cannot do yet (no ``block-stream`` command) says so and is skipped.

Exit status 0 when every step that ran succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from blockd.client.connection import Client, ClientError, connect

MiB: Final = 1024 * 1024
IMAGE_SIZE: Final = 4 * MiB
#: (image, offset, length, byte): the data each layer holds; later layers win.
PATTERN: Final = (
    ("base", 0, 2 * MiB, 0xB0),
    ("base", 3 * MiB, 512 * 1024, 0xB1),
    ("mid", 1 * MiB, 1 * MiB, 0x51),
)
START_TIMEOUT: Final = 15.0
JOB_TIMEOUT: Final = 60.0


class DemoError(Exception):
    """A step failed; ``str(exc)`` says how."""


class Skip(Exception):
    """A step cannot run on this blockd yet; ``str(exc)`` says why."""


@dataclass
class Demo:
    """What the steps share."""

    workdir: Path
    sock: Path
    pidfile: Path
    images: dict[str, Path] = field(default_factory=dict)
    blockdevs: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    commands: set[str] = field(default_factory=set)
    streamed: bool = False
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def qmp(self) -> Client:
        if self.client is None:
            raise DemoError("not connected")
        return self.client


def say(text: str) -> None:
    print(text, flush=True)


def expected_bytes() -> bytes:
    """The guest-visible content of the chain, from :data:`PATTERN`."""
    data = bytearray(IMAGE_SIZE)
    for _image, offset, length, byte in PATTERN:
        data[offset : offset + length] = bytes([byte]) * length
    return bytes(data)


# --- the steps ----------------------------------------------------------------------------


async def make_chain(demo: Demo) -> str:
    """base.qcow2 <- mid.qcow2 <- top.qcow2, made and filled with blockd's own code."""
    try:
        from blockd.block.qcow2.create import create_qcow2
    except ImportError:
        raise Skip("image creation is not in this blockd yet") from None
    from blockd.block.graph import Graph

    base, mid, top = (demo.workdir / f"{name}.qcow2" for name in ("base", "mid", "top"))
    await trio.to_thread.run_sync(create_qcow2, str(base), IMAGE_SIZE)
    await trio.to_thread.run_sync(
        lambda: create_qcow2(str(mid), IMAGE_SIZE, backing_file=base.name, backing_fmt="qcow2")
    )
    await trio.to_thread.run_sync(
        lambda: create_qcow2(str(top), IMAGE_SIZE, backing_file=mid.name, backing_fmt="qcow2")
    )
    demo.images = {"base": base, "mid": mid, "top": top}
    graph = Graph()
    try:
        for image, offset, length, byte in PATTERN:
            node = await graph.open_node(
                {"driver": "qcow2", "node-name": image, "backing": None,
                 "file": {"driver": "file", "filename": str(demo.images[image])}},
                top_level=True,
            )  # fmt: skip
            await node.write(offset, bytes([byte]) * length)
            await node.flush()
            await graph.close_all()
    finally:
        await graph.close_all()
    demo.blockdevs = [
        f"driver=file,node-name=top-file,filename={top}",
        "driver=qcow2,node-name=top,file=top-file",
    ]
    return f"{base.name} <- {mid.name} <- {top.name}, {IMAGE_SIZE // MiB} MiB, in {demo.workdir}"


async def start_daemon(demo: Demo) -> str:
    """Run ``blockd --blockdev ... --socket S --pidfile P``; ready once the pidfile exists."""
    # -P: this installation's blockd, never a blockd/ folder in the working directory
    argv = [sys.executable, "-P", "-m", "blockd"]
    for blockdev in demo.blockdevs:
        argv += ["--blockdev", blockdev]
    argv += ["--socket", str(demo.sock), "--pidfile", str(demo.pidfile)]
    demo.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with trio.move_on_after(START_TIMEOUT):
        while not demo.pidfile.exists():
            if demo.proc.poll() is not None:
                stderr = demo.proc.stderr.read().decode() if demo.proc.stderr else ""
                raise DemoError(f"blockd exited with status {demo.proc.returncode}: {stderr}")
            await trio.sleep(0.02)
    if not demo.pidfile.exists():
        raise DemoError(f"blockd did not become ready within {START_TIMEOUT:g}s")
    pid = int(demo.pidfile.read_text())
    if pid != demo.proc.pid:
        raise DemoError(f"pidfile holds {pid}, expected {demo.proc.pid}")
    return f"pid {pid}, QMP on {demo.sock}"


async def query(demo: Demo) -> str:
    """query-version, query-commands and query-qmp-schema."""
    version = await demo.qmp.execute("query-version")
    qemu = version["qemu"]
    demo.commands = {entry["name"] for entry in await demo.qmp.execute("query-commands")}
    schema = await demo.qmp.execute("query-qmp-schema")
    entries = {entry["name"]: entry for entry in schema}
    lines = [
        f"{version['package']}, following QEMU {qemu['major']}.{qemu['minor']}.{qemu['micro']}",
        *textwrap.wrap(
            f"{len(demo.commands)} commands: {', '.join(sorted(demo.commands))}",
            width=80,
            subsequent_indent="  ",
            break_on_hyphens=False,
        ),
        f"{len(schema)} schema entries",
    ]
    stream = entries.get("block-stream")
    if stream is not None:
        members = {m["name"] for m in entries[stream["arg-type"]].get("members", [])}
        mask = "backing-mask-protocol" in members
        lines.append(f"block-stream takes backing-mask-protocol: {'yes' if mask else 'no'}")
    return "\n      ".join(lines)


async def stream(demo: Demo) -> str:
    """block-stream top (all of its backing chain) and follow the job to its end."""
    if "block-stream" not in demo.commands:
        raise Skip("this blockd has no block-stream command yet")
    if not demo.images:
        raise Skip("no image chain to stream")
    statuses: list[str] = []

    async def until(status: str) -> None:
        async for event in channel:
            statuses.append(str(event.data.get("status")))
            if statuses[-1] == status:
                return

    with demo.qmp.listen("JOB_STATUS_CHANGE") as channel:
        await demo.qmp.execute(
            "block-stream", {"job-id": "demo", "device": "top", "auto-dismiss": False}
        )
        try:
            with trio.fail_after(JOB_TIMEOUT):
                await until("concluded")
                jobs = await demo.qmp.execute("query-jobs")
                job = next((j for j in jobs if j["id"] == "demo"), None)
                if job is None:
                    raise DemoError("the concluded job is missing from query-jobs")
                if "error" in job:
                    raise DemoError(f"the job failed: {job['error']}")
                await demo.qmp.execute("job-dismiss", {"id": "demo"})
                await until("null")
        except trio.TooSlowError:
            raise DemoError(f"the job did not finish within {JOB_TIMEOUT:g}s") from None
    demo.streamed = True
    progress = f"{job['current-progress']}/{job['total-progress']}"
    return f"job 'demo': {' -> '.join(statuses)}; progress {progress}"


async def quit_daemon(demo: Demo) -> str:
    """QMP quit: the reply comes first, then the daemon exits 0 and cleans up."""
    await demo.qmp.execute("quit")
    await demo.stack.aclose()  # the daemon closes the connection; so do we
    demo.client = None
    proc = demo.proc
    assert proc is not None
    status = await trio.to_thread.run_sync(lambda: proc.wait(timeout=START_TIMEOUT))
    if status != 0:
        raise DemoError(f"blockd exited with status {status}")
    left = [p.name for p in (demo.sock, demo.pidfile) if p.exists()]
    if left:
        raise DemoError(f"left behind after exit: {', '.join(left)}")
    return "exit status 0; socket and pidfile removed"


async def verify(demo: Demo) -> str:
    """Read top.qcow2 back with blockd's own driver: standalone, with all the data."""
    if not demo.streamed:
        raise Skip("nothing was streamed")
    from blockd.block.graph import Graph

    graph = Graph()
    try:
        node = await graph.open_node(
            {"driver": "qcow2", "node-name": "top", "read-only": True,
             "file": {"driver": "file", "filename": str(demo.images["top"])}},
            top_level=True,
        )  # fmt: skip
        if node.backing is not None:
            raise DemoError(f"top.qcow2 still has a backing file: {node.backing.filename}")
        data = await node.pread(0, IMAGE_SIZE)
    finally:
        await graph.close_all()
    if data != expected_bytes():
        first = next(
            i for i, (a, b) in enumerate(zip(data, expected_bytes(), strict=True)) if a != b
        )
        raise DemoError(f"top.qcow2 differs from the chain's content at offset {first}")
    return f"top.qcow2 has no backing file and all {IMAGE_SIZE // MiB} MiB of the chain's data"


async def connect_client(demo: Demo) -> str:
    """Connect with blockd's QMP client: greeting, then qmp_capabilities."""
    demo.client = await demo.stack.enter_async_context(connect(str(demo.sock), name="demo"))
    greeting = demo.client.greeting
    if greeting is None:
        raise DemoError("no greeting")
    return f"greeting from {greeting.package} (QEMU {greeting.version_text}); negotiated"


Step = Callable[[Demo], Awaitable[str]]
STEPS: Final[Sequence[tuple[str, Step]]] = (
    ("make a qcow2 chain", make_chain),
    ("start the daemon", start_daemon),
    ("connect and negotiate", connect_client),
    ("query the daemon", query),
    ("stream the chain", stream),
    ("quit", quit_daemon),
    ("verify the result", verify),
)


async def run(demo: Demo) -> bool:
    """Run :data:`STEPS`, printing one progress line each; True if none failed."""
    total = len(STEPS)
    ok = True
    async with demo.stack:
        for number, (title, step) in enumerate(STEPS, 1):
            say(f"[{number}/{total}] {title} ...")
            try:
                result = await step(demo)
            except Skip as exc:
                say(f"      skipped: {exc}")
                continue
            except (DemoError, ClientError, OSError) as exc:
                say(f"      FAILED: {exc}")
                ok = False
                break
            say(f"      {result}")
    return ok


def _stop(demo: Demo) -> None:
    if demo.proc is not None and demo.proc.poll() is None:
        demo.proc.send_signal(signal.SIGTERM)
        try:
            demo.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            demo.proc.kill()
            demo.proc.wait()


def main(argv: Sequence[str] = ()) -> int:
    """``blockd demo [--keep] [--dir DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="blockd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work in DIR (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards")
    args = parser.parse_args(argv)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="blockd-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="blockd-"))  # short: UNIX paths max 107 bytes
    demo = Demo(workdir, sockdir / "qmp.sock", workdir / "blockd.pid")
    started = time.monotonic()
    try:
        ok = trio.run(run, demo)
    finally:
        _stop(demo)
        shutil.rmtree(sockdir, ignore_errors=True)
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    say(
        f"demo {'passed' if ok else 'FAILED'} in {elapsed:.1f}s"
        + (f"; files in {workdir}" if args.keep else "")
    )
    return 0 if ok else 1
