"""``blockd demo`` end to end, judged by qemu-img as well as by the demo itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_streams_the_chain(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blockd", "demo", "--dir", str(tmp_path), "--keep"],
        cwd=tmp_path,  # from any directory, not only the checkout
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout and "skipped" not in result.stdout
    assert "demo passed" in result.stdout
    top, mid = tmp_path / "top.qcow2", tmp_path / "mid.qcow2"
    check = subprocess.run(
        ["qemu-img", "check", "--output=json", str(top)], capture_output=True, check=True
    )
    assert json.loads(check.stdout)["check-errors"] == 0
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(top)], capture_output=True, check=True
        ).stdout
    )
    assert "backing-filename" not in info
    # top now holds what the whole chain showed: the same as mid (with its backing base).
    subprocess.run(["qemu-img", "compare", str(top), str(mid)], check=True, timeout=60)
