"""Shared test configuration. The rules every test follows, so that the suite is
deterministic and fast:

1. **No real sleeping in unit tests.** Code that waits on time takes a clock or runs under
   pytest-trio's ``autojump_clock``; ``trio.sleep`` in a test body is only for the fake clock.
2. **Every real I/O wait is bounded**: ``with trio.fail_after(...)`` around socket and
   subprocess waits, ``timeout=`` on ``subprocess.run``. A hang is a failure, not a stuck CI.
3. **Everything lives in ``tmp_path``**: images, sockets (short paths: a UNIX socket path
   has at most 107 bytes, see the ``sock_dir`` fixture), pidfiles. No fixed paths, no
   ``/tmp`` names that two runs could share, no network.
4. **Judge with the real tools**: images are made with ``qemu-img``/``qemu-io`` and results
   checked with ``qemu-img check``/``compare``/``map``/``info --output=json``; protocol
   behaviour is checked over real UNIX sockets and with real clients (``qemu.qmp``,
   ``qmp-shell``). Fakes (memory drivers, blkdebug rules) serve unit tests only.
5. **No hidden order or randomness**: tests do not depend on each other or on the order
   they run in; hypothesis runs derandomized (the ``ci`` profile below) so a failure
   reproduces.
6. **Processes are always reaped**: a test that starts a daemon stops it in a ``finally``
   (or a fixture) and waits for it, so no daemon outlives its test.
7. **Pure modules stay pure**: the protocol core and the other pure modules are tested
   without trio, from tables; trio tests use trio mode (``async def test_...``).
8. **Warnings are errors** (``pyproject.toml``): fix the cause, do not filter it.
9. **The package under test is the installed one.** Run the suite with the ``pytest``
   command (not ``python -m pytest``, which puts the working directory first on
   ``sys.path``); every Python this suite starts runs in safe-path mode
   (``PYTHONSAFEPATH``, set below), so ``python -m blockd`` started from the checkout
   still runs the installed package. Test modules are imported in importlib mode and
   only ``tests/`` goes on ``sys.path`` (for the kit, ``pyproject.toml``); the top of the
   repository only ever goes last, after ``site-packages`` (:func:`kit.repo.load_package`).
   CI installs the wheel and ``tests/test_installed.py`` fails if ``blockd`` comes from
   anywhere else.
10. **Helpers live in the kit** (``tests/kit``, one module per family) and fixtures in the
    ``conftest.py`` files, built on it; a test module imports neither a ``conftest.py``
    nor another test module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import settings
from kit.daemons import Harness
from kit.qmp import close_legacy_loop

from blockd.block.graph import Graph
from blockd.daemon import Daemon

os.environ["PYTHONSAFEPATH"] = "1"  # rule 9

settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory for UNIX sockets (``tmp_path`` may be too long)."""
    path = Path(tempfile.mkdtemp(prefix="blockd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    """An empty graph; every node still open at the end is closed."""
    g = Graph()
    try:
        yield g
    finally:
        await g.close_all()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """A daemon with its job nursery running, driven through its handlers
    (:class:`kit.daemons.Harness`); shut down (jobs cancelled, images closed) at the end of
    the test, and every event it sent checked against ``schema/events``."""
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


@pytest.fixture(autouse=True)
def _close_default_asyncio_loop() -> Iterator[None]:
    """Close the thread's default asyncio loop after each test (:func:`kit.qmp.close_legacy_loop`:
    ``qemu.qmp``'s synchronous client, also used by the examples, leaves it open)."""
    yield
    close_legacy_loop()
