"""Helpers of the block-layer tests: the real ``qemu-img``/``qemu-io`` with timeouts.

Imported as ``blocktools`` (pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from qemutools import image_info as image_info  # the block tests import it from here
from qemutools import run_tool


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("qemu-img", *args, check=check)


def qemu_io(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("qemu-io", *args, check=check)


def write_pattern(path: Path, fmt: str, offset: int, length: int, pattern: int) -> None:
    """``qemu-io -c 'write -P pattern offset length'`` on ``path``."""
    qemu_io("-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(path))


def file_ref(path: Path) -> dict[str, Any]:
    """Inline options of a ``file`` node over ``path``."""
    return {"driver": "file", "filename": str(path)}


SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"


def schema_errors(relative: str, instance: Any) -> list[str]:
    """Messages of ``instance`` failing ``schema/<relative>`` (jsonschema, file refs)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    resources = [
        (path.as_uri(), Resource.from_contents(json.loads(path.read_text()), DRAFT202012))
        for path in SCHEMA_DIR.rglob("*.json")
    ]
    registry: Registry[Any] = Registry().with_resources(resources)
    validator = Draft202012Validator({"$ref": (SCHEMA_DIR / relative).as_uri()}, registry=registry)
    return [error.message for error in validator.iter_errors(instance)]


Reply = dict[str, Any]


def held_bytes(path: Path) -> set[int]:
    """The lock bytes any process holds on ``path``, from ``/proc/locks``."""
    inode = os.stat(path).st_ino
    found: set[int] = set()
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if "->" in fields:  # a waiter
                continue
            if len(fields) >= 8 and int(fields[5].split(":")[2]) == inode:
                found.update(range(int(fields[6]), int(fields[7]) + 1))
    return found


def run_qmp(
    program: list[str],
    sock_dir: Path,
    commands: list[tuple[str, dict[str, Any]]],
    locks_of: list[Path] | None = None,
) -> list[Reply]:
    """Start ``program`` with QSD's monitor options, run ``commands``, record the lock
    bytes held on ``locks_of`` (as a last pseudo-reply), stop it; the replies."""
    path = sock_dir / "qmp.sock"
    path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            *program,
            "--chardev",
            f"socket,id=m,path={path},server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            stream = sock.makefile("rw")
            stream.readline()  # greeting
            replies: list[Reply] = []
            for number, (name, arguments) in enumerate([("qmp_capabilities", {}), *commands]):
                request = {"execute": name, "arguments": arguments, "id": number}
                stream.write(json.dumps(request) + "\n")
                stream.flush()
                while (reply := json.loads(stream.readline())).get("id") != number:
                    pass  # events, or anything not answering this request
                del reply["id"]
                replies.append(reply)
            if locks_of:
                replies.append({"return": [sorted(held_bytes(p)) for p in locks_of]})
            return replies[1:]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
