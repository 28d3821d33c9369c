#!/usr/bin/env python3
"""Stream a generated qcow2 chain into its top image with blockd and blockctl.

What it does, with the same commands you would type:

1. ``qemu-img``/``qemu-io`` make ``base.qcow2 <- mid.qcow2 <- top.qcow2``, each layer
   holding different data;
2. ``blockd --chardev socket,... --monitor chardev=mon0`` serves QMP on a socket;
3. ``blockctl add`` opens the chain, ``blockctl chain`` shows it as a tree;
4. ``blockctl stream top --job-id demo --speed ...`` copies the data with a live progress
   bar (bytes copied, rate, ETA) and ends with a success line;
5. ``blockctl chain`` shows the shortened chain, and ``qemu-img compare``/``check``
   confirm the guest still sees the same data and the image is clean.

Run it as-is. ``--daemon qemu-storage-daemon`` runs the same demo against QEMU's daemon;
``--keep DIR`` leaves the images and the daemon's log in DIR.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from blockd.client.lab import make_chain, running_daemon


def sh(*argv: str, check: bool = True) -> int:
    """Run a command the way a person would, echoing it first."""
    blockctl = (sys.executable, "-m", "blockd.client.ctl")
    shown = ["blockctl", *argv[3:]] if argv[:3] == blockctl else argv
    print(f"$ {shlex.join(shown)}", flush=True)
    status = subprocess.run(argv, check=False).returncode
    if check and status != 0:
        raise SystemExit(f"command failed with status {status}")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--daemon", default="blockd", help="blockd or a qemu-storage-daemon")
    parser.add_argument("--size", default="64M", help="virtual size of the images")
    parser.add_argument("--speed", default="32M", help="rate limit for the stream")
    parser.add_argument("--keep", type=Path, help="make the images in this directory and keep")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="blockd-demo-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        top, _, _ = make_chain(work, args.size)
        expected = work / "expected.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(expected)], check=True)
        print(f"made {work}/base.qcow2 <- mid.qcow2 <- top.qcow2 ({args.size})")
        with running_daemon(work, args.daemon) as daemon:
            head = ["blockd"] if args.daemon == "blockd" else [args.daemon]
            skip = 3 if args.daemon == "blockd" else 1
            print(f"$ {shlex.join([*head, *daemon.argv[skip:]])} &")
            ctl = [sys.executable, "-m", "blockd.client.ctl", "-s", str(daemon.socket)]
            env_note = os.environ.get("BLOCKD_SOCKET")
            if env_note:
                print(f"(BLOCKD_SOCKET={env_note} is ignored: the demo passes -s)")
            sh(*ctl, "add", "driver=qcow2", "node-name=top", "file.driver=file",
               f"file.filename={top}")  # fmt: skip
            sh(*ctl, "chain")
            status = sh(*ctl, "stream", "top", "--job-id", "demo", "--speed", args.speed,
                        check=False)  # fmt: skip
            sh(*ctl, "chain")
            sh(*ctl, "del", "top")
        same = sh("qemu-img", "compare", str(expected), str(top), check=False)
        clean = sh("qemu-img", "check", "-q", str(top), check=False)
        info = subprocess.run(["qemu-img", "info", str(top)], capture_output=True, text=True)
        flattened = "backing file:" not in info.stdout
        print(f"top.qcow2 has {'no' if flattened else 'still a'} backing file")
        ok = status == 0 and same == 0 and clean == 0 and flattened
        print("demo OK" if ok else "demo FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
