"""blockctl on a real terminal: the live progress bar, and Ctrl-C cancelling the job."""

from __future__ import annotations

import os

from kit.cli import Terminal
from kit.daemons import Lab

STREAM = ("blockdev-add", "block-stream", "query-block-jobs", "query-jobs", "job-dismiss")


def test_live_progress_bar(lab: Lab) -> None:
    lab.require(*STREAM)
    lab.add_chain()
    term = Terminal("-s", str(lab.socket), "stream", "top", "--job-id", "j0", "--speed", "4M")
    assert term.wait() == 0, term.text()
    text = term.text()
    # Redrawn in place (carriage returns / cursor moves), with bytes, a rate and an ETA.
    assert "\x1b[" in text and "━" in text
    assert "/8.0 MiB" in text and "MiB/s" in text and "0:00:0" in text
    assert "running" in text and "concluded" in text
    assert "✔ job j0 completed: 8 MiB streamed in" in text


def test_ctrl_c_cancels_the_job(lab: Lab) -> None:
    lab.require(*STREAM, "block-job-cancel")
    lab.add_chain()
    term = Terminal("-s", str(lab.socket), "stream", "top", "--job-id", "j0", "--speed", "256K")
    assert term.read_until(b"running"), term.text()
    os.write(term.fd, b"\x03")  # Ctrl-C typed at the terminal: SIGINT to blockctl
    assert term.wait() == 130, term.text()
    text = term.text()
    assert "interrupted: cancelling job j0" in text
    assert "✘ job j0 was cancelled at " in text
    assert lab.ctl("jobs").stdout == "no jobs\n"  # blockctl collected it
