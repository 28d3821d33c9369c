"""The ``--pidfile``: a locked file holding the daemon's pid while it serves.

The file appears only with its full content (written to a temporary name, locked, then
renamed into place), so a reader that waits for it to exist never sees it empty. The lock
(``flock``) is held until exit; a second daemon given the same path finds the lock taken
and refuses to start. On exit the file is removed, but only if it is still ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

__all__ = ["PidFile", "PidFileError", "check_pidfile_free"]


class PidFileError(Exception):
    """The pidfile cannot be written, or another live process holds it."""


def _locked_by_other(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the test lock
    return False


def check_pidfile_free(path: str) -> None:
    """Raise :class:`PidFileError` if a live process holds the pidfile ``path``."""
    if _locked_by_other(path):
        raise PidFileError(f"Cannot lock pid file: {path} is held by another running daemon")


class PidFile:
    """A pidfile written with :meth:`write` and removed with :meth:`remove`."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None

    def write(self, pid: int | None = None) -> None:
        """Write ``pid`` (default: this process) and keep the file locked.

        Raises:
            PidFileError: another live daemon holds the file, or it cannot be written.
        """
        check_pidfile_free(self.path)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PidFileError(f"Cannot open pid file: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid() if pid is None else pid}\n".encode())
            os.fsync(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PidFileError(f"Cannot write pid file: {exc.strerror}") from exc
        stat = os.fstat(fd)
        self._fd, self._ino = fd, (stat.st_dev, stat.st_ino)

    def remove(self) -> None:
        """Delete the file if it is still the one written here, and drop the lock."""
        if self._fd is None:
            return
        try:
            stat = os.stat(self.path)
            if (stat.st_dev, stat.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = self._ino = None
