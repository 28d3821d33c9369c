"""Fixtures of the block-layer tests: a graph, and images made by the real ``qemu-img``.

Every image lives in ``tmp_path``; the helpers in ``blocktools`` run the Debian tools with
a timeout and fail the test on a non-zero exit unless ``check=False``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from blocktools import qemu_img

from blockd.block.graph import Graph


@pytest.fixture
async def graph() -> AsyncIterator[Graph]:
    """An empty graph; every node still open at the end is closed."""
    g = Graph()
    try:
        yield g
    finally:
        await g.close_all()


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image(name, size, fmt="qcow2", backing=None, backing_fmt=None, *opts)``."""

    def make(
        name: str,
        size: str | int = "1M",
        fmt: str = "qcow2",
        backing: str | None = None,
        backing_fmt: str | None = None,
        *options: str,
    ) -> Path:
        path = tmp_path / name
        args: list[str | Path] = ["create", "-q", "-f", fmt]
        if backing is not None:
            args += ["-b", backing]
            if backing_fmt is not None:
                args += ["-F", backing_fmt]
        for option in options:
            args += ["-o", option]
        args.append(path)
        if backing is None or size is not None:
            args.append(str(size))
        qemu_img(*args)
        return path

    return make
