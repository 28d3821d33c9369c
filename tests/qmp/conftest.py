"""Fixtures of the QMP tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kit.wire import qsd_monitor


@pytest.fixture(scope="module")
def qsd() -> Iterator[str]:
    """A QEMU 10.0 monitor socket shared by a module's byte-exact comparisons."""
    with qsd_monitor() as path:
        yield path
