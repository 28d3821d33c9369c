"""Host file calls Python's ``os`` module lacks, through the C library (Linux).

* :func:`writeback_call`: ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`` submits
  the writeback of every dirty page of a file without waiting for it (write-behind).
* :func:`punch_hole`: ``fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)`` gives the
  space of a byte range back to the filesystem (discard).

``ctypes`` is imported on first use only (about 1 MiB of the daemon's memory). Where the
C library lacks a call, :func:`writeback_call` falls back to ``fdatasync(2)`` and
:func:`punch_hole` does nothing: both are advice to the host, never needed for
correctness.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any, Final

#: <linux/fs.h> and <linux/falloc.h>
_SYNC_FILE_RANGE_WRITE: Final = 2
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


#: the C signatures used, as ctypes type names: ``int f(...)``
_SIGNATURES: Final = {
    "sync_file_range": ("c_int", "c_int64", "c_int64", "c_uint"),
    "fallocate": ("c_int", "c_int", "c_int64", "c_int64"),
}


@functools.cache
def _libc_call(name: str) -> Any:
    """The C library's function ``name`` (one of :data:`_SIGNATURES`), or ``None``."""
    import ctypes

    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = [getattr(ctypes, t) for t in _SIGNATURES[name]]
    call.restype = ctypes.c_int
    return call


def _checked(result: int) -> None:
    if result != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def writeback_call() -> Callable[[int], None]:
    """``fd -> None``: start the writeback of every dirty page of ``fd`` (resolve it in
    the event loop's thread, call it in a worker)."""
    sync_file_range = _libc_call("sync_file_range")
    if sync_file_range is None:
        return os.fdatasync

    def start(fd: int) -> None:
        _checked(sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE))

    return start


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of ``fd`` (reads give zeros), keeping the
    file's size; nothing when the host cannot.

    Raises:
        OSError: the host refused for a reason other than not supporting it.
    """
    fallocate = _libc_call("fallocate")
    if fallocate is None or length <= 0:
        return
    try:
        _checked(fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
