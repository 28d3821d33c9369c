"""Integers on the command line, side by side with qemu-storage-daemon 10.0
(docs/qemu-behaviour/command-line.md §1).

A keyval value for an ``int`` member is read as ``strtoll`` reads it, base 0, within
int64: ``010`` is 8, a size suffix (``64k``) or a fraction is refused. Each case ends with
a ``--blockdev`` that fails on purpose, so both daemons exit with one line on stderr: the
error of the value under test, or, when the value was taken, that of the last option.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kit.qemu import QEMU10_LIB, QSD10

pytestmark = pytest.mark.skipif(not QSD10.exists(), reason="QEMU 10 qemu-storage-daemon missing")

VALUES = [
    "0x10", "0X1f", "-0x10", "010", "02000000", " 5", "+5", "0", "-0", "-1",
    "1k", "64k", "1M", "1.5", "1e3", "08", "0x", "5 ", "", "0b1",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808",
    "-9223372036854775809", "18446744073709551615",
]  # fmt: skip
LAST = ["--blockdev", "driver=nope,node-name=z"]


def stderr_of(program: list[str], argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [*program, *argv], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 1, result
    prefix, _, message = result.stderr.partition(": ")
    assert prefix.endswith(("blockd", "qemu-storage-daemon")), result.stderr
    return message


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "r.img"
    path.write_bytes(b"\0" * (1 << 20))
    return path


@pytest.mark.parametrize("value", VALUES)
def test_keyval_integers_as_qemu(image: Path, value: str) -> None:
    argv = [
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", f"driver=raw,node-name=r,file=f,offset={value}",
        *LAST,
    ]  # fmt: skip
    qemu_env = {**os.environ, "LD_LIBRARY_PATH": str(QEMU10_LIB)}
    expected = stderr_of([str(QSD10)], argv, qemu_env)
    assert stderr_of([sys.executable, "-m", "blockd"], argv, dict(os.environ)) == expected


@pytest.mark.parametrize("number", ["9223372036854775808", "1.0", "-0.0", "1e999"])
def test_json_integers_as_qemu(image: Path, number: str) -> None:
    option = f'{{"driver": "raw", "node-name": "r", "file": "f", "offset": {number}}}'
    argv = ["--blockdev", f"driver=file,node-name=f,filename={image}", "--blockdev", option]
    qemu_env = {**os.environ, "LD_LIBRARY_PATH": str(QEMU10_LIB)}
    expected = stderr_of([str(QSD10)], [*argv, *LAST], qemu_env)
    assert expected.endswith("Invalid parameter type for 'offset', expected: integer\n")
    assert stderr_of([sys.executable, "-m", "blockd"], [*argv, *LAST], dict(os.environ)) == (
        expected
    )
