"""blockctl end to end: a real daemon subprocess, real qcow2 chains, judged by qemu-img."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from kit.chains import Layer, build
from kit.cli import TEST_DAEMON, Terminal, ctl_in_process, run_ctl
from kit.daemons import Lab, require_commands
from kit.qemu import check, compare, convert, image_info

from blockd.client.lab import make_chain, query_commands, running_daemon

STREAM = ("blockdev-add", "block-stream", "query-block-jobs", "query-jobs", "job-dismiss")


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    """Failed with ``code`` and one readable line containing ``text``; no traceback."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("blockctl: ") and text in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


def release(lab: Lab) -> None:
    """Close the chain in the daemon, so that the image files are complete on disk."""
    deleted = lab.ctl("del", "top")
    assert deleted.returncode == 0, deleted.stderr


# --- no daemon ------------------------------------------------------------------------------


def test_daemon_not_running(sock_dir: Path) -> None:
    proc = run_ctl("-s", str(sock_dir / "qmp.sock"), "jobs")
    assert_clean_error(proc, 3, "no such socket; is the daemon running?")


def test_wrong_socket(tmp_path: Path, sock_dir: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_clean_error(ctl_in_process("-s", str(tmp_path / "notes.txt"), "nodes"), 3,
                       "not a socket")  # fmt: skip
    stale = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
        assert_clean_error(ctl_in_process("-s", str(stale), "jobs"), 3, "connection refused")
        s.listen(1)  # listening but silent: not a QMP monitor (or one that is busy)
        assert_clean_error(ctl_in_process("-s", str(stale), "--timeout", "0.3", "jobs"), 3,
                           "no QMP greeting within 0.3s")  # fmt: skip


def test_socket_from_environment(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(sock_dir / "env.sock")
    monkeypatch.setenv("BLOCKD_SOCKET", path)
    assert_clean_error(ctl_in_process("jobs"), 3, path)
    monkeypatch.delenv("BLOCKD_SOCKET")
    monkeypatch.setenv("QMP_SOCKET", path + "2")  # qmp-shell's variable is honoured too
    assert_clean_error(ctl_in_process("jobs"), 3, path + "2")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["speed", "j0", "5Q"], "invalid size '5Q'"),
     (["stream", "top"], "--job-id"),
     (["frobnicate"], "invalid choice")],
)  # fmt: skip
def test_usage_errors(args: list[str], message: str) -> None:
    proc = ctl_in_process(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_version_and_help() -> None:
    version = ctl_in_process("--version")
    assert version.returncode == 0 and version.stdout.startswith("blockctl (blockd ")
    helped = ctl_in_process("--help")
    for sub in ("stream", "wait", "jobs", "pause", "resume", "cancel", "speed", "nodes",
                "chain", "add", "del"):  # fmt: skip
        assert f"    {sub} " in helped.stdout


# --- with a daemon --------------------------------------------------------------------------


def test_add_nodes_chain_del(lab: Lab) -> None:
    lab.require("query-named-block-nodes", "blockdev-del")
    lab.add_chain()
    chain = lab.ctl("chain")
    assert chain.returncode == 0, chain.stderr
    lines = chain.stdout.splitlines()
    assert lines[0] == "backing chains"
    assert lines[1].startswith("└── top  qcow2  8 MiB  ") and lines[1].endswith("top.qcow2")
    assert "backing: " in lines[2] and lines[2].endswith("mid.qcow2")
    assert "backing: " in lines[3] and lines[3].endswith("base.qcow2")
    assert len(lines) == 4

    # The real console script, in its own process, gives the same view.
    assert run_ctl("-s", str(lab.socket), "chain").stdout == chain.stdout
    nodes = lab.ctl("nodes")
    assert nodes.returncode == 0
    assert sum("file: " in line for line in nodes.stdout.splitlines()) == 3  # protocol nodes

    as_json = json.loads(lab.ctl("--json", "chain").stdout)
    assert len(as_json) == 1 and as_json[0][0] == "top" and len(as_json[0]) == 3
    raw_nodes = json.loads(lab.ctl("--json", "nodes", "top").stdout)
    assert [n["node-name"] for n in raw_nodes] == ["top"]

    assert_clean_error(lab.ctl("chain", "nope"), 1, "no node named 'nope'")
    deleted = lab.ctl("del", "top")
    assert (deleted.returncode, deleted.stdout) == (0, "removed node top\n")
    assert lab.ctl("nodes").stdout == "no block nodes\n"
    assert_clean_error(lab.ctl("del", "top"), 1,
                       "blockdev-del: Failed to find node with node-name='top'")  # fmt: skip


def test_add_json_and_errors(lab: Lab, tmp_path: Path) -> None:
    lab.require("query-named-block-nodes")
    top = make_chain(lab.images, "1M")[0]
    spec = {"driver": "qcow2", "node-name": "j", "file": {"driver": "file", "filename": str(top)}}
    assert lab.ctl("add", json.dumps(spec)).returncode == 0
    assert_clean_error(lab.ctl("add", json.dumps(spec)), 1, "Duplicate nodes with node-name='j'")
    spec["node-name"] = "k"
    (tmp_path / "k.json").write_text(json.dumps(spec))
    assert_clean_error(lab.ctl("add", f"@{tmp_path / 'k.json'}"), 1, "Failed to get")
    assert_clean_error(lab.ctl("add", "driver"), 2, "expected key=value")
    assert_clean_error(lab.ctl("add", "{not json"), 2, "invalid JSON")


def test_stream_to_completion(lab: Lab) -> None:
    lab.require(*STREAM)
    top = lab.add_chain()[0]
    expected = convert(top, top.with_suffix(".raw"))
    proc = lab.ctl("stream", "top", "--job-id", "j0", "--speed", "16M")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("✔ job j0 completed: 8 MiB streamed in "), proc.stdout
    assert lab.ctl("jobs").stdout == "no jobs\n"  # blockctl dismissed it
    release(lab)
    info = image_info(top, force_share=False)
    assert "backing-filename" not in info
    compare(expected, top)
    check(top, force_share=False)


def test_stream_json_and_failure(lab: Lab) -> None:
    lab.require(*STREAM)
    lab.add_chain("1M")
    proc = lab.ctl("--json", "stream", "top", "--job-id", "j0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outcome"] == "completed" and result["offset"] == result["len"] == 2**20
    assert result["error"] is None
    assert_clean_error(lab.ctl("stream", "nope", "--job-id", "j1"), 1,
                       "block-stream: Cannot find device='nope' nor node-name='nope'")  # fmt: skip


def test_control_a_running_job(lab: Lab) -> None:
    lab.require(*STREAM, "job-pause", "job-resume", "block-job-set-speed")
    top = lab.add_chain()[0]
    expected = convert(top, top.with_suffix(".raw"))
    started = lab.ctl("stream", "top", "--job-id", "j0", "--speed", "256K", "--no-wait")
    assert started.returncode == 0 and "started job j0" in started.stdout

    jobs = lab.ctl("jobs")
    row = next(line for line in jobs.stdout.splitlines() if " j0 " in line)
    assert "stream" in row and "running" in row and "256 KiB/s" in row

    assert lab.ctl("pause", "j0").stdout == "pause requested for job j0\n"
    listed = json.loads(lab.ctl("--json", "jobs").stdout)
    assert listed["block-jobs"][0]["paused"] is True
    assert_clean_error(
        lab.ctl("cancel", "j0"), 1, "The block job for device 'j0' is currently paused"
    )
    assert lab.ctl("resume", "j0").returncode == 0
    assert lab.ctl("speed", "j0", "0").stdout == "job j0: speed limit unlimited\n"
    waited = lab.ctl("wait", "j0")
    # The job was started without --keep-result, so it may vanish before `wait` sees it end.
    assert waited.returncode in (0, 1), waited.stderr
    assert "completed" in waited.stdout or "no job 'j0'" in waited.stderr
    assert_clean_error(lab.ctl("speed", "j0", "1M"), 1, "Block job 'j0' not found")
    release(lab)
    assert "backing-filename" not in image_info(top, force_share=False)
    compare(expected, top)
    check(top, force_share=False)


def test_cancel_then_wait(lab: Lab) -> None:
    lab.require(*STREAM, "block-job-cancel")
    top = lab.add_chain()[0]
    proc = lab.ctl("stream", "top", "--job-id", "j0", "--speed", "64K", "--no-wait",
                   "--keep-result")  # fmt: skip
    assert proc.returncode == 0
    assert lab.ctl("cancel", "j0").stdout == "cancel requested for job j0\n"
    waited = lab.ctl("wait", "j0")
    assert waited.returncode == 1
    assert "✘ job j0 was cancelled at " in waited.stdout
    assert lab.ctl("jobs").stdout == "no jobs\n"
    expected = convert(top, top.with_suffix(".raw"))
    release(lab)
    assert image_info(top, force_share=False)["backing-filename"] == "mid.qcow2"
    compare(expected, top)  # what was copied is the same data
    check(top, force_share=False)


def test_wait_keeps_result_for_failed_job(lab: Lab) -> None:
    """A job that failed is reported from query-jobs' error, and kept with --keep."""
    lab.require(*STREAM)
    base, top = build(
        lab.images,
        Layer("base.raw", "1M", ["write -P 0x11 0 1M"]),
        Layer("top.qcow2", absolute=True),
    )
    # The backing image is read through blkdebug, which fails any read covering 512 KiB
    # (sector 1024), as iotest 030 does: the stream must fail there with EIO.
    # (Two nodes: QEMU 7.2 refuses an inline backing object with a blkdebug file.)
    failing = {"driver": "raw", "node-name": "base", "file": {
               "driver": "blkdebug", "image": {"driver": "file", "filename": str(base)},
               "inject-error": [{"event": "read_aio", "errno": 5, "sector": 1024}]}}  # fmt: skip
    spec = {"driver": "qcow2", "node-name": "top", "backing": "base",
            "file": {"driver": "file", "filename": str(top)}}  # fmt: skip
    for options in (failing, spec):
        added = lab.ctl("add", json.dumps(options))
        assert added.returncode == 0, added.stderr
    started = lab.ctl("stream", "top", "--job-id", "bad", "--no-wait", "--keep-result")
    assert started.returncode == 0, started.stderr
    waited = lab.ctl("wait", "bad", "--keep")
    assert waited.returncode == 1
    assert waited.stdout == "✘ job bad failed at 512 KiB of 1 MiB: Input/output error\n"
    table = lab.ctl("jobs").stdout
    assert "concluded" in table and "Input/output error" in table
    assert lab.ctl("dismiss", "bad").returncode == 0
    assert lab.ctl("jobs").stdout == "no jobs\n"
    release(lab)
    assert lab.ctl("del", "base").returncode == 0
    assert image_info(top, force_share=False)["backing-filename"] == str(base)
    check(top, force_share=False)


def test_stream_to_base_node_with_backing_file(lab: Lab) -> None:
    """A partial pull: mid's data goes into top, base stays below with the name we give."""
    lab.require(*STREAM)
    top, _, _ = lab.add_chain()
    expected = convert(top, top.with_suffix(".raw"))
    [chain] = json.loads(lab.ctl("--json", "chain", "top").stdout)
    base_node = chain[2]
    proc = lab.ctl("stream", "top", "--job-id", "pull", "--base-node", base_node,
                   "--backing-file", "base.qcow2", "--speed", "1G")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [after] = json.loads(lab.ctl("--json", "chain", "top").stdout)
    assert after == ["top", base_node]
    release(lab)
    info = image_info(top, force_share=False)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.qcow2", "qcow2")
    compare(expected, top)
    check(top, force_share=False)


def test_daemon_dies_while_following(sock_dir: Path, tmp_path: Path) -> None:
    """blockctl following a job reports a lost daemon in one line, exit status 3."""
    with running_daemon(sock_dir, TEST_DAEMON) as daemon:
        require_commands(query_commands(daemon.socket), *STREAM)
        top = make_chain(tmp_path, "8M")[0]
        sock = str(daemon.socket)
        added = ctl_in_process("-s", sock, "add", "driver=qcow2", "node-name=top",
                               "file.driver=file", f"file.filename={top}")  # fmt: skip
        assert added.returncode == 0
        # On a terminal, so that the progress bar says when the job is being followed.
        term = Terminal("-s", sock, "stream", "top", "--job-id", "j0", "--speed", "64K")
        try:
            assert term.read_until(b"running"), term.text()
            daemon.process.kill()
            status = term.wait()
        finally:
            if term.fd >= 0:
                with contextlib.suppress(ChildProcessError, ProcessLookupError):
                    os.kill(term.pid, 9)
                    os.waitpid(term.pid, 0)
    assert status == 3, term.text()
    assert "blockctl: the daemon closed the connection" in term.text()
    assert "Traceback" not in term.text()
