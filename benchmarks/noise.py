"""Noise control before each timed copy, identical for both daemons (issue 6).

On these VMs fresh page cache makes the host fault memory in, and a 1 GiB copy varies by
more than 100 % from run to run. Touching and freeing about three times the bytes a run
will write, just before it, leaves the guest with already-faulted free pages; with a
``sync`` first (so no earlier writeback competes) the spread drops to about 10 %.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import time
from pathlib import Path

MADV_POPULATE_WRITE = 23  # Linux 5.14+; mmap.MADV_POPULATE_WRITE only exists in Python 3.13
PAGE = mmap.PAGESIZE


def mem_available() -> int:
    """``MemAvailable`` from /proc/meminfo in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _populate(m: mmap.mmap, length: int) -> str:
    """Fault every page of ``m`` in for writing; returns the method used."""
    try:
        m.madvise(MADV_POPULATE_WRITE, 0, length)
        return "madvise"
    except (OSError, ValueError, AttributeError):
        pass
    try:  # the same through libc, for a Python whose madvise rejects unknown advice
        libc = ctypes.CDLL(None, use_errno=True)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_POPULATE_WRITE) == 0:
            return "madvise-libc"
    except (OSError, TypeError, ValueError):
        pass
    m[::PAGE] = b"\1" * ((length + PAGE - 1) // PAGE)  # one write per page
    return "touch"


_cap_bytes: int | None = None


def configure(cap_bytes: int | None) -> None:
    """Cap what ``settle`` touches at ``cap_bytes`` (None: no cap beyond memory); quick
    mode uses 1 GiB so that it stays under a minute."""
    global _cap_bytes
    _cap_bytes = cap_bytes


def settle(
    write_bytes: int, *, factor: float = 3.0, cap_fraction: float = 0.5
) -> dict[str, float | str]:
    """``sync``, then touch and free ``factor`` x ``write_bytes`` of anonymous memory.

    The amount is capped at ``cap_fraction`` of MemAvailable, so the host never swaps or
    OOMs because of the benchmark, and at the ``configure``d cap.

    Returns:
        What was done: bytes touched, method, seconds in sync and in all (for the JSON).
    """
    t0 = time.perf_counter()
    os.sync()
    t_sync = time.perf_counter() - t0
    want = int(write_bytes * factor)
    avail = mem_available()
    if avail:
        want = min(want, int(avail * cap_fraction))
    if _cap_bytes is not None:
        want = min(want, _cap_bytes)
    want -= want % PAGE
    method = "none"
    if want > 0:
        m = mmap.mmap(-1, want, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            method = _populate(m, want)
        finally:
            m.close()
    return {
        "touched": float(want),
        "method": method,
        "sync_seconds": t_sync,
        "seconds": time.perf_counter() - t0,
    }


def free_bytes(path: Path) -> int:
    """Free bytes for unprivileged use on the filesystem holding ``path`` (as ``df``)."""
    return shutil.disk_usage(path).free
