"""qmp-shell (qemu.qmp 0.0.6) against the daemon: completion data from query-commands and
``-p`` pretty output. (tests/examples/test_examples.py drives it on a real terminal,
Tab key included; tests/server/test_real_clients.py pipes commands into it.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from kit.daemons import Lab
from qemu.qmp.qmp_shell import QMPShell


def completions(shell: QMPShell, text: str) -> list[str]:
    found: list[str] = []
    while (match := shell._completer.complete(text, len(found))) is not None:
        found.append(match)
    return found


def test_completion_and_pretty_output(lab: Lab, monkeypatch: pytest.MonkeyPatch,
                                      tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    lab.require("query-commands", "query-block-jobs")
    monkeypatch.setenv("HOME", str(tmp_path))  # qmp-shell keeps its history file there
    with QMPShell(str(lab.socket), pretty=True) as shell:
        shell.connect()
        # Completion is filled from query-commands: every name is offered, nothing else.
        names = completions(shell, "")
        assert set(names) == lab.commands
        assert completions(shell, "block-st") == ["block-stream"]
        assert set(completions(shell, "query-")) == {c for c in lab.commands
                                                     if c.startswith("query-")}  # fmt: skip
        capfd.readouterr()
        shell.show_banner()
        banner = capfd.readouterr().out
        # What _execute_cmd does, with the output file given (qmp-shell binds sys.stdout
        # as a default argument at import time, which a test cannot capture).
        out = io.StringIO()
        for line in ("query-block-jobs", "job-dismiss id=nope"):
            command = shell._build_cmd(line)
            assert command is not None and "id" not in command  # qmp-shell sends no id
            shell._print(shell.cmd_obj(command), fh=out)
        text = banner + out.getvalue()
    assert text.startswith("Welcome to the QMP low-level shell!\nConnected to QEMU ")
    # -p: indent 4 and sorted keys, one JSON document per reply.
    assert '{\n    "return": []\n}\n' in text
    error = text[text.index('{\n    "error"') :]
    assert json.loads(error) == {"error": {"class": "GenericError", "desc": "Job not found"}}
    assert error.index('"class"') < error.index('"desc"')
