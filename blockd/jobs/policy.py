"""What a block job does when its I/O fails: the ``on-error`` policy as data.

Pure. Mirrors QEMU's ``block_job_error_action`` and ``block_job_iostatus_set_err``
(``blockjob.c``; docs/qemu-behaviour/jobs.md §6): the policy and the errno decide the action; only a
``stop`` changes the job's ``io-status``, and only while it is ``ok``.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from enum import StrEnum
from typing import Final


class BlockdevOnError(StrEnum):
    """QAPI ``BlockdevOnError``: the ``on-error`` argument."""

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class BlockErrorAction(StrEnum):
    """QAPI ``BlockErrorAction``: ``BLOCK_JOB_ERROR.action``."""

    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


class BlockDeviceIoStatus(StrEnum):
    """QAPI ``BlockDeviceIoStatus``: ``BlockJobInfo.io-status``."""

    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class IoOperationType(StrEnum):
    """QAPI ``IoOperationType``: ``BLOCK_JOB_ERROR.operation``."""

    READ = "read"
    WRITE = "write"


A = BlockErrorAction

#: Action per policy: (for ENOSPC, for any other errno).
ACTIONS: Final[Mapping[BlockdevOnError, tuple[BlockErrorAction, BlockErrorAction]]] = {
    BlockdevOnError.REPORT: (A.REPORT, A.REPORT),
    BlockdevOnError.IGNORE: (A.IGNORE, A.IGNORE),
    BlockdevOnError.STOP: (A.STOP, A.STOP),
    BlockdevOnError.ENOSPC: (A.STOP, A.REPORT),
    BlockdevOnError.AUTO: (A.STOP, A.REPORT),
}


def error_action(on_error: BlockdevOnError, errno: int) -> BlockErrorAction:
    """The action for an I/O error with ``errno`` under policy ``on_error``."""
    on_enospc, otherwise = ACTIONS[on_error]
    return on_enospc if errno == _errno.ENOSPC else otherwise


def io_status_after(
    current: BlockDeviceIoStatus, action: BlockErrorAction, errno: int
) -> BlockDeviceIoStatus:
    """The ``io-status`` after an error: set by a stop, and only while it is ``ok``."""
    if action is not BlockErrorAction.STOP or current is not BlockDeviceIoStatus.OK:
        return current
    if errno == _errno.ENOSPC:
        return BlockDeviceIoStatus.NOSPACE
    return BlockDeviceIoStatus.FAILED
