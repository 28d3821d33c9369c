"""The job engine against a real ``qemu-storage-daemon``: same script, same transcript.

Each scenario runs first on QEMU's daemon (10.0 under /work/qsd10, or one on ``PATH``),
then on ``python -m blockd`` with the same options, each on fresh images made by
``qemu-img``/``qemu-io``. The transcript is every event and every recorded reply, in
the order the client received them; polls that wait for a state are not recorded (their
events are). Skipped when no qemu-storage-daemon binary is present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kit.cli import BLOCKD
from kit.daemons import transcript
from kit.qemu import QSD10
from kit.qmp import SyncClient

# The transcripts are QEMU 10.0's (7.2 lacks block-job-change and wakes jobs differently).
pytestmark = pytest.mark.skipif(not QSD10.exists(), reason="QEMU 10.0 qemu-storage-daemon missing")
QSD = str(QSD10)


def sleeping_after_first_chunk(jobs: list[dict[str, Any]]) -> bool:
    return bool(jobs) and jobs[0]["offset"] == 512 * 1024 and not jobs[0]["busy"]


def status_is(status: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda jobs: bool(jobs) and jobs[0]["status"] == status


def gone(jobs: list[dict[str, Any]]) -> bool:
    return not jobs


def pause_resume_cancel(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024})
    m.wait(sleeping_after_first_chunk)
    m.call("query-block-jobs")
    m.call("job-complete", id="job0")
    m.call("block-job-pause", device="job0")
    m.call("query-block-jobs")
    m.call("query-jobs")
    m.call("job-pause", id="job0")
    m.call("block-job-set-speed", device="job0", speed=-1)
    m.call("block-job-cancel", device="job0")
    m.call("block-job-resume", device="job0")
    m.call("query-block-jobs")
    m.call("job-resume", id="job0")
    m.call("job-pause", id="job0")
    m.call("job-cancel", id="job0")
    m.call("job-resume", id="job0")
    m.call("block-job-set-speed", device="job0", speed=0)


def cancel_sleeping(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024,
                              "auto-dismiss": False})  # fmt: skip
    m.wait(sleeping_after_first_chunk)
    m.call("block-job-cancel", device="job0")
    m.call("query-jobs")
    m.call("block-job-dismiss", id="job0")


def manual_finalize(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "auto-finalize": False,
                              "auto-dismiss": False})  # fmt: skip
    m.wait(status_is("pending"))
    m.call("query-block-jobs")
    m.call("job-dismiss", id="job0")
    m.call("block-job-pause", device="job0")
    m.call("block-job-finalize", id="job0")
    m.call("query-block-jobs")
    m.call("job-finalize", id="job0")
    m.call("job-dismiss", id="job0")
    m.call("query-jobs")


def cancel_pending(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "auto-finalize": False})
    m.wait(status_is("pending"))
    m.call("job-cancel", id="job0")
    m.call("query-jobs")


def set_speed_wakes(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024})
    m.wait(sleeping_after_first_chunk)
    m.call("block-job-set-speed", device="job0", speed=2048)
    m.call("query-block-jobs")
    m.call("block-job-set-speed", device="job0", speed=0)
    m.wait(gone)


def error_stop_resume(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "on-error": "stop",
                              "auto-dismiss": False})  # fmt: skip
    m.wait(status_is("paused"))
    m.call("query-block-jobs")
    m.call("block-job-cancel", device="job0")
    m.call("block-job-resume", device="job0")
    m.wait(status_is("concluded"))
    m.call("query-block-jobs")


def error_enospc_cancel(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "on-error": "enospc",
                              "auto-dismiss": False})  # fmt: skip
    m.wait(status_is("paused"))
    m.call("query-block-jobs")
    m.call("job-cancel", id="job0")
    m.call("query-block-jobs")


def error_then_conclude(on_error: str) -> Callable[[SyncClient], None]:
    def script(m: SyncClient) -> None:
        m.call("block-stream", **{"job-id": "job0", "device": "top", "on-error": on_error,
                                  "auto-dismiss": False})  # fmt: skip
        m.wait(status_is("concluded"))
        m.call("query-block-jobs")
        m.call("query-jobs")
        m.call("job-resume", id="job0")
        m.call("job-dismiss", id="job0")

    return script


def change(m: SyncClient) -> None:
    m.call("block-job-change", id="nope", type="stream")
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024,
                              "auto-finalize": False})  # fmt: skip
    m.wait(sleeping_after_first_chunk)
    m.call("block-job-change", id="job0", type="stream")
    m.call("block-job-change", id="job0", type="mirror", **{"copy-mode": "write-blocking"})
    m.call("block-job-set-speed", device="job0", speed=0)
    m.wait(status_is("pending"))
    m.call("block-job-change", id="job0", type="stream")
    m.call("block-job-cancel", device="job0")
    m.call("job-cancel", id="job0")


EIO_ONCE = {"event": "read_aio", "errno": 5, "sector": 2048, "once": True}
EIO = {"event": "read_aio", "errno": 5, "sector": 2048}
ENOSPC = {"event": "read_aio", "errno": 28, "sector": 2048}

SCENARIOS = {
    "pause-resume-cancel": (pause_resume_cancel, None),
    "cancel-sleeping": (cancel_sleeping, None),
    "manual-finalize": (manual_finalize, None),
    "cancel-pending": (cancel_pending, None),
    "set-speed-wakes": (set_speed_wakes, None),
    "block-job-change": (change, None),
    "on-error-stop": (error_stop_resume, EIO_ONCE),
    "on-error-enospc": (error_enospc_cancel, ENOSPC),
    "on-error-ignore": (error_then_conclude("ignore"), EIO),
    "on-error-report": (error_then_conclude("report"), EIO),
    "on-error-auto-eio": (error_then_conclude("auto"), EIO),
}


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.mark.parametrize("name", SCENARIOS)
def test_same_transcript_as_qemu(name: str, where: Path, sock_dir: Path) -> None:
    script, inject = SCENARIOS[name]
    qemu = transcript([QSD], where, sock_dir, script, inject)
    ours = transcript(BLOCKD, where, sock_dir, script, inject)
    assert len(qemu) > 4
    for number, (mine, theirs) in enumerate(zip(ours, qemu, strict=False)):
        assert mine == theirs, f"step {number}: blockd {mine} != qemu {theirs}"
    assert len(ours) == len(qemu), (ours[len(qemu) :], qemu[len(ours) :])


def quit_with_jobs(m: SyncClient) -> None:
    m.call("block-stream", **{"job-id": "job0", "device": "top", "speed": 1024})
    m.wait(sleeping_after_first_chunk)
    m.call("quit")
    m.read_to_eof()


def test_quit_transcript(where: Path, sock_dir: Path) -> None:
    qemu = transcript([QSD], where, sock_dir, quit_with_jobs)
    assert [e[1] for e in qemu[-7:]] == [
        "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE",
        "BLOCK_JOB_CANCELLED", "JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", "quit",
    ]  # fmt: skip
    ours = transcript(BLOCKD, where, sock_dir, quit_with_jobs)
    assert ours == qemu
