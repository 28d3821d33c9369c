"""The job follower's pure view updates, from events and from query-block-jobs entries."""

from __future__ import annotations

from typing import Any

import pytest

from blockd.client.follow import JobView, Outcome, apply_block_job, apply_event
from blockd.client.wire import Event

START = JobView("j0", status="running", offset=10, len=100)

# (event name, data, fields of the view that change)
EVENTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("JOB_STATUS_CHANGE", {"id": "j0", "status": "paused"}, {"status": "paused"}),
    ("JOB_STATUS_CHANGE", {"id": "other", "status": "paused"}, {}),
    ("BLOCK_JOB_COMPLETED", {"device": "j0", "type": "stream", "len": 100, "offset": 100,
                             "speed": 0}, {"offset": 100, "outcome": Outcome.COMPLETED}),
    ("BLOCK_JOB_COMPLETED", {"device": "j0", "type": "stream", "len": 100, "offset": 50,
                             "speed": 0, "error": "Input/output error"},
     {"offset": 50, "error": "Input/output error", "outcome": Outcome.FAILED}),
    ("BLOCK_JOB_CANCELLED", {"device": "j0", "type": "stream", "len": 100, "offset": 30,
                             "speed": 0},
     {"offset": 30, "error": "Operation canceled", "outcome": Outcome.CANCELLED}),
    ("BLOCK_JOB_ERROR", {"device": "j0", "operation": "read", "action": "ignore"},
     {"errors_seen": 1}),
    ("BLOCK_JOB_COMPLETED", {"device": "other", "len": 1, "offset": 1}, {}),
    ("BLOCK_JOB_PENDING", {"id": "j0", "type": "stream"}, {}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "changes"), EVENTS)
def test_apply_event(name: str, data: dict[str, Any], changes: dict[str, Any]) -> None:
    after = apply_event(START, Event(name, data))
    assert {k: v for k, v in vars(after).items() if vars(START)[k] != v} == changes


def test_apply_block_job() -> None:
    info = {"device": "j0", "type": "stream", "len": 100, "offset": 40, "speed": 1024,
            "paused": True, "io-status": "failed", "status": "paused", "busy": False}  # fmt: skip
    after = apply_block_job(START, info)
    assert (after.status, after.offset, after.len, after.speed) == ("paused", 40, 100, 1024)
    assert after.paused and after.io_status == "failed" and after.error is None
    failed = apply_block_job(after, {**info, "status": "concluded", "error": "No space"})
    assert failed.error == "No space"
