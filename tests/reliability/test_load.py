"""Load: 50 clients issuing commands while 16 streams run. Every reply is correct,
every client receives every event in order, no job stalls, every image ends streamed
and intact. The long soak is ``python -m stress.soak``."""

from __future__ import annotations

from pathlib import Path

from stress.loadkit import run_load


async def test_fifty_clients_sixteen_streams(tmp_path: Path) -> None:
    result = await run_load(tmp_path, clients=50, streams=16, size="4M", speed=2 << 20)
    assert result.problems == [], result.problems
    assert result.commands > 50 * 10
    assert result.events_per_client >= 16 * 7  # 6 status changes + completion per job
