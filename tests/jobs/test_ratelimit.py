"""QEMU's rate limiter (docs/qemu-behaviour/jobs.md §11), with the clock in the test's hands."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.jobs.ratelimit import BLOCK_JOB_SLICE_NS, RateLimit, slice_quota

CHUNK = 512 * 1024


@pytest.mark.parametrize(
    ("speed", "quota"),
    [(0, 0), (1, 1), (9, 1), (10, 1), (1024, 102), (1024 * 1024, 104857), (10**9, 10**8)],
)
def test_quota_per_slice(speed: int, quota: int) -> None:
    assert slice_quota(speed) == quota
    rl = RateLimit()
    rl.set_speed(speed)
    assert rl.quota == quota
    assert rl.slice_ns == BLOCK_JOB_SLICE_NS == 100_000_000


def test_negative_speed_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimit().set_speed(-1)


def test_unlimited_never_delays() -> None:
    rl = RateLimit()
    for now in range(0, 10**9, 10**7):
        assert rl.calculate_delay(10**9, now) == 0


def test_first_chunk_is_not_delayed_then_the_debt_is_paid() -> None:
    rl = RateLimit()
    rl.set_speed(1024)
    # Before the first chunk: a fresh slice, nothing charged.
    assert rl.calculate_delay(0, 5_000) == 0
    assert (rl.slice_start, rl.slice_end, rl.dispatched) == (5_000, 100_005_000, 0)
    # The chunk is charged afterwards; its delay is paid before the next one.
    rl.calculate_delay(CHUNK, 6_000)
    # dispatched / quota = 524288 / 102 slices, measured from the slice start.
    expected_end = 5_000 + int(524288 / 102 * 100_000_000)
    assert expected_end == 514_007_848_137
    assert rl.slice_end == expected_end
    assert rl.calculate_delay(0, 7_000) == expected_end - 7_000
    # Waking early (pause, set-speed) recomputes the remainder.
    assert rl.calculate_delay(0, expected_end - 10) == 10
    # At the end of the stretched slice the next chunk may go.
    assert rl.calculate_delay(0, expected_end) == 0
    assert rl.calculate_delay(0, expected_end + 1) == 0
    assert rl.dispatched == 0  # a new slice started


def test_small_requests_within_quota_go_at_once() -> None:
    rl = RateLimit()
    rl.set_speed(10_000)  # 1000 bytes per slice
    now = 1
    assert [rl.calculate_delay(300, now) for _ in range(3)] == [0, 0, 0]
    # The fourth takes it to 1200 >= 1000: 1.2 slices from the slice start.
    assert rl.calculate_delay(300, now) == 120_000_000


def test_set_speed_keeps_the_current_slice() -> None:
    rl = RateLimit()
    rl.set_speed(1024 * 1024)
    rl.calculate_delay(CHUNK, 1_000)
    state = (rl.slice_start, rl.slice_end, rl.dispatched)
    rl.set_speed(2 * 1024 * 1024)
    assert (rl.slice_start, rl.slice_end, rl.dispatched) == state
    # Recomputed against the new quota: 524288 / 209715 slices from the start.
    assert rl.calculate_delay(0, 2_000) == 1_000 + int(524288 / 209715 * 1e8) - 2_000
    rl.set_speed(0)
    assert rl.calculate_delay(0, 3_000) == 0


def simulate(speed: int, chunk: int, chunks: int) -> float:
    """A job's loop: sleep the delay (re-checked until 0), copy, charge. Returns B/s."""
    rl = RateLimit()
    rl.set_speed(speed)
    start = now = 123_456_789

    def sleep() -> None:
        nonlocal now
        while True:
            delay = rl.calculate_delay(0, now)
            assert delay >= 0
            now += delay
            if delay == 0:
                return

    for _ in range(chunks):
        sleep()
        rl.calculate_delay(chunk, now)
    sleep()  # pay for the last chunk too
    return chunks * chunk / ((now - start) / 1e9)


@pytest.mark.parametrize("speed", [1024 * 1024, 10 * 1024 * 1024, 3_333_333, 64 * 1024])
def test_long_run_rate_within_two_percent(speed: int) -> None:
    rate = simulate(speed, CHUNK, 200)
    assert abs(rate - speed) / speed < 0.02


@given(
    speed=st.integers(min_value=1, max_value=10**9),
    chunk=st.integers(min_value=1, max_value=4 * CHUNK),
    chunks=st.integers(min_value=2, max_value=60),
)
def test_never_faster_than_the_quota_allows(speed: int, chunk: int, chunks: int) -> None:
    rl = RateLimit()
    rl.set_speed(speed)
    now = start = 10**9
    sent = 0
    for _ in range(chunks):
        while (delay := rl.calculate_delay(0, now)) != 0:
            assert delay > 0
            now += delay
        # Everything charged so far fits in the slices elapsed (+ the current one).
        slices = (now - start) // BLOCK_JOB_SLICE_NS + 1
        assert sent <= rl.quota * slices + chunk
        rl.calculate_delay(chunk, now)
        sent += chunk
