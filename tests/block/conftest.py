"""Fixtures of the block-layer tests: images made by the real ``qemu-img`` (the ``graph``
fixture is the suite's, ``tests/conftest.py``).

Every image lives in ``tmp_path``; the kit's wrappers (:mod:`kit.qemu`) run the Debian
tools with a timeout and fail the test on a non-zero exit unless ``check=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from kit.chains import mixed_chain
from kit.qemu import create


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image(name, size, fmt="qcow2", backing=None, backing_fmt=None, *opts)``:
    :func:`kit.qemu.create` of ``tmp_path/name``."""

    def make(
        name: str,
        size: str | int | None = "1M",
        fmt: str = "qcow2",
        backing: str | None = None,
        backing_fmt: str | None = None,
        *options: str,
    ) -> Path:
        return create(tmp_path / name, size, backing, backing_fmt, fmt, *options)

    return make


@pytest.fixture
def chain(tmp_path: Path) -> dict[str, Path]:
    """:func:`kit.chains.mixed_chain` in ``tmp_path``: base.raw <- mid.qcow2 <- top.qcow2."""
    return mixed_chain(tmp_path)
