"""Every message the server writes is strict JSON, even when a handler or an event
carries a float with no JSON form (docs/qemu-behaviour/qmp-protocol.md §1): the reply
becomes an internal error, the event is dropped and logged, and the session goes on.
What clients can send (ids and arguments with huge numbers) is tests/qmp/test_hostile_numbers.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from blockd.commands.registry import Command, load_all
from blockd.daemon import Daemon

from .conftest import Served


@pytest.fixture
def commands() -> Mapping[str, Command]:
    """``served`` with a command whose return value has no JSON form (a bug)."""
    table = dict(load_all())

    async def not_json(d: Daemon) -> Any:
        return {"ratio": float("inf")}

    table["query-jobs"] = Command("query-jobs", not_json)
    return table


async def test_a_reply_with_no_json_form_becomes_an_internal_error(served: Served) -> None:
    client = await served.client()
    await client.execute("query-jobs", id="j")
    raw = await client.line()
    reply = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in {raw!r}"))
    assert reply["id"] == "j"
    assert reply["error"]["desc"].startswith("Internal error: cannot encode inf as JSON")
    await client.execute("query-version", id="next")
    assert (await client.recv())["id"] == "next"


async def test_an_event_with_no_json_form_is_dropped_not_raised(served: Served) -> None:
    client = await served.client()
    served.daemon.events.emit("BLOCK_JOB_READY", {"speed": float("nan")})  # must not raise
    served.daemon.events.emit("BLOCK_JOB_READY", {"speed": 1})
    event = await client.recv()
    assert event["event"] == "BLOCK_JOB_READY" and event["data"] == {"speed": 1}
