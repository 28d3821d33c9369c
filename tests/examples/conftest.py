"""Fixtures for the example tests: which daemon the examples use, and what it implements.

Each example starts its own daemon (blockd unless ``BLOCKD_TEST_DAEMON`` names a
qemu-storage-daemon; :func:`kit.cli.run_example` runs them). An example whose daemon lacks
a command it needs is skipped with that reason, found by asking the daemon's
``query-commands`` (:func:`kit.daemons.require_commands`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kit.daemons import lab_daemon


@pytest.fixture(scope="session")
def daemon_commands() -> Iterator[set[str]]:
    """What the daemon under test implements (skipped if blockd does not start yet)."""
    with lab_daemon("blockd-ex-") as (_daemon, commands):
        yield commands
