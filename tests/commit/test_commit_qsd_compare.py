"""block-commit side by side with qemu-storage-daemon 10.0 on identical chains.

Each scenario runs once under QEMU and once under blockd, each on its own fresh copy of
the chain, through qemu.qmp's client: the replies (refusals included), the events with
their data in order, ``query-named-block-nodes`` and the resulting image headers must be
the same. Generated node names are replaced by their order of appearance, paths by
``<dir>``, and ``json:`` filenames compared as flattened option sets. Steps whose answer
depends on how far a job got are avoided, or made certain first (``"POLL"`` waits until
the job has copied something).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from kit.chains import blockdev_args, qcow2
from kit.cli import BLOCKD
from kit.compare import flatten_json_names
from kit.daemons import daemon, monitor_args
from kit.qemu import KIB, MIB, QSD_10, check, create, image_info, qemu_img, write
from kit.qmp import legacy_client, legacy_quit

pytestmark = pytest.mark.skipif(QSD_10 is None, reason="QEMU 10.0 qemu-storage-daemon missing")
TIMEOUT = 30

Step = Any  # ["command", {arguments}] | ["UNTIL", event-or-status] | "POLL"


def make_chain(d: Path) -> None:
    """base.qcow2 (1 MiB of data) <- mid.qcow2 (1 MiB at 512K) <- top.qcow2 (64K at 2M)."""
    d.mkdir()
    create(d / "base.qcow2", 4 * MIB)
    write(d / "base.qcow2", 0, MIB, 1)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2")
    write(d / "mid.qcow2", 512 * KIB, MIB, 2)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    write(d / "top.qcow2", 2 * MIB, 64 * KIB, 3)


def blockdevs(d: Path) -> list[dict[str, Any]]:
    return [
        qcow2(d / "base.qcow2", "base", **{"read-only": True}),
        qcow2(d / "mid.qcow2", "mid", backing="base", **{"read-only": True}),
        qcow2(d / "top.qcow2", "top", backing="mid"),
    ]


def run(cmd: list[str], d: Path, sock_dir: Path, steps: list[Step]) -> list[Any]:
    """Start the daemon ``cmd`` on a fresh chain in ``d``, run ``steps``; what it said."""
    make_chain(d)
    sock = sock_dir / f"{d.name}.sock"
    seen: list[Any] = []
    argv = [*cmd, *blockdev_args(blockdevs(d)), *monitor_args(sock)]
    with daemon(argv, ready=sock) as proc, legacy_client(sock) as qmp:
        deadline = time.monotonic() + TIMEOUT
        mark = 0
        for step in steps:
            if step == "POLL":
                while not qmp.cmd_raw("query-block-jobs")["return"][0]["offset"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                continue
            name, arguments = step
            if name == "UNTIL":
                while not any(
                    entry[0] == "EV" and arguments in (entry[1], entry[2].get("status"))
                    for entry in seen[mark:]
                ):
                    event = qmp.pull_event(wait=TIMEOUT)
                    assert event is not None
                    seen.append(["EV", event["event"], event.get("data", {})])
                mark = len(seen)
                continue
            reply = qmp.cmd_raw(name, arguments)
            mark = len(seen)
            seen.extend(["EV", e["event"], e.get("data", {})] for e in qmp.get_events())
            qmp.clear_events()
            seen.append([name, reply])
        legacy_quit(qmp)
        assert proc.wait(timeout=TIMEOUT) == 0
    for name in ("base", "mid", "top"):
        check(d / f"{name}.qcow2")
        header = image_info(d / f"{name}.qcow2")
        seen.append([name, header.get("backing-filename"), header.get("backing-filename-format")])
    return seen


def normalize(seen: list[Any], d: Path) -> Any:
    """Paths as ``<dir>``, generated names in order of appearance, ``json:`` names as
    flattened sets; the ``children`` member (QEMU 10.1) and ``actual-size`` dropped."""
    text = json.dumps(seen).replace(str(d), "<dir>")
    names: dict[str, str] = {}
    text = re.sub(r"#block\d+", lambda m: names.setdefault(m.group(0), f"#{len(names)}"), text)

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items() if k not in ("children", "actual-size")}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return fix(flatten_json_names(json.loads(text)))


def replies_last(seen: list[Any], loose: tuple[str, ...]) -> list[Any]:
    """The replies of the ``loose`` commands moved behind the events that surround them
    (where QEMU and blockd interleave them differently: README, Differences)."""
    out = list(seen)
    i = 0
    while i < len(out):
        if out[i][0] in loose:
            j = i
            while j + 1 < len(out) and out[j + 1][0] == "EV":
                out[j], out[j + 1] = out[j + 1], out[j]
                j += 1
            i = j
        i += 1
    return out


def same_as_qemu(
    tmp_path: Path, sock_dir: Path, steps: list[Step], loose: tuple[str, ...] = ()
) -> None:
    assert QSD_10 is not None
    qemu = normalize(run([QSD_10], tmp_path / "qemu", sock_dir, steps), tmp_path / "qemu")
    ours = normalize(run(BLOCKD, tmp_path / "blockd", sock_dir, steps), tmp_path / "blockd")
    qemu, ours = replies_last(qemu, loose), replies_last(ours, loose)
    for i, (a, b) in enumerate(zip(ours, qemu, strict=False)):
        assert a == b, f"step {i}"
    assert len(ours) == len(qemu)


NODES = ["query-named-block-nodes", {"flat": True}]


def test_refusals(tmp_path: Path, sock_dir: Path) -> None:
    """Every check of qmp_block_commit and commit_start, in QEMU's order."""
    steps: list[Step] = [
        ["block-commit", {"device": "nope", "job-id": "j"}],
        ["block-commit", {"device": "mid", "job-id": "j"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "mid", "top": "x"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "nope"}],
        ["block-commit", {"device": "top", "job-id": "j", "top": "nope"}],
        ["block-commit", {"device": "top", "job-id": "j", "base-node": "base", "base": "x"}],
        ["block-commit", {"device": "top", "job-id": "j", "base-node": "nope"}],
        ["block-commit", {"device": "top", "job-id": "j", "base": "nope"}],
        ["block-commit", {"device": "top", "job-id": "j", "base": "base.qcow2"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "base"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "mid", "base-node": "mid"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "base", "base-node": "mid"}],
        ["block-commit", {"device": "top", "job-id": "j", "backing-file": "x"}],
        ["block-commit", {"device": "top", "job-id": "1j", "top-node": "mid"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "mid", "speed": -1}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "mid",
                          "filter-node-name": "top"}],
        ["block-commit", {"device": "top", "job-id": "j", "top-node": "mid",
                          "speed": 1}],
        ["block-commit", {"device": "top", "job-id": "k", "top-node": "mid"}],
        ["block-stream", {"device": "top", "job-id": "s"}],
        ["blockdev-del", {"node-name": "mid"}],
        ["blockdev-del", {"node-name": "base"}],
        ["blockdev-del", {"node-name": "top"}],
        ["job-complete", {"id": "j"}],
        NODES,
        ["block-job-set-speed", {"device": "j", "speed": 0}],
        ["UNTIL", "null"],
        NODES,
    ]  # fmt: skip
    same_as_qemu(tmp_path, sock_dir, steps, loose=("block-job-set-speed",))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"backing-file": "base.qcow2", "backing-mask-protocol": True},
        {"auto-finalize": False, "auto-dismiss": False, "base-node": "base"},
    ],
    ids=["plain", "backing-file", "manual-finalize"],
)
def test_non_active(tmp_path: Path, sock_dir: Path, extra: dict[str, Any]) -> None:
    steps: list[Step] = [["block-commit", {"device": "top", "job-id": "j", "top-node": "mid",
                                            "filter-node-name": "cf", **extra}]]  # fmt: skip
    if extra.get("auto-finalize") is False:
        steps += [
            ["UNTIL", "BLOCK_JOB_PENDING"],
            NODES,
            ["job-finalize", {"id": "j"}],
            ["UNTIL", "concluded"],
            ["query-jobs", {}],
            ["job-dismiss", {"id": "j"}],
        ]
    steps += [["UNTIL", "null"], NODES]
    # a fast job may send its first events before the command's reply, in both daemons
    same_as_qemu(tmp_path, sock_dir, steps, loose=("block-commit",))


def test_active_pivot(tmp_path: Path, sock_dir: Path) -> None:
    """virsh blockcommit --active --pivot: ready, job-complete, the images removed."""
    steps: list[Step] = [
        ["block-commit", {"device": "top", "job-id": "j", "auto-dismiss": False}],
        ["UNTIL", "BLOCK_JOB_READY"],
        ["query-block-jobs", {}],
        ["query-jobs", {}],
        ["block-stream", {"device": "top", "job-id": "s"}],
        ["blockdev-del", {"node-name": "base"}],
        NODES,
        ["job-complete", {"id": "j"}],
        ["UNTIL", "concluded"],
        ["query-jobs", {}],
        ["job-dismiss", {"id": "j"}],
        NODES,
        ["blockdev-del", {"node-name": "top"}],
        ["blockdev-del", {"node-name": "mid"}],
        NODES,
    ]
    # the job may leave its loop before or after job-complete's reply, in QEMU too
    same_as_qemu(tmp_path, sock_dir, steps, loose=("job-complete",))


def test_active_soft_cancel_from_standby(tmp_path: Path, sock_dir: Path) -> None:
    steps: list[Step] = [
        ["block-commit", {"device": "top", "job-id": "j", "filter-node-name": "mf"}],
        ["UNTIL", "BLOCK_JOB_READY"],
        ["block-job-pause", {"device": "j"}],
        ["query-block-jobs", {}],
        ["block-job-cancel", {"device": "j"}],
        ["block-job-resume", {"device": "j"}],
        ["block-job-cancel", {"device": "j"}],
        ["UNTIL", "null"],
        NODES,
    ]
    # the soft cancel's first events come before or after its reply in QEMU (timing)
    same_as_qemu(tmp_path, sock_dir, steps, loose=("block-job-cancel",))


def test_active_not_ready(tmp_path: Path, sock_dir: Path) -> None:
    """Refusals before ready, then a forced cancel once the first copy is done."""
    # fmt: off
    steps: list[Step] = [
        ["block-commit", {"device": "top", "job-id": "j", "speed": 4096,
                          "auto-finalize": False, "auto-dismiss": False}],
        ["job-complete", {"id": "j"}],
        ["block-job-complete", {"device": "j"}],
        "POLL",
        ["query-block-jobs", {}],
        ["block-job-set-speed", {"device": "j", "speed": 4096}],
        NODES,
        ["job-cancel", {"id": "j"}],
        ["UNTIL", "concluded"],
        ["query-jobs", {}],
        ["job-dismiss", {"id": "j"}],
        NODES,
    ]
    # fmt: on
    same_as_qemu(tmp_path, sock_dir, steps, loose=("job-cancel",))


def test_overlapping_jobs(tmp_path: Path, sock_dir: Path) -> None:
    """Stream and commit refuse each other with QEMU's texts, both ways."""
    # fmt: off
    steps: list[Step] = [
        ["block-stream", {"device": "top", "job-id": "s", "speed": 1, "filter-node-name": "sf",
                          "base-node": "base"}],
        ["block-commit", {"device": "top", "job-id": "c"}],
        ["block-commit", {"device": "sf", "job-id": "c"}],
        ["block-commit", {"device": "sf", "job-id": "c", "top-node": "mid"}],
        ["block-job-cancel", {"device": "s"}],
        ["UNTIL", "null"],
        ["block-commit", {"device": "top", "job-id": "c", "top-node": "mid", "speed": 1}],
        ["block-stream", {"device": "top", "job-id": "s"}],
        ["block-stream", {"device": "mid", "job-id": "s"}],
        ["block-stream", {"device": "base", "job-id": "s"}],
        ["block-commit", {"device": "top", "job-id": "c2"}],
        ["block-commit", {"device": "top", "job-id": "c"}],
        ["job-cancel", {"id": "c"}],
        ["UNTIL", "null"],
        ["block-commit", {"device": "top", "job-id": "c", "speed": 1}],
        ["block-commit", {"device": "top", "job-id": "c2", "top-node": "mid"}],
        ["block-stream", {"device": "top", "job-id": "s"}],
        ["job-cancel", {"id": "c"}],
        ["UNTIL", "null"],
    ]
    # fmt: on
    same_as_qemu(tmp_path, sock_dir, steps, loose=("job-cancel", "block-job-cancel"))
