"""QEMU's own tools from the tests: where QEMU 10.0 is, and ``qemu-img``/``qemu-io`` run
bounded in time, as the judges of what blockd writes.

Where: QEMU 10.0's ``qemu-storage-daemon`` and ``qemu-io`` are unpacked (not installed) by
the project's ``.ci/fetch-qemu10`` under ``$BLOCKD_QEMU10_ROOT`` (default
``/work/qsd10/root``); Debian's packaged ``qemu-storage-daemon`` (7.2,
``qemu-system-common``) is the fallback where a test accepts any release. A test that
compares blockd with QEMU's exact replies, events or image headers needs 10.0 (7.2 lacks
``backing-mask-protocol``, the ``active`` member of ``query-named-block-nodes`` and some
of the error texts). Tests that need a binary skip when it is missing, so the suite passes
on a machine without them, and on one with only Debian's 7.2.

Running: every tool goes through :func:`run_tool`, so one that hangs fails its test after
:data:`TIMEOUT` instead of stalling the suite, and a non-zero exit fails the test with the
tool's output unless ``check=False``. The system's ``qemu-img``/``qemu-io`` (PATH) make
and judge the images.

Making images: :func:`create`, :func:`write`, :func:`io_script` (whole chains:
:mod:`kit.chains`). Judging them: :func:`check`, :func:`check_report`,
:func:`assert_clean`, :func:`compare`, :func:`assert_streamed`, :func:`image_info`,
:func:`image_map`, :func:`own_data`; copies of a guest view: :func:`convert`,
:func:`snapshot`, :func:`to_raw`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

TIMEOUT = 60
KIB = 1024
MIB = 1024 * KIB

QEMU10_ROOT = Path(os.environ.get("BLOCKD_QEMU10_ROOT", "/work/qsd10/root"))
QEMU10_BIN = QEMU10_ROOT / "usr" / "bin"
QEMU10_LIB = QEMU10_ROOT / "usr" / "lib" / "x86_64-linux-gnu"
QSD10 = QEMU10_BIN / "qemu-storage-daemon"
QEMU10_IO = QEMU10_BIN / "qemu-io"

#: QEMU 10.0's daemon when unpacked, else one on PATH, else None: for tests that accept
#: any release.
QSD: str | None = str(QSD10) if QSD10.exists() else shutil.which("qemu-storage-daemon")
#: QEMU 10.0's daemon when unpacked, else None: for tests of 10.0's exact behaviour.
QSD_10: str | None = str(QSD10) if QSD10.exists() else None


def qemu10_env() -> dict[str, str]:
    """This process's environment, with QEMU 10.0's module folder on ``LD_LIBRARY_PATH``
    (for starting :data:`QSD10`)."""
    return {**os.environ, "LD_LIBRARY_PATH": str(QEMU10_LIB)}


def run_tool(
    *args: str | Path, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` and return the finished process; with ``check``, a non-zero exit
    fails the test with the tool's output."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args!r} failed ({result.returncode}): {result.stdout}{result.stderr}"
        )
    return result


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``qemu-img ARGS``; see :func:`run_tool`."""
    return run_tool("qemu-img", *args, check=check)


def qemu_io(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``qemu-io ARGS``; see :func:`run_tool`."""
    return run_tool("qemu-io", *args, check=check)


def qemu_img_json(*args: str | Path) -> Any:
    """``qemu-img SUBCOMMAND --output=json ARGS...``, parsed."""
    return json.loads(qemu_img(args[0], "--output=json", *args[1:]).stdout)


def io_script(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    """``qemu-io -f FMT -c COMMAND... PATH``; its output."""
    args: list[str | Path] = ["-f", fmt]
    for command in commands:
        args += ["-c", command]
    return qemu_io(*args, path).stdout


def write(path: Path, offset: int, length: int, pattern: int, fmt: str = "qcow2") -> None:
    """``qemu-io -c 'write -P pattern offset length'`` on ``path``."""
    io_script(path, f"write -P {pattern} {offset} {length}", fmt=fmt)


def create(
    path: Path,
    size: int | str | None,
    backing: Path | str | None = None,
    backing_fmt: str | None = "qcow2",
    fmt: str = "qcow2",
    *options: str,
) -> Path:
    """``qemu-img create`` of ``path``: ``size`` (None: the backing file's), backed by
    ``backing`` (written into the header as given) in ``backing_fmt`` (None: not
    recorded), with ``-o`` ``options``; returns ``path``."""
    args: list[str | Path] = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing)]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    for option in options:
        args += ["-o", option]
    args.append(path)
    if size is not None:
        args.append(str(size))
    qemu_img(*args)
    return path


def image_info(path: Path, *, force_share: bool = True) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (``-U`` unless ``force_share`` is off)."""
    info: dict[str, Any] = qemu_img_json("info", *(["-U"] if force_share else []), path)
    return info


def image_map(path: Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
    """``qemu-img map --output=json`` of ``path`` (``-U``)."""
    result: list[dict[str, Any]] = qemu_img_json("map", "-U", "-f", fmt, path)
    return result


def own_data(path: Path) -> list[tuple[int, int]]:
    """The ranges whose data ``path`` itself stores (depth 0 in its map), adjacent ranges
    merged (the map splits where host offsets are not contiguous)."""
    merged: list[tuple[int, int]] = []
    for entry in image_map(path):
        if entry["depth"] != 0 or not entry["data"]:
            continue
        if merged and merged[-1][0] + merged[-1][1] == entry["start"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + entry["length"])
        else:
            merged.append((entry["start"], entry["length"]))
    return merged


def check(path: Path, *, force_share: bool = True) -> None:
    """``qemu-img check`` of ``path`` exits 0: no corruption, no leak, no error."""
    qemu_img("check", *(["-U"] if force_share else []), path)


def check_report(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` of ``path``, with its exit status as ``"exit"``
    (0 to 3 are results: clean, error, corruptions, leaks; others fail the test)."""
    proc = qemu_img("check", "--output=json", path, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    result["exit"] = proc.returncode
    return result


def assert_clean(path: Path, *, leaks_ok: bool = False) -> None:
    """``qemu-img check`` finds no corruption and no error (and no leak unless
    ``leaks_ok``)."""
    result = check_report(path)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    if not leaks_ok:
        assert result.get("leaks", 0) == 0, result


def compare(a: Path, b: Path, *, force_share: bool = True) -> None:
    """``qemu-img compare`` reports the two images' guest views identical."""
    result = qemu_img("compare", *(["-U"] if force_share else []), a, b, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def assert_streamed(top: Path, before: Path, backing: Path | str | None) -> dict[str, Any]:
    """After a stream: ``top``'s guest view is the copy ``before`` (:func:`compare`), it
    checks clean (:func:`check`) and its header names ``backing`` (None: no backing
    file); its ``qemu-img info``."""
    compare(top, before)
    check(top)
    info = image_info(top)
    if backing is None:
        assert "backing-filename" not in info, info
    else:
        assert info["backing-filename"] == str(backing), info
    return info


def convert(src: Path, dst: Path, fmt: str = "raw", *, force_share: bool = True) -> Path:
    """``qemu-img convert -O FMT`` of ``src``'s guest view into ``dst``; returns ``dst``."""
    qemu_img("convert", *(["-U"] if force_share else []), "-O", fmt, src, dst)
    return dst


def snapshot(src: Path, dst: Path) -> Path:
    """A standalone qcow2 copy of the guest view of ``src`` (for comparing after a
    stream)."""
    return convert(src, dst, "qcow2")


def to_raw(path: Path, out: Path) -> bytes:
    """The guest view of ``path`` as QEMU reads it (converted to raw in ``out``)."""
    return convert(path, out, force_share=False).read_bytes()
