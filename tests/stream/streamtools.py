"""Helpers of the stream tests: qemu-img/qemu-io with timeouts, and a daemon driven through
its command handlers with every event recorded.

Imported as ``streamtools`` (pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from qemutools import image_info, run_tool

from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from blockd.errors import QMPError

MIB = 1024 * 1024
KIB = 1024


def tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img``/``qemu-io`` with a timeout; fail the test on an error."""
    return run_tool(*args, check=check)


def create(
    path: Path,
    size: int | str | None,
    backing: Path | None = None,
    backing_fmt: str = "qcow2",
    fmt: str = "qcow2",
    *options: str,
) -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    for option in options:
        args += ["-o", option]
    args.append(path)
    if size is not None:
        args.append(str(size))
    tool(*args)
    return path


def write(path: Path, offset: int, length: int, pattern: int, fmt: str = "qcow2") -> None:
    tool("qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", path)


def info(path: Path) -> dict[str, Any]:
    return image_info(path)


def image_map(path: Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(
        tool("qemu-img", "map", "-U", "-f", fmt, "--output=json", path).stdout
    )
    return result


def own_data(path: Path) -> list[tuple[int, int]]:
    """The ranges whose data ``path`` itself stores (depth 0 in its map), adjacent ranges
    merged (the map splits where host offsets are not contiguous)."""
    merged: list[tuple[int, int]] = []
    for entry in image_map(path):
        if entry["depth"] != 0 or not entry["data"]:
            continue
        if merged and merged[-1][0] + merged[-1][1] == entry["start"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + entry["length"])
        else:
            merged.append((entry["start"], entry["length"]))
    return merged


def check(path: Path) -> None:
    tool("qemu-img", "check", "-U", path)


def compare(a: Path, b: Path) -> None:
    """``qemu-img compare`` reports the two images' guest views identical."""
    result = tool("qemu-img", "compare", "-U", a, b, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def snapshot(src: Path, dst: Path) -> Path:
    """A standalone copy of the guest view of ``src`` (for comparing after a stream)."""
    tool("qemu-img", "convert", "-U", "-O", "qcow2", src, dst)
    return dst


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
        """Validate ``arguments`` against the schema and run the handler."""
        wire = {
            key.replace("_", "-") if key != "new_state" else key: value
            for key, value in arguments.items()
        }
        self.d.schema.validate_arguments(name, wire)
        result = await self.commands[name].call(self.d, wire)
        if result is not None:
            self.d.schema.validate_return(name, result)
        return result

    async def raw(self, name: str, arguments: Mapping[str, Any]) -> Any:
        self.d.schema.validate_arguments(name, arguments)
        return await self.commands[name].call(self.d, arguments)

    async def error(self, name: str, **arguments: Any) -> str:
        """Run a command that must fail; return its error text."""
        try:
            await self.cmd(name, **arguments)
        except QMPError as exc:
            return exc.desc
        raise AssertionError(f"{name} {arguments} did not fail")

    def names(self, *, start: int = 0) -> list[str]:
        """The events since ``start`` as ``JSC(status)`` / event names."""
        out = []
        for event in self.events[start:]:
            if event["event"] == "JOB_STATUS_CHANGE":
                out.append(f"JSC({event['data']['status']})")
            else:
                out.append(event["event"])
        return out

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
