"""The ``file`` protocol driver: a regular host file, read and written in worker threads.

Every read and write is one positional system call (``preadv``/``pwrite``) run by
:func:`run_in_thread` (in trio's worker threads) straight into or out of the caller's
buffer, so the event loop never waits for the disk. Reads past the end of the file
return zeros; writes past it grow the file (format drivers append clusters that way).
With ``cache.direct`` the file is opened with ``O_DIRECT``: requests are then 4 KiB
aligned (the node pads them) and go through a page-aligned bounce buffer.

Offloaded copies (:meth:`FileDriver.copy_in`) move extents of other ``file`` nodes into
this one with ``copy_file_range(2)``. Written data is written back in the background
(:mod:`blockd.block.host.writebehind`), a flush with nothing written since the last one
skips its ``fdatasync``, and a discard punches a hole.

Block status follows QEMU's ``file-posix``: ``SEEK_DATA``/``SEEK_HOLE`` tell data from
holes; both are allocated at this level (a protocol node decides its own contents), holes
read as zeros.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import trio
import trio.lowlevel

from blockd.block.driver import BlockStatus, Driver, Extent, OffloadNotSupported, Status
from blockd.block.host import files
from blockd.block.host import io as hostio
from blockd.block.host.locking import FileLocks
from blockd.block.host.writebehind import WriteBehind
from blockd.block.node import BlockNode
from blockd.errors import HostError, RequestError

DIRECT_ALIGNMENT = 4096

T = TypeVar("T")


def _no_abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in one of trio's cached worker threads and return its result.

    The same contract as :func:`trio.to_thread.run_sync` without a limiter or
    abandonment (a cancellation arriving after the start waits for the call), for a
    fraction of its per-call cost: the stream copy makes two such calls per chunk.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run ended meanwhile
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
    result: T = await trio.lowlevel.wait_task_rescheduled(_no_abort)
    return result


def _open_flags(read_only: bool, direct: bool) -> int:
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    return flags


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:  # end of file: the rest reads as zeros
            view[done:] = bytes(len(view) - done)
            return
        done += n


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread_direct(fd: int, view: memoryview, offset: int) -> None:
    with mmap.mmap(-1, len(view)) as bounce:
        _pread_full(fd, memoryview(bounce), offset)
        view[:] = bounce[: len(view)]


def _pwrite_direct(fd: int, view: memoryview, offset: int) -> None:
    with mmap.mmap(-1, len(view)) as bounce:
        bounce[: len(view)] = view
        _pwrite_full(fd, memoryview(bounce), offset)


#: copy_file_range(2) refuses this pair of files or ranges: copy through a buffer
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
#: the buffer of that fallback copy
_FALLBACK_BUFFER = 1024 * 1024


def _copy_full(src_fd: int, src: int, dst_fd: int, dst: int, length: int) -> None:
    """Copy ``length`` bytes from ``src`` of ``src_fd`` to ``dst`` of ``dst_fd`` in the
    kernel; bytes past the source's end are written as zeros."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src + done, dst + done)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            n = 0
        if n == 0:  # refused, or the source's end: the rest through a buffer
            buf = memoryview(bytearray(min(_FALLBACK_BUFFER, length - done)))
            while done < length:
                view = buf[: min(len(buf), length - done)]
                _pread_full(src_fd, view, src + done)
                _pwrite_full(dst_fd, view, dst + done)
                done += len(view)
            return
        done += n


def _copy_pieces(dst_fd: int, offset: int, pieces: list[tuple[int, int, int]]) -> None:
    for src_fd, src, length in pieces:
        _copy_full(src_fd, src, dst_fd, offset, length)
        offset += length


class FileDriver(Driver):
    """A host file (QMP driver ``file``); see the module docstring."""

    format_name: ClassVar[str] = "file"
    protocol_name: ClassVar[str | None] = "file"

    def __init__(self, node: BlockNode, path: str, fd: int, *, direct: bool, locking: bool) -> None:
        super().__init__(node)
        self.path = path
        self.fd = fd
        self.direct = direct
        self.no_flush = bool(node.options.get("cache", {}).get("no-flush", False))
        #: background syncs of written data (not with no-flush or O_DIRECT)
        self._behind = None if self.no_flush or direct else WriteBehind()
        #: something was written since the last flush began (open: unknown, so yes)
        self._unflushed = True
        #: the lock bytes held on the file; ``None`` with ``locking: off``
        self.locks: FileLocks | None = FileLocks(fd) if locking else None
        info = os.fstat(fd)
        self._size = info.st_size
        self._identity = (info.st_dev, info.st_ino)

    @classmethod
    async def _open_fd(cls, path: str, *, read_only: bool, direct: bool) -> int:
        """Open the regular file ``path`` off the event loop (:mod:`blockd.block.host.files`:
        kinds checked before the open, never blocking on a FIFO, bounded in time).

        Raises:
            HostError: QEMU's texts: ``Could not open '<path>': <strerror>`` (a socket
                gives ``No such device or address``, a directory opened read-write
                ``Is a directory``, a stuck open ``Connection timed out``), and
                ``'file' driver requires '<path>' to be a regular file`` for FIFOs,
                devices and directories opened read-only.
        """
        try:
            return await files.open_regular(path, _open_flags(read_only, direct))
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            raise HostError(f"Could not open '{path}': {os.strerror(code)}", errno=code) from exc
        except files.WrongKind as exc:
            raise HostError(f"'file' driver requires '{path}' to be a regular file") from exc

    @classmethod
    async def open(cls, node: BlockNode, options: Mapping[str, Any]) -> FileDriver:
        """Open ``options["filename"]``; read-only nodes get ``O_RDONLY``.

        With ``auto-read-only`` a read-write open refused for permissions (EACCES, EPERM,
        EROFS) falls back to read-only, as QEMU does.

        Raises:
            HostError: ``Could not open '<filename>': <strerror>``.
            RequestError: an empty name, ``aio=native`` without ``cache.direct``, a
                ``pr-manager`` (none exist), with QEMU's texts.
        """
        path = str(options["filename"])
        direct = bool(options.get("cache", {}).get("direct", False))
        locking = options.get("locking", "auto") != "off"
        # reference: QEMU bdrv_open_inherit / raw_open_common checks, in their order
        if not path:
            raise RequestError("The 'file' block driver requires a file name")
        if options.get("aio") == "native" and not direct:
            raise RequestError(
                "aio=native was specified, but it requires cache.direct=on, which was not "
                "specified."
            )
        if options.get("pr-manager") is not None:
            raise RequestError(
                f"No persistent reservation manager with id '{options['pr-manager']}'"
            )
        try:
            fd = await cls._open_fd(path, read_only=node.read_only, direct=direct)
        except HostError as exc:
            fallback = (errno.EACCES, errno.EPERM, errno.EROFS)
            if node.read_only or not options.get("auto-read-only") or exc.errno not in fallback:
                raise
            node.read_only = True
            fd = await cls._open_fd(path, read_only=True, direct=direct)
        return cls(node, path, fd, direct=direct, locking=locking)

    async def reopen(self, read_only: bool) -> None:
        """Reopen the file read-only or read-write, keeping the lock bytes held.

        Raises:
            HostError: the new mode cannot be opened; the old descriptor stays in use.
        """
        await self._quiesce()
        fd = await self._open_fd(self.path, read_only=read_only, direct=self.direct)
        if self.locks is not None:
            locks = FileLocks(fd)
            locks.apply(self.locks.perm, ~self.locks.unshared)
            self.locks = locks
        old, self.fd = self.fd, fd
        os.close(old)

    def file_identity(self) -> tuple[int, int] | None:
        return self._identity

    def length(self) -> int:
        # QEMU counts lengths in 512-byte sectors: a file's tail reads as zeros
        return -(-self._size // 512) * 512

    @property
    def request_alignment(self) -> int:
        return DIRECT_ALIGNMENT if self.direct else 1

    @property
    def filename(self) -> str:
        return self.path

    async def read(self, offset: int, buf: memoryview) -> None:
        reader = _pread_direct if self.direct else _pread_full
        await run_in_thread(reader, self.fd, buf, offset)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        writer = _pwrite_direct if self.direct else _pwrite_full
        try:
            await run_in_thread(writer, self.fd, view, offset)
        finally:
            self._unflushed = True  # also a write that failed part of the way
        self._wrote(offset, len(view))

    async def copy_in(self, offset: int, extents: Sequence[Extent]) -> None:
        """Copy host file extents into this file with ``copy_file_range(2)`` (a buffer
        where the kernel refuses), all in one worker-thread call. ``O_DIRECT`` files on
        either side are not offloaded: their alignment rules are the node's to keep."""
        pieces: list[tuple[int, int, int]] = []
        for extent in extents:
            source = extent.node.driver
            if not isinstance(source, FileDriver) or not source.offloads:
                raise OffloadNotSupported
            pieces.append((source.fd, extent.offset, extent.length))
        if not self.offloads:
            raise OffloadNotSupported
        length = sum(p[2] for p in pieces)
        try:
            await run_in_thread(_copy_pieces, self.fd, offset, pieces)
        except BaseException:  # the file may have grown part of the way
            self._size = max(self._size, os.fstat(self.fd).st_size)
            raise
        finally:
            self._unflushed = True
        self._wrote(offset, length)

    def _wrote(self, offset: int, length: int) -> None:
        """``length`` bytes were written at ``offset``: the file may have grown, and
        write-behind counts them."""
        self._size = max(self._size, offset + length)
        if self._behind is not None:
            self._behind.wrote(self.fd, length)

    @property
    def offloads(self) -> bool:
        """Whether this node takes part in offloaded copies (an open, buffered file)."""
        return not self.direct and self.fd >= 0

    async def discard(self, offset: int, length: int) -> None:
        """Punch a hole (the file keeps its size); refusals are ignored, as advice."""
        if self.fd < 0:
            return
        try:
            with contextlib.suppress(OSError):  # the space stays taken; nothing else changes
                await run_in_thread(hostio.punch_hole, self.fd, offset, length)
        finally:
            self._unflushed = True

    async def flush(self) -> None:
        """``fdatasync``, unless nothing was written through this node since the last
        one began (qcow2's ordered write-back flushes after each step; a flush right
        after a flush costs a journal commit for nothing)."""
        if not self.no_flush and self._unflushed:
            self._unflushed = False  # a write completing from here on counts again
            try:
                await run_in_thread(os.fdatasync, self.fd)
            except BaseException:
                self._unflushed = True
                raise
        if self._behind is not None:
            error = self._behind.take_error()
            if error is not None:  # a background sync lost written data
                raise error

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        # reference: QEMU file-posix find_allocation / raw_co_block_status
        data_flags = Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID
        zero_flags = Status.ZERO | Status.ALLOCATED | Status.OFFSET_VALID
        end = offset + length
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a hole up to the end of the file
                return BlockStatus(zero_flags, length, offset, self.node)
            return BlockStatus(data_flags, length, offset, self.node)
        if data > offset:
            return BlockStatus(zero_flags, min(data, end) - offset, offset, self.node)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        return BlockStatus(data_flags, max(1, min(hole, end) - offset), offset, self.node)

    def image_info(self) -> dict[str, Any]:
        return {"format-specific": {"type": "file", "data": {}}}

    async def _quiesce(self) -> None:
        """Let a background sync finish before its descriptor goes."""
        if self._behind is not None:
            # no deadline of its own: the descriptor must outlive the sync using it; a disk
            # that stops answering is bounded by the shutdown watchdog (blockd.run)
            with trio.CancelScope(shield=True):
                await self._behind.wait_idle()

    async def close(self) -> None:
        if self.fd >= 0:
            await self._quiesce()
            fd, self.fd = self.fd, -1
            os.close(fd)  # drops the OFD lock bytes with the description
