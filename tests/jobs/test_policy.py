"""The on-error policy table (docs/qemu-behaviour/jobs.md §6; QEMU
block_job_error_action)."""

from __future__ import annotations

import errno
import itertools

import pytest

from blockd.jobs.policy import (
    BlockDeviceIoStatus,
    BlockdevOnError,
    BlockErrorAction,
    error_action,
    io_status_after,
)

# (policy, errno) -> action, written out from docs/qemu-behaviour/jobs.md §6.
EXPECTED = {
    ("report", errno.EIO): "report",
    ("report", errno.ENOSPC): "report",
    ("ignore", errno.EIO): "ignore",
    ("ignore", errno.ENOSPC): "ignore",
    ("stop", errno.EIO): "stop",
    ("stop", errno.ENOSPC): "stop",
    ("enospc", errno.EIO): "report",
    ("enospc", errno.ENOSPC): "stop",
    ("auto", errno.EIO): "report",
    ("auto", errno.ENOSPC): "stop",
}
OTHER_ERRNOS = [errno.EPERM, errno.EINVAL, errno.EROFS, errno.ENOMEM, errno.EDQUOT]


def test_policy_values() -> None:
    assert [p.value for p in BlockdevOnError] == ["report", "ignore", "enospc", "stop", "auto"]
    assert [a.value for a in BlockErrorAction] == ["ignore", "report", "stop"]
    assert [s.value for s in BlockDeviceIoStatus] == ["ok", "failed", "nospace"]


@pytest.mark.parametrize(("key", "action"), EXPECTED.items())
def test_action_table(key: tuple[str, int], action: str) -> None:
    policy, code = key
    assert error_action(BlockdevOnError(policy), code) == action


@pytest.mark.parametrize(("policy", "code"), list(itertools.product(BlockdevOnError, OTHER_ERRNOS)))
def test_any_other_errno_is_treated_as_eio(policy: BlockdevOnError, code: int) -> None:
    assert error_action(policy, code) == error_action(policy, errno.EIO)


OK, FAILED, NOSPACE = BlockDeviceIoStatus


@pytest.mark.parametrize(
    ("current", "action", "code", "after"),
    [
        (OK, BlockErrorAction.STOP, errno.EIO, FAILED),
        (OK, BlockErrorAction.STOP, errno.ENOSPC, NOSPACE),
        (OK, BlockErrorAction.STOP, errno.EPERM, FAILED),
        (OK, BlockErrorAction.REPORT, errno.ENOSPC, OK),
        (OK, BlockErrorAction.IGNORE, errno.EIO, OK),
        # Only a stop while ok changes it: the first failure is kept.
        (FAILED, BlockErrorAction.STOP, errno.ENOSPC, FAILED),
        (NOSPACE, BlockErrorAction.STOP, errno.EIO, NOSPACE),
    ],
)
def test_io_status(
    current: BlockDeviceIoStatus, action: BlockErrorAction, code: int, after: str
) -> None:
    assert io_status_after(current, action, code) == after
