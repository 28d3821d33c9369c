"""kill -9 during block-stream: one round builds chains, starts blockd, streams, kills
the daemon at a random moment, then judges every image with the real tools and streams
again to completion. Shared by ``tests/reliability/test_kill_stream.py`` and
``python -m stress.kill_stream``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockd.client.lab import make_chain, running_daemon
from stress.fuzzkit import FuzzClient

TIMEOUT = 60


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


def _add_and_stream(client: FuzzClient, top: Path, name: str, speed: int) -> None:
    reply = client.call("blockdev-add", driver="qcow2", **{"node-name": name},
                        file={"driver": "file", "filename": str(top)})  # fmt: skip
    assert reply == {"return": {}}, reply
    args: dict[str, Any] = {"device": name, "job-id": f"job-{name}"}
    if speed:
        args["speed"] = speed
    reply = client.call("block-stream", **args)
    assert reply == {"return": {}}, reply


def _jobs(client: FuzzClient) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = client.call("query-block-jobs")["return"]
    return jobs


@dataclass
class RoundResult:
    problems: list[str]
    #: streams the kill interrupted (their top still had a backing file afterwards)
    interrupted: int
    chains: int


def kill_round(directory: Path, rnd: random.Random, chains: int = 1,
               size: str = "16M") -> RoundResult:  # fmt: skip
    """One round; ``problems`` is empty when every check held."""
    tops: list[Path] = []
    for i in range(chains):
        sub = directory / f"chain{i}"
        sub.mkdir(parents=True, exist_ok=True)
        top, _mid, _base = make_chain(sub, size)
        tool("qemu-img", "convert", "-O", "qcow2", top, sub / "before.qcow2")
        tops.append(top)
    speed = rnd.choice([0, 0, 8 << 20, 32 << 20])
    mode = rnd.choice(["progress", "time"])
    with running_daemon(directory) as daemon:
        client = FuzzClient(daemon.socket)
        try:
            for i, top in enumerate(tops):
                _add_and_stream(client, top, f"top{i}", speed)
            if mode == "progress":  # kill once the first job passed a random fraction
                fraction = rnd.random()
                deadline = time.monotonic() + TIMEOUT
                while time.monotonic() < deadline:
                    jobs = _jobs(client)
                    if not jobs or jobs[0]["offset"] >= fraction * jobs[0]["len"]:
                        break
            else:
                time.sleep(rnd.uniform(0, 0.6))
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(timeout=TIMEOUT)
        finally:
            client.close()
    problems: list[str] = []
    interrupted = 0
    for top in tops:
        sub = top.parent
        info = json.loads(tool("qemu-img", "info", "-U", "--output=json", top).stdout)
        interrupted += "backing-filename" in info
        for image in (top, sub / "mid.qcow2", sub / "base.qcow2"):
            problems += filter(None, [check_image(image)])
        problems += filter(None, [same_view(top, sub / "before.qcow2")])
    (directory / "qmp.sock").unlink(missing_ok=True)
    # stream again, to completion
    with running_daemon(directory) as daemon:
        client = FuzzClient(daemon.socket)
        try:
            for i, top in enumerate(tops):
                _add_and_stream(client, top, f"top{i}", 0)
            deadline = time.monotonic() + TIMEOUT
            while _jobs(client):
                if time.monotonic() > deadline:
                    problems.append(f"second stream did not finish: {_jobs(client)}")
                    break
                time.sleep(0.02)
            for i in range(len(tops)):
                client.call("blockdev-del", **{"node-name": f"top{i}"})
        finally:
            client.close()
    for top in tops:
        info = json.loads(tool("qemu-img", "info", "-U", "--output=json", top).stdout)
        if "backing-filename" in info:
            problems.append(f"{top} still has a backing file after the second stream")
        problems += filter(None, [check_image(top), same_view(top, top.parent / "before.qcow2")])
    tag = f"[{mode} speed={speed} chains={chains}]"
    return RoundResult([f"{tag} {p}" for p in problems], interrupted, chains)
