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
   still runs the installed package. CI installs the wheel and ``tests/test_installed.py``
   fails if ``blockd`` comes from anywhere else.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

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


@pytest.fixture(autouse=True)
def _close_default_asyncio_loop() -> Iterator[None]:
    """Close the thread's default asyncio loop after each test.

    ``qemu.qmp``'s synchronous client (``qemu.qmp.legacy``, also used by the examples)
    leaves the thread's default event loop open; garbage-collected later, it would raise
    an unclosed-loop ``ResourceWarning`` inside whatever test runs then.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # set to None already (asyncio.run does that)
            return
    if not loop.is_running():
        loop.close()
        asyncio.set_event_loop(None)
