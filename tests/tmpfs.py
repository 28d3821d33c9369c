"""A small tmpfs for the tests that need a disk that really fills up (ENOSPC).

Imported as ``tmpfs`` (``tests/`` is on ``sys.path``, see ``tests/conftest.py``).
Mounting needs root; without it the test is skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``, e.g. ``"3m"``) mounted at ``parent/small``
    for the ``with`` block; the test is skipped when it cannot be mounted."""
    mount = parent / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        timeout=10,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)
