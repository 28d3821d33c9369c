"""Events raised while a command runs go out before its reply
(docs/qemu-behaviour/qmp-protocol.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import trio
from kit.daemons import Served

from blockd.commands.registry import Command, load_all
from blockd.daemon import Daemon


@pytest.fixture
def commands() -> Mapping[str, Command]:
    """query-version emits two events while it runs (to check the ordering)."""
    table = dict(load_all())
    real = table["query-version"]

    async def emitting(d: Daemon) -> Any:
        d.events.emit("JOB_STATUS_CHANGE", {"status": "created", "id": "j"})
        await trio.sleep(0)
        d.events.emit("JOB_STATUS_CHANGE", {"status": "running", "id": "j"})
        return await real.call(d, {})

    table["query-version"] = Command("query-version", emitting)
    return table


async def test_events_raised_by_a_command_precede_its_reply(served: Served) -> None:
    client, other = await served.client(), await served.client()
    await client.execute("query-version", id="v")
    got = [await client.recv() for _ in range(3)]
    assert [m.get("event") for m in got] == ["JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", None]
    assert [m["data"]["status"] for m in got[:2]] == ["created", "running"]
    assert got[2]["id"] == "v"
    assert [(await other.recv())["data"]["status"] for _ in range(2)] == ["created", "running"]
