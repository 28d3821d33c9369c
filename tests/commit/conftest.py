"""Fixtures of the commit tests: a daemon driven through its handlers (as the stream
tests drive theirs), images made and judged with the real qemu-img and qemu-io."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from stream.streamtools import Harness

from blockd.daemon import Daemon


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A running daemon; shut down at the end, every event checked against its schema."""
    daemon = Daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        h = Harness(daemon)
        try:
            yield h
        finally:
            daemon.request_shutdown()
    for event in h.events:
        daemon.schema.validate_event(event["event"], event.get("data", {}))
