"""Running the reference tools (``qemu-img``, ``qemu-io``) from the tests, bounded in time.

Every area's helper module (``blocktools``, ``qcow2_util``, ``streamtools``) calls these,
so a tool that hangs fails its test after :data:`TIMEOUT` instead of stalling the suite.
Imported as ``qemutools`` (``tests/`` is on ``sys.path``, see ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

TIMEOUT = 60


def run_tool(
    *args: str | Path, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` and return the finished process; with ``check``, a non-zero exit
    fails the test with the tool's output."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args!r} failed ({result.returncode}): {result.stdout}{result.stderr}"
        )
    return result


def image_info(path: Path, *, force_share: bool = True) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (``-U`` unless ``force_share`` is off)."""
    args = ["qemu-img", "info", "--output=json", *(["-U"] if force_share else []), str(path)]
    info: dict[str, Any] = json.loads(run_tool(*args).stdout)
    return info
