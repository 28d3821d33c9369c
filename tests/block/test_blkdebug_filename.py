"""The ``json:`` filenames of blkdebug nodes and of the nodes above them, as QEMU 10.0's
qemu-storage-daemon writes them: rule lists as flattened dotted keys
(``inject-error.0.event``), and a format node over a blkdebug node with options named
by its own options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kit.chains import file_ref
from kit.compare import compare_with_qsd
from kit.qemu import QSD_10, qemu_img

pytestmark = pytest.mark.skipif(QSD_10 is None, reason="QEMU 10.0 qemu-storage-daemon missing")


async def test_rule_lists_flattened_as_qsd(sock_dir: Path, tmp_path: Path) -> None:
    for name in ("a.qcow2", "b.qcow2", "c.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / name, "1M")
    config = tmp_path / "empty.conf"
    config.write_text("")
    rules_a = {
        "inject-error": [
            {"event": "read_aio", "errno": 5, "sector": 8, "once": True, "iotype": "read"},
            {"event": "l2_load", "state": 2},
        ],
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
    }
    rules_b = {
        "config": str(config),
        "align": 512,
        "set-state": [
            {"event": "l2_load", "new_state": 3},
            {"event": "read_aio", "state": 3, "new_state": 1},
        ],
        "inject-error": [
            {"event": "write_aio", "errno": 28, "immediately": True},
            {"event": "l2_load", "state": 2, "iotype": "write", "sector": 128, "once": False},
            {"event": "cow_write", "errno": 5},
        ],
    }
    commands: list[tuple[str, dict[str, Any]]] = [
        (
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": name,
                "file": {
                    "driver": "blkdebug",
                    **rules,
                    "image": file_ref(tmp_path / f"{name}.qcow2"),
                },
            },
        )
        for name, rules in (("a", rules_a), ("b", rules_b))
    ]
    commands.append(
        (
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "c",
                "file": {
                    "driver": "blkdebug",
                    "align": 4096,
                    "image": file_ref(tmp_path / "c.qcow2"),
                },
            },
        )
    )
    commands.append(("query-named-block-nodes", {"flat": True}))
    commands.append(("query-named-block-nodes", {}))
    await compare_with_qsd(sock_dir, commands)
