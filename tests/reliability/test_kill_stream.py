"""kill -9 at random moments during block-stream (one chain, and two streams at once):
every image passes ``qemu-img check`` without corruption, the guest view equals the
pre-stream copy, and a second stream completes. More rounds: ``python -m
stress.kill_stream``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stress.killkit import kill_round


@pytest.mark.parametrize("chains", [1, 2])
def test_kill_during_stream(tmp_path: Path, chains: int) -> None:
    rnd = random.Random(chains)
    interrupted = 0
    for round_ in range(3):
        result = kill_round(tmp_path / f"r{round_}", rnd, chains)
        assert result.problems == [], result.problems
        interrupted += result.interrupted
    assert interrupted > 0  # at least one kill hit a running stream
