"""Load: many QMP clients issuing commands while many streams run.

:func:`run_load` copies one chain per stream, starts blockd, connects ``clients`` raw
clients (each negotiates before any stream starts), starts the streams from a controller
connection, and lets every client issue commands (each with its own ``id``) until every
job has ended. Checked: every reply carries its request's ``id`` and the right content,
every client received exactly the controller's event sequence (same events, same order,
same timestamps), each job's events follow the job life cycle and end in a successful
``BLOCK_JOB_COMPLETED``, and no running job went without progress for ``stall_limit``
seconds. Each streamed image is judged with ``qemu-img check`` and ``compare``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blockd.client.lab import make_chain, running_daemon
from stress.killkit import check_image, same_view, tool

LIFECYCLE = ["created", "running", "waiting", "pending", "concluded", "null"]


class Client:
    """A raw trio QMP client: one request at a time, events collected as they come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        self.commands = 0

    @classmethod
    async def connect(cls, path: Path) -> Client:
        client = cls(await trio.open_unix_socket(str(path)))
        greeting = await client._line()
        assert "QMP" in greeting
        reply = await client.call("qmp_capabilities")
        assert reply["return"] == {}, reply
        return client

    async def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError("daemon closed the connection")
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\n")
        value: dict[str, Any] = json.loads(raw)
        return value

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        request_id = [self.next_id, f"c{id(self)}"]
        msg: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments is not None:
            msg["arguments"] = arguments
        await self.stream.send_all(json.dumps(msg).encode())
        while True:
            reply = await self._line()
            if "event" in reply:
                self.events.append(reply)
                continue
            assert reply.pop("id", None) == request_id, (request_id, reply)
            self.commands += 1
            return reply

    async def drain_events(self, until: float, count: int | None = None) -> None:
        """Read events until ``count`` are held, or (without ``count``) until none has
        arrived for a short while; never past ``until``."""
        while trio.current_time() < until and (count is None or len(self.events) < count):
            with trio.move_on_after(0.3 if count is None else until - trio.current_time()):
                msg = await self._line()
                assert "event" in msg, msg
                self.events.append(msg)
                continue
            if count is None:
                return


@dataclass
class LoadResult:
    clients: int
    streams: int
    commands: int = 0
    events_per_client: int = 0
    elapsed: float = 0.0
    max_no_progress: float = 0.0
    problems: list[str] = field(default_factory=list)


def _check_job_events(events: list[dict[str, Any]], job: str) -> str | None:
    statuses = [e["data"]["status"] for e in events
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]  # fmt: skip
    plain = [s for s in statuses if s not in ("paused", "ready", "standby")]
    if plain != LIFECYCLE:
        return f"{job}: statuses {statuses}"
    done = [e for e in events if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == job]
    if (
        len(done) != 1
        or "error" in done[0]["data"]
        or done[0]["data"]["offset"] != done[0]["data"]["len"]
    ):
        return f"{job}: completion {done}"
    return None


async def _client_loop(client: Client, stop: trio.Event, version: dict[str, Any],
                       jobs: set[str], problems: list[str], pause: float) -> None:  # fmt: skip
    i = 0
    while not stop.is_set():
        i += 1
        kind = i % 5
        if kind == 0:
            reply = await client.call("query-version")
            ok = reply.get("return") == version
        elif kind == 1:
            reply = await client.call("query-block-jobs")
            ok = all(j["device"] in jobs and 0 <= j["offset"] <= j["len"] and j["type"] == "stream"
                     for j in reply.get("return", [None]))  # fmt: skip
        elif kind == 2:
            reply = await client.call("query-jobs")
            ok = all(j["id"] in jobs for j in reply.get("return", [None]))
        elif kind == 3:
            reply = await client.call("query-named-block-nodes", {"flat": True})
            ok = isinstance(reply.get("return"), list)
        else:
            reply = await client.call("block-job-set-speed", {"device": "no-such-job", "speed": 1})
            ok = reply.get("error", {}).get("class") == "DeviceNotActive"
        if not ok:
            problems.append(f"bad reply to {kind}: {reply}")
        await trio.sleep(pause)


async def run_load(directory: Path, clients: int = 50, streams: int = 16, size: str = "8M",
                   speed: int = 4 << 20, stall_limit: float = 5.0, pause: float = 0.02,
                   timeout: float = 120.0) -> LoadResult:  # fmt: skip
    """One load run; see the module docstring."""
    result = LoadResult(clients, streams)
    template = directory / "template"
    template.mkdir(parents=True)
    make_chain(template, size)
    tool("qemu-img", "convert", "-O", "qcow2", template / "top.qcow2", directory / "before.qcow2")
    tops = []
    for i in range(streams):
        shutil.copytree(template, directory / f"c{i}")
        tops.append(directory / f"c{i}" / "top.qcow2")
    jobs = {f"j{i}" for i in range(streams)}
    start = time.monotonic()
    with running_daemon(directory) as daemon:
        async with trio.open_nursery() as nursery:
            control = await Client.connect(daemon.socket)
            workers = [await Client.connect(daemon.socket) for _ in range(clients)]
            version = (await control.call("query-version"))["return"]
            for i, top in enumerate(tops):
                reply = await control.call("blockdev-add", {
                    "driver": "qcow2", "node-name": f"top{i}",
                    "file": {"driver": "file", "filename": str(top)}})  # fmt: skip
                assert reply == {"return": {}}, reply
            for i in range(streams):
                reply = await control.call("block-stream", {"device": f"top{i}", "job-id": f"j{i}",
                                                            "speed": speed})  # fmt: skip
                assert reply == {"return": {}}, reply
            stop = trio.Event()
            for worker in workers:
                nursery.start_soon(
                    _client_loop, worker, stop, version, jobs, result.problems, pause
                )
            last: dict[str, tuple[int, float]] = {}
            deadline = trio.current_time() + timeout
            while trio.current_time() < deadline:
                running = (await control.call("query-block-jobs"))["return"]
                if not running:
                    break
                now = trio.current_time()
                for job in running:
                    seen = last.get(job["device"])
                    if seen is None or job["offset"] != seen[0] or job["paused"]:
                        last[job["device"]] = (job["offset"], now)
                    else:
                        result.max_no_progress = max(result.max_no_progress, now - seen[1])
                await trio.sleep(0.1)
            else:
                result.problems.append("jobs did not finish in time")
            stop.set()
        for i in range(streams):
            await control.call("blockdev-del", {"node-name": f"top{i}"})
        await control.drain_events(trio.current_time() + 2)
        for worker in workers:
            await worker.drain_events(trio.current_time() + 5, len(control.events))
        result.elapsed = time.monotonic() - start
        result.commands = sum(w.commands for w in workers) + control.commands
        for job in sorted(jobs):
            problem = _check_job_events(control.events, job)
            if problem:
                result.problems.append(problem)
        result.events_per_client = len(control.events)
        for n, worker in enumerate(workers):
            if worker.events != control.events:
                result.problems.append(f"client {n} saw {len(worker.events)} events, controller "
                                       f"{len(control.events)}, or another order")  # fmt: skip
        for stream in (control, *workers):
            await stream.stream.aclose()
    if result.max_no_progress > stall_limit:
        result.problems.append(f"a job made no progress for {result.max_no_progress:.1f}s")
    for top in tops:
        for problem in (check_image(top), same_view(top, directory / "before.qcow2")):
            if problem:
                result.problems.append(problem)
    return result
