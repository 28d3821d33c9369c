"""Fixtures for the example tests: how to run an example, and which daemon it uses.

Each example starts its own daemon (blockd unless ``BLOCKD_TEST_DAEMON`` names a
qemu-storage-daemon). An example whose daemon lacks a command it needs is skipped with
that reason, found by asking the daemon's ``query-commands``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockd.client.lab import LabError, query_commands, running_daemon

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROGRAM = os.environ.get("BLOCKD_TEST_DAEMON") or None


@pytest.fixture(scope="session")
def daemon_commands() -> Iterator[set[str]]:
    """What the daemon under test implements (empty if blockd does not start yet)."""
    import shutil
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="blockd-ex-"))
    try:
        with running_daemon(where, PROGRAM) as daemon:
            yield query_commands(daemon.socket)
    except (LabError, OSError) as exc:
        if PROGRAM is not None:
            raise
        pytest.skip(f"blockd does not start or answer yet: {exc}")
    finally:
        shutil.rmtree(where, ignore_errors=True)


def require(commands: set[str], *needed: str) -> None:
    missing = sorted(set(needed) - commands)
    if missing:
        pytest.skip(f"the daemon does not implement {', '.join(missing)} yet")


def run_example(name: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``examples/NAME ARGS...`` as-is with this Python; never raises on failure."""
    extra = ["--daemon", PROGRAM] if PROGRAM else []
    # As from a shell script: the test runner's COLUMNS would make rich wrap at 80.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *extra, *args],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )  # fmt: skip
