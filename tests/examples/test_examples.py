"""Every example runs as-is against a daemon it starts itself, and does what it says."""

from __future__ import annotations

import ast
import re

import pytest
from kit.cli import run_example
from kit.daemons import require_commands
from kit.repo import EXAMPLES

STREAM = {"blockdev-add", "blockdev-del", "block-stream", "query-jobs", "query-block-jobs",
          "job-dismiss", "query-named-block-nodes"}  # fmt: skip


def ok(proc: object) -> None:
    import subprocess

    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_opens_with_what_it_shows(name: str) -> None:
    tree = ast.parse((EXAMPLES / name).read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(doc.splitlines()) >= 3, f"{name} needs a docstring saying what it shows"


def test_stream_demo(daemon_commands: set[str]) -> None:
    require_commands(daemon_commands, *STREAM)
    proc = run_example("stream_demo.py", "--size", "8M", "--speed", "16M")
    ok(proc)
    out = proc.stdout
    assert "✔ job demo completed: 8 MiB streamed in" in out
    assert "Images are identical." in out
    assert "top.qcow2 has no backing file" in out and out.rstrip().endswith("demo OK")
    # Before the stream the chain has three levels, after it one.
    trees = re.findall(r"backing chains\n((?:.*── .*\n)+)", out)
    assert [len(t.splitlines()) for t in trees] == [3, 1]


def test_libvirt_pull(daemon_commands: set[str]) -> None:
    require_commands(daemon_commands, *STREAM, "query-qmp-schema", "query-version")
    proc = run_example("libvirt_pull.py")
    ok(proc)
    out = proc.stdout
    statuses = re.findall(r'"event": "JOB_STATUS_CHANGE", "data": \{[^}]*"status": "(\w+)"', out)
    assert statuses == ["created", "running", "waiting", "pending", "concluded"]
    sent = re.findall(r'^-> \{"execute": "([\w-]+)"', out, re.MULTILINE)
    assert sent[:2] == ["query-qmp-schema", "query-version"]
    assert sent[2:8] == ["blockdev-add"] * 6
    assert sent[8:11] == ["block-stream", "query-jobs", "job-dismiss"]
    assert sent[11] == "query-named-block-nodes" and set(sent[12:]) == {"blockdev-del"}
    assert '"auto-dismiss": false' in out and '"auto-finalize": true' in out
    assert "top's backing file is now 'base.qcow2'; qemu-img compare: Images are identical." in out
    assert out.rstrip().endswith("OK")


def test_poll_pull(daemon_commands: set[str]) -> None:
    require_commands(daemon_commands, *STREAM, "block-job-cancel", "block-job-set-speed")
    proc = run_example("poll_pull.py")
    ok(proc)
    out = proc.stdout
    assert out.count("-> block-job-cancel") == 1 and out.count("-> block-job-set-speed") == 1
    assert "stream-drive-scsi0 is gone" in out and "stream-drive-scsi0-2 is gone" in out
    assert "backing file after the cancel: '" in out and "mid.qcow2'" in out
    assert "backing file after the stream: None" in out
    assert out.rstrip().endswith("OK")


def commands_typed(transcript: str) -> list[str]:
    """The command lines of a qmp-shell session, with the image directory left out."""
    lines = [line.removeprefix("(QEMU) ") for line in transcript.splitlines()
             if line.startswith("(QEMU) ")]  # fmt: skip
    return [re.sub(r'"filename":"[^"]*/', '"filename":"', line) for line in lines]


def test_qmp_shell_session(daemon_commands: set[str]) -> None:
    """qmp-shell -p on a terminal: banner, tab completion from query-commands, pretty
    replies, an error, queued events; and the committed transcript is this session."""
    require_commands(daemon_commands, *STREAM, "query-commands", "block-job-set-speed")
    proc = run_example("qmp_shell_session.py")
    ok(proc)
    out = proc.stdout
    assert re.search(r"^Connected to QEMU \d+\.\d+\.\d+$", out, re.MULTILINE)
    # "query-block-j<TAB>" was completed by readline from the query-commands list.
    assert '(QEMU) query-block-jobs\n{\n    "return": []\n}' in out
    assert "        \"desc\": \"Cannot find device='nope' nor node-name='nope'\"" in out
    assert '            "status": "concluded",' in out  # -p: indent 4, sorted keys
    assert "'event': 'BLOCK_JOB_COMPLETED'" in out
    committed = (EXAMPLES / "qmp-shell-transcript.txt").read_text()
    assert commands_typed(committed) == commands_typed(out)
    assert committed.count("{") == out.count("{")  # same replies and events, in shape
