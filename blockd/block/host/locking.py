"""Image locking compatible with QEMU's ``file`` driver.

QEMU (``block/file-posix.c``) announces how it uses an image with open-file-description
(OFD) byte-range locks on the image file itself, so that every QEMU process on the host
sees the others:

* byte ``100 + i`` is read-locked while the holder *uses* permission bit ``i``;
* byte ``200 + i`` is read-locked while the holder does *not share* permission bit ``i``
  with other users.

Permission bits (``BLK_PERM_*``): 0 consistent read, 1 write, 2 write unchanged, 3 resize.
Every lock is a shared (read) lock, so taking one never fails against QEMU; a conflict is
found by *testing* the partner byte with a write-lock probe (``F_OFD_GETLK``), which only
reports locks of other open file descriptions:

* to use bit ``i``, nobody else may hold ``200 + i``: else ``Failed to get "<perm>" lock``;
* to refuse sharing bit ``i``, nobody else may hold ``100 + i``: else
  ``Failed to get shared "<perm>" lock``.

A read-write qcow2 image, for example, holds 100, 101, 103 and 201, 203: ``qemu-img``
asking for ``write`` finds 201 taken. Locks die with the file description, so closing the
file releases them at once.
"""

from __future__ import annotations

import enum
import fcntl
import os
import struct
from typing import Final

PERM_BASE: Final = 100
SHARED_BASE: Final = 200

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (+ padding to 32 bytes)
_FLOCK: Final = struct.Struct("hhqqi4x")
_F_OFD_GETLK: Final = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", 37)


class Perm(enum.IntFlag):
    """QEMU's block permission bits (``BLK_PERM_*``)."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


PERM_NONE: Final = Perm(0)
PERM_ALL: Final = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE

PERM_NAMES: Final[dict[Perm, str]] = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


def perm_names(perm: Perm) -> str:
    """``"write, resize"``: the names of the bits in ``perm``, as QEMU lists them."""
    return ", ".join(name for bit, name in PERM_NAMES.items() if bit & perm)


class LockError(Exception):
    """Another process holds a lock byte we need; ``str(exc)`` is QEMU's message."""


def _bits(perm: Perm) -> list[tuple[int, Perm]]:
    return [(index, bit) for index, bit in enumerate(PERM_NAMES) if bit & perm]


def _set(fd: int, byte: int, kind: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


def _taken_by_other(fd: int, byte: int) -> bool:
    answer = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    kind: int = _FLOCK.unpack(answer)[0]
    return kind != fcntl.F_UNLCK


class FileLocks:
    """The lock bytes one open file description holds (one per ``file`` node).

    Args:
        fd: the image's file descriptor; the locks live and die with its description.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.perm = PERM_NONE
        self.unshared = PERM_NONE

    def check(self, perm: Perm, shared: Perm) -> None:
        """Whether we may use ``perm`` and share only ``shared``, given other holders.

        Raises:
            LockError: with QEMU's text (the first conflicting bit, uses before shares).
            OSError: the lock calls failed.
        """
        for index, bit in _bits(perm):
            if _taken_by_other(self.fd, SHARED_BASE + index):
                raise LockError(f'Failed to get "{PERM_NAMES[bit]}" lock')
        for index, bit in _bits(PERM_ALL & ~shared):
            if _taken_by_other(self.fd, PERM_BASE + index):
                raise LockError(f'Failed to get shared "{PERM_NAMES[bit]}" lock')

    def apply(self, perm: Perm, shared: Perm) -> None:
        """Hold exactly the bytes for using ``perm`` and not sharing ``~shared``.

        Does not check other holders (call :meth:`check` first); shared locks never
        conflict with QEMU's.
        """
        unshared = PERM_ALL & ~shared
        for base, old, new in (
            (PERM_BASE, self.perm, perm),
            (SHARED_BASE, self.unshared, unshared),
        ):
            for index, _bit in _bits(new & ~old):
                _set(self.fd, base + index, fcntl.F_RDLCK)
            for index, _bit in _bits(old & ~new):
                _set(self.fd, base + index, fcntl.F_UNLCK)
        self.perm, self.unshared = perm, unshared

    def update(self, perm: Perm, shared: Perm) -> None:
        """:meth:`check` then :meth:`apply`; on a conflict nothing changes."""
        self.check(perm, shared)
        self.apply(perm, shared)

    def release(self) -> None:
        """Drop every lock byte (closing the descriptor does the same)."""
        self.apply(PERM_NONE, PERM_ALL)
