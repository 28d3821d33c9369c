"""One real-time check of the rate limit, through a real daemon and socket.

The limiter itself is tested against a controlled clock (test_ratelimit, test_job);
this only confirms the daemon's clock is wired in: a 4 MiB stream at 4 MiB/s takes
7 x 125 ms (the first 512 KiB chunk goes at once), judged with a generous bound.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kit.cli import BLOCKD
from kit.daemons import transcript
from kit.qemu import QSD
from kit.qmp import SyncClient

SPEED = 4 * 1024 * 1024
EXPECTED = 7 * 0.125


def timed_stream(program: list[str], where: Path, sock_dir: Path) -> float:
    elapsed: list[float] = []

    def script(m: SyncClient) -> None:
        start = time.monotonic()
        m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": SPEED})
        m.wait(lambda jobs: not jobs)
        elapsed.append(time.monotonic() - start)

    events = transcript(program, where, sock_dir, script)
    done = [e for e in events if e[:2] == ("event", "BLOCK_JOB_COMPLETED")]
    assert len(done) == 1 and "error" not in done[0][2]
    return elapsed[0]


def test_stream_rate_in_real_time(tmp_path: Path, sock_dir: Path) -> None:
    seconds = timed_stream(BLOCKD, tmp_path, sock_dir)
    assert EXPECTED * 0.95 <= seconds <= EXPECTED * 2.5, seconds


@pytest.mark.skipif(QSD is None, reason="no qemu-storage-daemon binary")
def test_the_bound_holds_for_qemu(tmp_path: Path, sock_dir: Path) -> None:
    assert QSD is not None
    seconds = timed_stream([QSD], tmp_path, sock_dir)
    assert EXPECTED * 0.95 <= seconds <= EXPECTED * 2.5, seconds
