#!/usr/bin/env python3
"""A block pull exactly as libvirt drives it, written with qemu.qmp's QMPClient.

This is what ``virsh blockpull vda --base <mid's backing>`` sends in -blockdev mode (see
docs/clients.md §2), step by step:

1. probe the QMP schema for ``block-stream/arg-type/backing-mask-protocol`` and
   ``block-commit/arg-type/backing-mask-protocol`` (libvirt turns the flag on only if both
   exist), then ``query-version`` (libvirt refuses anything older than 6.2.0);
2. ``blockdev-add`` a three-image chain with explicit node names, storage and format
   nodes separately, as libvirt names them (``libvirt-N-storage``/``libvirt-N-format``);
3. ``block-stream`` with ``job-id``, ``device``, ``base-node``, ``backing-file``,
   ``auto-finalize: true``, ``auto-dismiss: false`` (+ ``backing-mask-protocol``);
4. wait for ``JOB_STATUS_CHANGE`` to say ``concluded``, read success or the error from
   ``query-jobs``, then ``job-dismiss``;
5. ``query-named-block-nodes`` and ``blockdev-del`` of the image that left the chain;
6. check the result with ``qemu-img``: same guest-visible data, new backing file.

Run it as-is: it makes the images in a temporary directory and starts ``blockd`` itself.
``--daemon qemu-storage-daemon`` runs the same sequence against QEMU's daemon instead, and
``--socket PATH`` uses a daemon that is already running (it must see the same files).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from blockd.client.lab import make_chain, running_daemon


def schema_has(schema: list[dict[str, Any]], path: str) -> bool:
    """Walk a libvirt-style schema query such as ``block-stream/arg-type/*base-node``.

    Segments: an entity name, then ``arg-type``/``ret-type``, then member names; a leading
    ``*`` also requires the member to be optional. (libvirt's full syntax has more.)
    """
    by_name = {entry["name"]: entry for entry in schema}
    first, *rest = path.split("/")
    entry = by_name.get(first)
    for segment in rest:
        if entry is None:
            return False
        if segment in ("arg-type", "ret-type"):
            entry = by_name.get(entry.get(segment, ""))
            continue
        optional = segment.startswith("*")
        name = segment.lstrip("*")
        if entry.get("meta-type") == "array":
            entry = by_name.get(entry["element-type"])
        member = next((m for m in (entry or {}).get("members", []) if m["name"] == name), None)
        if member is None or (optional and "default" not in member):
            return False
        entry = by_name.get(member["type"])
    return True


def log(direction: str, text: Any) -> None:
    print(f"{direction} {text if isinstance(text, str) else json.dumps(text)}", flush=True)


async def execute(qmp: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    log("->", {"execute": command, **({"arguments": arguments} if arguments else {})})
    result = await qmp.execute(command, arguments)
    shown = json.dumps({"return": result})
    log("<-", shown if len(shown) < 400 else f"{shown[:200]} ... ({len(shown)} bytes)")
    return result


def chain_nodes(paths: list[Path]) -> list[dict[str, Any]]:
    """blockdev-add arguments for ``paths`` (top first), base first as libvirt adds them."""
    args: list[dict[str, Any]] = []
    below: str | None = None
    for n, path in enumerate(reversed(paths), start=1):
        read_only = n < len(paths)  # only the top image is writable
        storage, fmt = f"libvirt-{n}-storage", f"libvirt-{n}-format"
        args.append({"driver": "file", "filename": str(path), "node-name": storage,
                     "auto-read-only": True, "discard": "unmap"})  # fmt: skip
        args.append({"node-name": fmt, "read-only": read_only, "driver": "qcow2",
                     "file": storage, "backing": below})  # fmt: skip
        below = fmt
    return args


async def pull(socket: str, paths: list[Path], speed: int) -> int:
    base = paths[-1]
    qmp = QMPClient("libvirt-pull")
    await qmp.connect(socket)
    try:
        schema = await execute(qmp, "query-qmp-schema")
        mask = all(
            schema_has(schema, f"{cmd}/arg-type/backing-mask-protocol")
            for cmd in ("block-stream", "block-commit")
        )
        print(f"   blockjob.backing-mask-protocol capability: {mask}")
        version = (await execute(qmp, "query-version"))["qemu"]
        if (version["major"], version["minor"]) < (6, 2):
            print("libvirt needs QEMU 6.2.0 or newer", file=sys.stderr)
            return 1

        for node in chain_nodes(paths):
            await execute(qmp, "blockdev-add", node)

        job = "pull-vda-libvirt-3-format"
        arguments: dict[str, Any] = {
            "device": "libvirt-3-format",
            "job-id": job,
            "base-node": "libvirt-1-format",
            "backing-file": base.name,  # relative, as with --keep-relative
            "auto-finalize": True,
            "auto-dismiss": False,
        }
        if speed:
            arguments["speed"] = speed
        if mask:
            arguments["backing-mask-protocol"] = True
        with qmp.listener("JOB_STATUS_CHANGE") as listener:
            await execute(qmp, "block-stream", arguments)
            async for event in listener:
                data: dict[str, Any] = event["data"]  # type: ignore[assignment]
                log("<-", {"event": event["event"], "data": data})
                if data["id"] == job and data["status"] == "concluded":
                    break
        jobs = await execute(qmp, "query-jobs")
        info = next(j for j in jobs if j["id"] == job)
        await execute(qmp, "job-dismiss", {"id": job})
        if "error" in info:
            print(f"block pull failed: {info['error']}", file=sys.stderr)
            return 1

        # Completion: look at the graph, then drop the image that left the chain.
        nodes = await execute(qmp, "query-named-block-nodes")
        names = {n["node-name"] for n in nodes}
        print(f"   nodes after the pull: {sorted(names)}")
        await execute(qmp, "blockdev-del", {"node-name": "libvirt-2-format"})
        await execute(qmp, "blockdev-del", {"node-name": "libvirt-2-storage"})
        for n in (3, 1):  # the guest shuts down: detach the rest, top first
            await execute(qmp, "blockdev-del", {"node-name": f"libvirt-{n}-format"})
            await execute(qmp, "blockdev-del", {"node-name": f"libvirt-{n}-storage"})
    except ExecuteError as exc:
        print(f"{exc.error_class}: {exc}", file=sys.stderr)
        return 1
    finally:
        await qmp.disconnect()
    return 0


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", help="use this running daemon instead of starting one")
    parser.add_argument("--daemon", default="blockd", help="blockd or a qemu-storage-daemon")
    parser.add_argument("--dir", type=Path, help="where to make the images (default: a temp dir)")
    parser.add_argument("--size", default="16M", help="virtual size of the images")
    parser.add_argument("--speed", type=int, default=0, help="rate limit in bytes/s")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="libvirt-pull-") as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = make_chain(work, args.size)
        expected = work / "expected.raw"
        qemu_img("convert", "-O", "raw", str(paths[0]), str(expected))
        if args.socket:
            status = asyncio.run(pull(args.socket, paths, args.speed))
        else:
            with running_daemon(work, args.daemon) as daemon:
                status = asyncio.run(pull(str(daemon.socket), paths, args.speed))
        if status == 0:
            info = json.loads(qemu_img("info", "--output=json", "-U", str(paths[0])))
            same = subprocess.run(["qemu-img", "compare", "-U", str(expected), str(paths[0])],
                                  capture_output=True, text=True)  # fmt: skip
            print(f"   top's backing file is now {info.get('backing-filename')!r}; "
                  f"qemu-img compare: {same.stdout.strip() or same.stderr.strip()}")  # fmt: skip
            if info.get("backing-filename") != paths[2].name or same.returncode != 0:
                status = 1
        print("OK" if status == 0 else "FAILED")
        return status


if __name__ == "__main__":
    sys.exit(main())
