"""Opening and reading host files without ever blocking the event loop.

Rules and theory of operation:

* **Off the loop, bounded in time.** Every ``stat``, ``open`` and read of a host file made
  while a node opens runs in a worker thread (:func:`call_bounded`), and the caller waits
  at most :data:`OPEN_SECONDS` of real time: a file on storage that stopped answering (a hung NFS or
  FUSE mount) turns into ``ETIMEDOUT`` instead of freezing the command. The thread cannot
  be stopped; it is *abandoned*: whatever it opens later is closed by the thread itself.
  At most :data:`MAX_ABANDONED` threads may hang like that at once; past that, opens fail
  at once with ``EAGAIN`` rather than piling up threads.
* **Kinds are checked before anything is opened.** ``open(2)`` on a FIFO blocks until a
  writer comes, and opening a device can have side effects (a tape rewinds, a terminal
  becomes the controlling one), so the kind of file is taken from ``stat(2)`` first and
  only the kinds the caller accepts are opened, with ``O_NONBLOCK | O_NOCTTY`` (a FIFO
  swapped in after the ``stat`` cannot block either) and checked again with ``fstat``.
  Kinds refused say what ``open(2)`` would have said where it refuses them itself
  (``ENXIO`` for a socket, ``EISDIR`` for a directory opened for writing) and raise
  :class:`WrongKind` where it would have opened them (QEMU's ``file`` driver then says
  ``'file' driver requires '<path>' to be a regular file``).
* **Reads of files that are not image data are bounded**: :func:`read_bounded` reads at
  most the caller's limit and fails with ``EFBIG`` past it, so ``/dev/zero`` named as a
  configuration file costs a few pages, not the daemon's memory.

Every function raises ``OSError`` with the ``errno`` QEMU would report, or
:class:`WrongKind`; callers turn them into their drivers' texts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import trio
import trio.lowlevel

T = TypeVar("T")

#: The longest one host ``stat``/``open``/small read may take before the caller gives up.
OPEN_SECONDS: Final = 10.0
#: How many abandoned (still stuck) host calls may exist at once.
MAX_ABANDONED: Final = 8

_abandoned = 0
_abandoned_lock = threading.Lock()


class WrongKind(Exception):
    """The path names a file of a kind the caller does not open (``kind``: ``FIFO``,
    ``socket``, ``directory``, ``character device``, ``block device``); nothing was
    opened."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"'{path}' is a {kind}")
        self.path = path
        self.kind = kind


def kind_of(mode: int) -> str:
    """The kind of file ``st_mode`` describes, in :class:`WrongKind`'s words."""
    for test, name in (
        (stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def abandoned_calls() -> int:
    """Host calls given up by :func:`call_bounded` that have not returned yet."""
    return _abandoned


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _Call:
    """One bounded call: what the worker thread and the waiting task share."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished = False
        self.abandoned = False
        self.result: object = None
        self.error: BaseException | None = None


async def call_bounded(
    fn: Callable[[], T],
    *,
    seconds: float | None = None,
    cleanup: Callable[[T], None] | None = None,
) -> T:
    """``fn()`` in a worker thread; its result, or its exception re-raised.

    Raises:
        OSError: ``ETIMEDOUT`` when ``fn`` has not returned within ``seconds`` (default
            :data:`OPEN_SECONDS`); ``EAGAIN`` when :data:`MAX_ABANDONED` calls are stuck
            already (``fn`` is not started then).
        trio.Cancelled: the caller was cancelled while waiting.

    Guarantees: when the caller stops waiting (time limit or cancellation) and ``fn``
    returns later, ``cleanup`` is called with its result in the worker thread (an
    opened descriptor is closed there), and the call stops counting as abandoned.
    """
    global _abandoned
    limit = OPEN_SECONDS if seconds is None else seconds
    with _abandoned_lock:
        if _abandoned >= MAX_ABANDONED:
            raise _error(errno.EAGAIN)
    call = _Call()
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def worker() -> None:
        global _abandoned
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # handed to the caller
            error = exc
        with call.lock:
            call.finished = True
            call.result, call.error = result, error
            gone = call.abandoned
        if not gone:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)
            return
        if error is None and cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup(result)  # type: ignore[arg-type]  # fn returned: a T
        with _abandoned_lock:
            _abandoned -= 1

    def expire() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    # The limit is the host's clock, not trio's: a host call takes real time, and a
    # test's fake clock jumps while it waits for a thread.
    timer = threading.Timer(limit, expire)
    timer.daemon = True
    trio.lowlevel.start_thread_soon(worker, lambda _: None)
    timer.start()
    try:
        await done.wait()
    finally:
        timer.cancel()
        with call.lock:
            if not call.finished:
                call.abandoned = True
        if call.abandoned:
            with _abandoned_lock:
                _abandoned += 1
    if call.abandoned:
        raise _error(errno.ETIMEDOUT)
    if call.error is not None:
        raise call.error
    return call.result  # type: ignore[return-value]  # fn returned: a T


def _close(fd: int) -> None:
    os.close(fd)


def _open_checked(path: str, flags: int, accept: Callable[[int], bool]) -> int:
    """``open(path, flags)`` in the calling thread once ``stat`` says the kind is
    accepted; see the module docstring."""
    if "\0" in path:  # no such name can exist (a header's name bytes may hold one)
        raise _error(errno.EINVAL)
    mode = os.stat(path).st_mode
    if not accept(mode):
        if stat.S_ISSOCK(mode):
            raise _error(errno.ENXIO)  # what open(2) says for a socket
        if stat.S_ISDIR(mode) and flags & (os.O_WRONLY | os.O_RDWR):
            raise _error(errno.EISDIR)
        raise WrongKind(path, kind_of(mode))
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not accept(mode):  # replaced between the stat and the open
            raise WrongKind(path, kind_of(mode))
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_regular(path: str, flags: int) -> int:
    """A descriptor of the regular file ``path`` opened with ``flags`` (``O_RDONLY`` or
    ``O_RDWR``, ``O_DIRECT``...), opened off the event loop within :data:`OPEN_SECONDS`.

    Raises:
        OSError: ``stat``/``open`` failed (``errno`` as ``open(2)`` gives it; ``ENXIO``
            for a socket, ``EISDIR`` for a directory opened for writing, ``EINVAL`` for
            a name holding a NUL), or the time limit (``ETIMEDOUT``, ``EAGAIN``).
        WrongKind: a FIFO, a device or a directory opened read-only; not opened.
    """
    return await call_bounded(lambda: _open_checked(path, flags, stat.S_ISREG), cleanup=_close)


def _readable(mode: int) -> bool:
    # What fopen(3) would read for QEMU: files and devices, never a FIFO (it would block).
    return stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _read_limited(path: str, limit: int) -> bytes:
    fd = _open_checked(path, os.O_RDONLY | os.O_NONBLOCK, _readable)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            data = os.read(fd, min(limit + 1 - size, 1 << 16))
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            size += len(data)
        raise _error(errno.EFBIG)
    finally:
        os.close(fd)


async def read_bounded(path: str, limit: int) -> bytes:
    """The whole contents of ``path`` (a regular file or a device, read as ``fopen``
    would), at most ``limit`` bytes, read off the event loop within :data:`OPEN_SECONDS`.

    Raises:
        OSError: as :func:`open_regular`; ``EFBIG`` when there is more than ``limit``
            bytes; ``EAGAIN`` from a device that has nothing to read now.
        WrongKind: a FIFO or a directory; not opened.
    """
    return await call_bounded(lambda: _read_limited(path, limit))


def _prefix(path: str, length: int) -> bytes | None:
    try:
        fd = _open_checked(path, os.O_RDONLY, stat.S_ISREG)
    except (OSError, WrongKind):
        return None
    try:
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


async def read_prefix(path: str, length: int) -> bytes | None:
    """The first ``length`` bytes of the regular file ``path`` (fewer if it is shorter),
    or None when it cannot be read as one: missing, not a regular file, stuck
    (the open proper reports why)."""
    try:
        return await call_bounded(lambda: _prefix(path, length))
    except OSError:
        return None
