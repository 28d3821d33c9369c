#!/usr/bin/env python3
"""A block pull driven by polling, the way nova and Proxmox watch block jobs.

No events: the client starts ``block-stream`` with the default ``auto-dismiss: true``
and calls ``query-block-jobs`` every 0.5 s, printing ``offset``/``len``, until the job
is no longer listed (docs/clients.md §3). Between polls it uses the two job
controls these tools use:

1. a throttled stream is cancelled half-way with ``block-job-cancel``: the job vanishes,
   the data copied so far stays in the top image and the backing chain is untouched;
2. a second stream starts throttled, is sped up with ``block-job-set-speed``, and runs to
   the end: the top image no longer has a backing file.

A vanished job looks the same whether it succeeded, failed or was cancelled; that is the
weakness of this style (docs/clients.md §6.1), so the script checks the result afterwards with
``query-named-block-nodes`` and ``qemu-img``.

It uses the synchronous ``qemu.qmp.legacy.QEMUMonitorProtocol``. Run it as-is: it makes a
chain in a temporary directory and starts ``blockd`` (``--daemon qemu-storage-daemon`` for
QEMU's daemon, ``--socket PATH`` for one already running).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from blockd.client.lab import make_chain, running_daemon

POLL = 0.5  # seconds, as nova does


def poll_until_gone(qmp: QEMUMonitorProtocol, job: str, on_poll: Any = None) -> int:
    """Poll ``query-block-jobs`` until ``job`` is gone; return how many polls it took."""
    polls = 0
    while True:
        listed: list[dict[str, Any]] = qmp.cmd("query-block-jobs")  # type: ignore[assignment]
        jobs = {j["device"]: j for j in listed}
        polls += 1
        if job not in jobs:
            print(f"   poll {polls}: {job} is gone")
            return polls
        info = jobs[job]
        print(f"   poll {polls}: {job} {info['status']} {info['offset']}/{info['len']} bytes, "
              f"speed {info['speed']} B/s")  # fmt: skip
        if on_poll is not None:
            on_poll(polls, info)
        time.sleep(POLL)


def backing_of(qmp: QEMUMonitorProtocol, node: str) -> str | None:
    nodes: list[dict[str, Any]] = qmp.cmd("query-named-block-nodes")  # type: ignore[assignment]
    backing = next(n for n in nodes if n["node-name"] == node).get("backing_file")
    return None if backing is None else str(backing)


def run(socket: str, top: Path, size: int) -> int:
    slow = max(size // 8, 65536)  # about 8 s for the whole image: slow enough to watch
    with QEMUMonitorProtocol(socket) as qmp:
        qmp.connect()
        qmp.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "drive-scsi0",
                                   "file": {"driver": "file", "filename": str(top)}})  # fmt: skip
        print(f"added drive-scsi0, backing file {backing_of(qmp, 'drive-scsi0')!r}")

        print("1) stream at", slow, "B/s, then cancel it after two polls")
        qmp.cmd("block-stream", **{"job-id": "stream-drive-scsi0", "device": "drive-scsi0",
                                   "speed": slow})  # fmt: skip

        def cancel_later(polls: int, info: dict[str, Any]) -> None:
            if polls == 2:
                print("   -> block-job-cancel")
                qmp.cmd("block-job-cancel", device="stream-drive-scsi0")

        poll_until_gone(qmp, "stream-drive-scsi0", cancel_later)
        print(f"   backing file after the cancel: {backing_of(qmp, 'drive-scsi0')!r}")

        print("2) stream again, then lift the speed limit after two polls")
        qmp.cmd("block-stream", **{"job-id": "stream-drive-scsi0-2", "device": "drive-scsi0",
                                   "speed": slow})  # fmt: skip

        def speed_up(polls: int, info: dict[str, Any]) -> None:
            if polls == 2:
                print("   -> block-job-set-speed 0 (unlimited)")
                qmp.cmd("block-job-set-speed", device="stream-drive-scsi0-2", speed=0)

        poll_until_gone(qmp, "stream-drive-scsi0-2", speed_up)
        backing = backing_of(qmp, "drive-scsi0")
        print(f"   backing file after the stream: {backing!r}")
        qmp.cmd("blockdev-del", **{"node-name": "drive-scsi0"})
        return 0 if backing is None else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", help="use this running daemon instead of starting one")
    parser.add_argument("--daemon", default="blockd", help="blockd or a qemu-storage-daemon")
    parser.add_argument("--size", default="16M", help="virtual size of the images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="poll-pull-") as tmp:
        work = Path(tmp)
        top = make_chain(work, args.size)[0]
        expected = work / "expected.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(expected)], check=True)
        size = expected.stat().st_size
        if args.socket:
            status = run(args.socket, top, size)
        else:
            with running_daemon(work, args.daemon) as daemon:
                status = run(str(daemon.socket), top, size)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(top)],
                                         check=True, capture_output=True).stdout)  # fmt: skip
        same = subprocess.run(["qemu-img", "compare", str(expected), str(top)], check=False)
        if "backing-filename" in info or same.returncode != 0:
            status = 1
        print("OK" if status == 0 else "FAILED")
        return status


if __name__ == "__main__":
    sys.exit(main())
