"""block-stream side by side with a real qemu-storage-daemon on identical chains.

Runs only when a qemu-storage-daemon binary is present (QEMU 10.0 under /work/qsd10, or
one on ``PATH``). Each scenario runs once under QEMU and once under blockd, each on its
own fresh copy of the chain, through qemu.qmp's client; the event sequences (with their
data), the refusals' texts, ``query-named-block-nodes`` and the resulting image header
must be the same (paths normalised).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from kit.chains import Layer, blkdebug_030, blockdev_args, build, file_ref, qcow2
from kit.cli import BLOCKD
from kit.compare import flatten_json_names
from kit.daemons import daemon, monitor_args
from kit.qemu import QSD_10, image_info
from kit.qmp import legacy_client, legacy_quit

pytestmark = pytest.mark.skipif(QSD_10 is None, reason="QEMU 10.0 qemu-storage-daemon missing")
TIMEOUT = 30


def make_chain(d: Path) -> None:
    """base.raw (2 MiB of data) <- mid.qcow2 (64 KiB at 64K) <- top.qcow2."""
    build(
        d,
        Layer("base.raw", "2M", ["write -P 1 0 2M"]),
        Layer("mid.qcow2", writes=["write -P 2 64k 64k"]),
        Layer("top.qcow2"),
    )


def blockdevs(d: Path, errno_: int | None) -> list[dict[str, Any]]:
    base: dict[str, Any] = file_ref(d / "base.raw", **{"node-name": "base"})
    if errno_ is not None:  # iotest 030's rules: fail the read covering 512 KiB, once
        dbg = {"driver": "blkdebug", "image": file_ref(d / "base.raw"), **blkdebug_030(errno_)}
        base = {"driver": "raw", "node-name": "base", "file": dbg}
    return [
        base,
        qcow2(d / "mid.qcow2", "mid", backing="base"),
        qcow2(d / "top.qcow2", "top", backing="mid"),
    ]


def scenario(cmd: list[str], d: Path, sock_dir: Path, stream: dict[str, Any],
             errno_: int | None, during: Sequence[tuple[str, dict[str, Any]]] = ()
             ) -> dict[str, Any]:  # fmt: skip
    """Run one stream under the daemon ``cmd`` (``during``: commands sent right after
    it started); what a client and qemu-img then see."""
    d.mkdir()
    make_chain(d)
    sock = sock_dir / f"{d.name}.sock"
    argv = [*cmd, *blockdev_args(blockdevs(d, errno_)), *monitor_args(sock, "m0")]
    seen: list[Any] = []
    with daemon(argv, ready=sock) as proc:
        with legacy_client(sock) as qmp:
            refusals = [
                qmp.cmd_raw("block-stream", {"device": "top", "job-id": "x", "base-node": "top"}),
                qmp.cmd_raw("block-stream", {"device": "mid", "job-id": "x", "bottom": "top"}),
                qmp.cmd_raw("block-stream", {"device": "top", "job-id": "x", "base": "nope"}),
                qmp.cmd_raw("block-stream", {"device": "top", "job-id": "x", "backing-file": "y"}),
            ]
            seen.append(qmp.cmd_raw("block-stream", {"device": "top", "job-id": "j", **stream}))
            for name, arguments in during:
                # (only commands whose answers do not depend on how far the job got)
                seen.append([name, qmp.cmd_raw(name, arguments)])
            while True:
                event = qmp.pull_event(wait=TIMEOUT)
                assert event is not None
                data = event.get("data", {})
                seen.append([event["event"], data])
                if data.get("status") == "paused":
                    [job] = qmp.cmd_raw("query-block-jobs")["return"]
                    seen.append({k: job[k] for k in ("offset", "len", "io-status", "paused")})
                    qmp.cmd_raw("block-job-resume", {"device": "j"})
                if event["event"] == "BLOCK_JOB_PENDING":
                    seen.append(["job-finalize", qmp.cmd_raw("job-finalize", {"id": "j"})])
                if data.get("status") == "concluded" and stream.get("auto-dismiss") is False:
                    seen.append(["query-jobs", qmp.cmd_raw("query-jobs")])
                    seen.append(["job-dismiss", qmp.cmd_raw("job-dismiss", {"id": "j"})])
                if data.get("status") == "null":
                    break
            nodes = qmp.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
            top = next(n for n in nodes if n["node-name"] == "top")
            seen.append({"backing_file": top.get("backing_file")})
            legacy_quit(qmp)
        assert proc.wait(timeout=TIMEOUT) == 0
    info = image_info(d / "top.qcow2", force_share=False)
    header = (info.get("backing-filename"), info.get("backing-filename-format"))
    text = json.dumps({"refusals": refusals, "seen": seen, "header": header})
    return dict(json.loads(text.replace(str(d), "<dir>")))


@pytest.mark.parametrize(
    ("stream", "errno_"),
    [
        ({"base-node": "base", "backing-mask-protocol": True}, None),
        ({"base-node": "base", "backing-mask-protocol": False}, None),
        ({"on-error": "report"}, 5),
        ({"on-error": "enospc"}, 28),
    ],
    ids=["mask-protocol", "no-mask", "eio-report", "enospc-stop"],
)
def test_same_as_qemu(
    tmp_path: Path, sock_dir: Path, stream: dict[str, Any], errno_: int | None
) -> None:
    assert QSD_10 is not None
    qemu = scenario([QSD_10], tmp_path / "qemu", sock_dir, stream, errno_)
    ours = scenario(BLOCKD, tmp_path / "blockd", sock_dir, stream, errno_)
    for key in ("refusals", "header"):
        assert ours[key] == qemu[key], key
    # Events (all but timestamps, in order) and the final query; json: filenames are
    # compared as flattened option sets (QEMU writes dotted keys in hash order).
    assert flatten_json_names(ours["seen"]) == flatten_json_names(qemu["seen"])


BUSY_CHECKS = [
    ("block-stream", {"device": "mid", "job-id": "x"}),
    ("block-stream", {"device": "top", "job-id": "y", "base-node": "mid"}),
    ("block-stream", {"device": "sf", "job-id": "z"}),
    ("blockdev-del", {"node-name": "mid"}),
    ("blockdev-del", {"node-name": "base"}),
    ("block-stream", {"device": "top", "job-id": "j"}),
    ("block-job-set-speed", {"device": "j", "speed": -1}),
    ("block-job-set-speed", {"device": "j", "speed": 0}),
]


def test_busy_nodes_same_as_qemu(tmp_path: Path, sock_dir: Path) -> None:
    """A throttled stream holds its nodes: the same refusals as QEMU, then it finishes."""
    assert QSD_10 is not None
    stream = {"base-node": "base", "filter-node-name": "sf", "speed": 1024}
    qemu = scenario([QSD_10], tmp_path / "qemu", sock_dir, stream, None, BUSY_CHECKS)
    ours = scenario(BLOCKD, tmp_path / "blockd", sock_dir, stream, None, BUSY_CHECKS)
    assert flatten_json_names(ours) == flatten_json_names(qemu)


def test_manual_finalize_same_as_qemu(tmp_path: Path, sock_dir: Path) -> None:
    assert QSD_10 is not None
    stream = {"auto-finalize": False, "auto-dismiss": False, "speed": 1024}
    during = [("block-job-set-speed", {"device": "j", "speed": 0})]
    qemu = scenario([QSD_10], tmp_path / "qemu", sock_dir, stream, None, during)
    ours = scenario(BLOCKD, tmp_path / "blockd", sock_dir, stream, None, during)
    assert flatten_json_names(ours) == flatten_json_names(qemu)
