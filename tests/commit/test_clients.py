"""block-commit as libvirt and Proxmox drive it, over the socket of a real daemon
(docs/qemu-behaviour/block-commit.md §5).

The chain is set up the way libvirt sets up a disk: a storage node and a format node per
image, named ``libvirt-N-storage``/``libvirt-N-format``. Each sequence runs unchanged,
the commands libvirt ignores the result of (its dirty-bitmap ``transaction``) fail
cleanly, and the images end up as the client expects.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kit.chains import file_ref
from kit.daemons import start_blockd, stop
from kit.qemu import KIB, MIB, check, compare, create, image_info, snapshot, write
from kit.qmp import legacy_client, legacy_events_until, legacy_quit
from kit.schema import probe

from blockd.qmp.schema import Schema


def test_libvirt_turns_on_backing_mask_protocol() -> None:
    """libvirt sets its capability only when both commands have the member
    (``virQEMUCapsProbeQMPSchemaCapabilities``)."""
    info = Schema.load().introspect()
    assert probe(info, "block-commit/arg-type/backing-mask-protocol")
    assert probe(info, "block-stream/arg-type/backing-mask-protocol")
    for member in ("*top-node", "*base-node", "*backing-file", "*job-id", "*filter-node-name"):
        assert probe(info, f"block-commit/arg-type/{member}"), member
    assert probe(info, "block-commit/arg-type/on-error/^stop")
    assert probe(info, "BLOCK_JOB_READY/arg-type/len")


def libvirt_chain(tmp: Path) -> list[Path]:
    """base.qcow2 <- mid.qcow2 <- top.qcow2, each with data of its own."""
    base = create(tmp / "base.qcow2", 4 * MIB)
    write(base, 0, 2 * MIB, 0x11)
    mid = create(tmp / "mid.qcow2", None, base)
    write(mid, MIB, MIB, 0x22)
    top = create(tmp / "top.qcow2", None, mid)
    write(top, 3 * MIB, 64 * KIB, 0x33)
    return [base, mid, top]


def add_libvirt_disk(qmp: Any, images: list[Path]) -> None:
    """blockdev-add as libvirt does: storage then format, bottom first, ``backing``
    named explicitly (null for the bottom)."""
    backing: str | None = None
    for number, path in enumerate(images, start=1):
        storage, fmt = f"libvirt-{number}-storage", f"libvirt-{number}-format"
        options = file_ref(path, **{"node-name": storage, "auto-read-only": True})
        assert qmp.cmd_raw("blockdev-add", {**options, "discard": "unmap"}) == {"return": {}}
        read_only = number < len(images)
        fmt_options = {"node-name": fmt, "read-only": read_only, "driver": "qcow2"}
        fmt_options.update({"file": storage, "backing": backing})
        assert qmp.cmd_raw("blockdev-add", fmt_options) == {"return": {}}
        backing = fmt


@contextlib.contextmanager
def libvirt_disk(sock_dir: Path, images: list[Path]) -> Iterator[Any]:
    """A blockd process with ``images`` added as libvirt adds a disk; a client for the
    ``with`` block; then ``quit``, and the daemon must exit 0."""
    daemon = start_blockd(sock_dir)
    try:
        with legacy_client(daemon.sock) as qmp:
            add_libvirt_disk(qmp, images)
            yield qmp
            legacy_quit(qmp)
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        stop(daemon.proc)


def ok(reply: dict[str, Any]) -> Any:
    assert "return" in reply, reply
    return reply["return"]


def wait_status(qmp: Any, status: str) -> None:
    legacy_events_until(qmp, "JOB_STATUS_CHANGE", status)


def test_virsh_blockcommit_active_pivot(tmp_path: Path, sock_dir: Path) -> None:
    images = libvirt_chain(tmp_path)
    expected = snapshot(images[-1], tmp_path / "expected.qcow2")
    with libvirt_disk(sock_dir, images) as qmp:
        job = "commit-vda-libvirt-3-format"
        ok(qmp.cmd_raw("block-commit", {
            "device": "libvirt-3-format", "job-id": job, "top-node": "libvirt-3-format",
            "base-node": "libvirt-1-format", "auto-finalize": True, "auto-dismiss": False,
            "backing-mask-protocol": True,
        }))  # fmt: skip
        wait_status(qmp, "ready")
        [info] = ok(qmp.cmd_raw("query-block-jobs"))
        assert (info["type"], info["ready"], info["len"]) == ("commit", True, info["offset"])
        bitmap = {"type": "block-dirty-bitmap-add", "data": {
            "node": "libvirt-1-format", "name": "libvirt-tmp-activewrite",
            "persistent": False, "disabled": False}}  # fmt: skip
        refused = qmp.cmd_raw("transaction", {"actions": [bitmap]})
        assert refused["error"]["class"] == "CommandNotFound"  # libvirt ignores it
        ok(qmp.cmd_raw("job-complete", {"id": job}))
        wait_status(qmp, "concluded")
        [done] = ok(qmp.cmd_raw("query-jobs"))
        assert "error" not in done
        ok(qmp.cmd_raw("job-dismiss", {"id": job}))
        nodes = {n["node-name"]: n for n in ok(qmp.cmd_raw("query-named-block-nodes"))}
        assert nodes["libvirt-1-format"]["ro"] is False  # the active layer now
        for name in ("libvirt-3-format", "libvirt-3-storage", "libvirt-2-format",
                     "libvirt-2-storage"):  # fmt: skip
            ok(qmp.cmd_raw("blockdev-del", {"node-name": name}))
    compare(images[0], expected)
    for image in images:
        check(image)
    assert image_info(images[-1])["backing-filename"] == str(images[1])  # untouched


def test_libvirt_snapshot_delete_non_active(tmp_path: Path, sock_dir: Path) -> None:
    """qemuSnapshotDiscardExternal: a non-active commit with auto-finalize false, the
    base's relative name kept, job-finalize at pending."""
    images = libvirt_chain(tmp_path)
    expected = snapshot(images[-1], tmp_path / "expected.qcow2")
    with libvirt_disk(sock_dir, images) as qmp:
        job = "commit-vda-libvirt-2-format"
        ok(qmp.cmd_raw("block-commit", {
            "device": "libvirt-3-format", "job-id": job, "top-node": "libvirt-2-format",
            "base-node": "libvirt-1-format", "backing-file": "base.qcow2",
            "auto-finalize": False, "auto-dismiss": False, "backing-mask-protocol": True,
        }))  # fmt: skip
        wait_status(qmp, "pending")
        ok(qmp.cmd_raw("job-finalize", {"id": job}))
        wait_status(qmp, "concluded")
        [done] = ok(qmp.cmd_raw("query-jobs"))
        assert "error" not in done
        ok(qmp.cmd_raw("job-dismiss", {"id": job}))
        nodes = {n["node-name"]: n for n in ok(qmp.cmd_raw("query-named-block-nodes"))}
        assert nodes["libvirt-3-format"]["image"]["backing-filename"] == "base.qcow2"
        assert nodes["libvirt-1-format"]["ro"] is True  # back to read-only
        for name in ("libvirt-2-format", "libvirt-2-storage"):
            ok(qmp.cmd_raw("blockdev-del", {"node-name": name}))
    compare(images[-1], expected)
    for image in images:
        check(image)
    header = image_info(images[-1])
    assert (header["backing-filename"], header["backing-filename-format"]) == (
        "base.qcow2",
        "qcow2",
    )


def test_proxmox_commit_polling(tmp_path: Path, sock_dir: Path) -> None:
    """Proxmox VE's snapshot deletion: block-commit with top-node/base-node, then
    query-block-jobs polled until the job is gone (non-active) or ready (active)."""
    images = libvirt_chain(tmp_path)
    expected = snapshot(images[-1], tmp_path / "expected.qcow2")
    with libvirt_disk(sock_dir, images) as qmp:
        ok(qmp.cmd_raw("block-commit", {"device": "libvirt-3-format",
                                        "job-id": "commit-drive-scsi0",
                                        "top-node": "libvirt-2-format",
                                        "base-node": "libvirt-1-format"}))  # fmt: skip
        deadline = time.monotonic() + 30
        while ok(qmp.cmd_raw("query-block-jobs")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok(qmp.cmd_raw("block-commit", {"device": "libvirt-3-format",
                                        "job-id": "commit-drive-scsi0",
                                        "top-node": "libvirt-3-format",
                                        "base-node": "libvirt-1-format"}))  # fmt: skip
        while not any(j["ready"] for j in ok(qmp.cmd_raw("query-block-jobs"))):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok(qmp.cmd_raw("block-job-complete", {"device": "commit-drive-scsi0"}))
        while ok(qmp.cmd_raw("query-block-jobs")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    compare(images[0], expected)
    for image in images:
        check(image)
