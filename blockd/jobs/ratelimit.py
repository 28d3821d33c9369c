"""QEMU's slice-based rate limiter (``include/qemu/ratelimit.h``;
docs/qemu-behaviour/jobs.md §11).

Pure: every call takes ``now`` in nanoseconds, so the caller owns the clock (a job passes
trio's clock, tests pass plain numbers).

Theory: time is cut into slices of ``slice_ns``; each slice may carry ``quota`` bytes.
Bytes charged past the quota stretch the current slice to ``dispatched / quota`` slices and
the caller sleeps until that stretched end. A slice that has ended starts afresh at the
next call. Changing the speed changes only the quota; the slice in progress keeps its
start, end and count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: QEMU's ``BLOCK_JOB_SLICE_TIME``: every block job uses 100 ms slices.
BLOCK_JOB_SLICE_NS: Final = 100_000_000

_NS_PER_SECOND: Final = 1_000_000_000


def slice_quota(speed: int, slice_ns: int = BLOCK_JOB_SLICE_NS) -> int:
    """Bytes allowed per slice at ``speed`` bytes/s; 0 means unlimited.

    As ``ratelimit_set_speed``: computed in floating point, at least 1, truncated.
    """
    if speed == 0:
        return 0
    return int(max(speed * slice_ns / _NS_PER_SECOND, 1.0))


@dataclass
class RateLimit:
    """The limiter of one job. Mutable; owned by that job alone.

    Attributes:
        slice_ns: the slice length in ns.
        quota: bytes per slice; 0 disables throttling.
        slice_start: start of the current slice (ns).
        slice_end: end of the current, possibly stretched, slice (ns).
        dispatched: bytes charged in the current slice.
    """

    slice_ns: int = BLOCK_JOB_SLICE_NS
    quota: int = 0
    slice_start: int = 0
    slice_end: int = 0
    dispatched: int = 0

    def set_speed(self, speed: int) -> None:
        """Set the limit to ``speed`` bytes/s (0: unlimited); keeps the current slice."""
        if speed < 0:
            raise ValueError("speed must not be negative")
        self.quota = slice_quota(speed, self.slice_ns)

    def calculate_delay(self, n: int, now: int) -> int:
        """Charge ``n`` bytes at time ``now`` and return how long to wait, in ns.

        Mirrors ``ratelimit_calculate_delay``; never returns a negative delay (QEMU's
        timer fires at once in that case, which is the same as waiting 0).
        """
        if self.quota == 0:
            return 0
        if self.slice_end < now:
            # The previous (possibly stretched) slice is over: start a new one.
            self.slice_start = now
            self.slice_end = now + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.quota:
            return 0
        slices = self.dispatched / self.quota
        self.slice_end = self.slice_start + int(slices * self.slice_ns)
        return max(self.slice_end - now, 0)
