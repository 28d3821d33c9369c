"""Facts about the host the tests run on, and host resources they borrow.

A small tmpfs that really fills up (ENOSPC), filling a filesystem to a given margin, the
byte-range locks a file holds as the kernel lists them (``/proc/locks``, QEMU's
file-posix lock bytes), and whether anything listens on a UNIX socket file
(``/proc/net/unix``), asked without connecting to it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``, e.g. ``"3m"``) mounted at ``parent/small``
    for the ``with`` block; the test is skipped when it cannot be mounted (needs root)."""
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


def fill(fs: Path, leave: int, byte: int = 0xEE) -> Path:
    """Fill the filesystem holding ``fs`` until ``leave`` bytes are free (as far as
    ``statvfs`` reports them); the filler file, to be removed to free the space."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    filler.write_bytes(bytes([byte]) * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


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


#: ``__SO_ACCEPTCON`` in the flags column of ``/proc/net/unix``: a listening socket
_ACCEPTING = 0x10000


def unix_listening(path: Path) -> bool:
    """Whether a socket listens on the UNIX socket file ``path``, from ``/proc/net/unix``.

    Asked without connecting: a QEMU monitor serves one client at a time, and a probe
    connection would be that client. Between a daemon's ``bind()`` (the file exists) and
    its ``listen()``, a connection is refused; this is False until then.
    """
    target = str(path)
    with open("/proc/net/unix") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == target and int(fields[3], 16) & _ACCEPTING:
                return True
    return False
