"""Fixtures of the stream tests: a running daemon driven through its handlers.

Images are made with the real ``qemu-img``/``qemu-io`` in ``tmp_path`` and judged with
``qemu-img compare``/``check``/``info``/``map`` (see ``streamtools``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from streamtools import Harness

from blockd.daemon import Daemon


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A daemon with its job nursery running; shut down (jobs cancelled, images closed)
    at the end of the test, and every event it sent checked against ``schema/events``."""
    daemon = Daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        h = Harness(daemon)
        try:
            yield h
        finally:
            daemon.request_shutdown()
    # Every event the test saw matches its schema file.
    for event in h.events:
        daemon.schema.validate_event(event["event"], event.get("data", {}))
