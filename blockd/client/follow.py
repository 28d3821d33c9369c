"""Follow one block job to its end: events for state, ``query-block-jobs`` for progress.

:func:`follow_job` is what ``blockctl stream`` and ``blockctl wait`` run after the job exists. It
works the way robust management clients do (docs/clients.md §2.4, §6.1): it listens for
``JOB_STATUS_CHANGE`` and the ``BLOCK_JOB_*`` events, polls ``query-block-jobs`` every ``interval``
seconds for ``offset``/``len``/``speed`` (events carry no progress), and when the job is
``concluded`` reads the outcome from ``query-jobs`` and dismisses it. A job that vanishes
(auto-dismiss) is judged by the completion event it sent, if any.
Progress is reported through a callback, so the caller decides how to draw it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import trio

from blockd.client.connection import Client, CommandError, ConnectionLost
from blockd.client.wire import Event

JOB_EVENTS = (
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_PENDING",
)


class Outcome(StrEnum):
    """How a followed job ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # it vanished and we saw no completion event


@dataclass(frozen=True)
class JobView:
    """What the client knows about the job right now."""

    id: str
    status: str = "unknown"
    offset: int = 0
    len: int = 0
    speed: int = 0
    paused: bool = False
    io_status: str = "ok"
    error: str | None = None
    errors_seen: int = 0
    outcome: Outcome | None = None


def apply_event(view: JobView, event: Event) -> JobView:
    """The view after ``event`` (events for other jobs leave it unchanged)."""
    data = event.data
    if data.get("id", data.get("device")) != view.id:
        return view
    match event.name:
        case "JOB_STATUS_CHANGE":
            return replace(view, status=str(data.get("status", view.status)))
        case "BLOCK_JOB_COMPLETED":
            error = data.get("error")
            return replace(
                view,
                offset=int(data.get("offset", view.offset)),
                len=int(data.get("len", view.len)),
                error=error,
                outcome=Outcome.FAILED if error else Outcome.COMPLETED,
            )
        case "BLOCK_JOB_CANCELLED":
            return replace(
                view,
                offset=int(data.get("offset", view.offset)),
                len=int(data.get("len", view.len)),
                error="Operation canceled",
                outcome=Outcome.CANCELLED,
            )
        case "BLOCK_JOB_ERROR":
            return replace(view, errors_seen=view.errors_seen + 1)
        case _:
            return view


def apply_block_job(view: JobView, info: dict[str, Any]) -> JobView:
    """The view after a ``query-block-jobs`` entry for this job."""
    return replace(
        view,
        status=str(info.get("status", view.status)),
        offset=int(info.get("offset", view.offset)),
        len=int(info.get("len", view.len)),
        speed=int(info.get("speed", view.speed)),
        paused=bool(info.get("paused", view.paused)),
        io_status=str(info.get("io-status", view.io_status)),
        error=info.get("error", view.error),
    )


async def _conclude(client: Client, view: JobView, dismiss: bool) -> JobView:
    jobs = await client.execute("query-jobs")
    info = next((j for j in jobs if j.get("id") == view.id), None)
    if info is not None:
        error = info.get("error")
        view = replace(
            view,
            status=str(info.get("status", view.status)),
            offset=int(info.get("current-progress", view.offset)),
            len=int(info.get("total-progress", view.len)),
            error=error,
        )
        if view.outcome is None:
            if error == "Operation canceled":
                view = replace(view, outcome=Outcome.CANCELLED)
            else:
                view = replace(view, outcome=Outcome.FAILED if error else Outcome.COMPLETED)
        if dismiss and view.status == "concluded":
            with contextlib.suppress(CommandError):  # someone else dismissed it first
                await client.execute("job-dismiss", {"id": view.id})
    return view


async def follow_job(
    client: Client,
    job_id: str,
    events: trio.MemoryReceiveChannel[Event],
    *,
    on_update: Callable[[JobView], None] = lambda view: None,
    interval: float = 0.5,
    dismiss: bool = True,
) -> JobView:
    """Follow job ``job_id`` until it has concluded or gone; return the final view.

    Args:
        client: a negotiated connection.
        job_id: the job to follow.
        events: a channel from ``client.listen(*JOB_EVENTS)`` opened before the job was
            started (or before this call), so no event is missed.
        on_update: called with every new view (for a progress display).
        interval: seconds between ``query-block-jobs`` polls.
        dismiss: ``job-dismiss`` the job once it is concluded.

    Returns:
        The final view; its ``outcome`` is set.
    """
    view = JobView(job_id)
    next_poll = trio.current_time()
    while True:
        if trio.current_time() >= next_poll:
            block_jobs = await client.execute("query-block-jobs")
            info = next((b for b in block_jobs if b.get("device") == job_id), None)
            if info is None:
                # Gone: auto-dismissed (or never existed). Judge by the event we saw.
                return replace(view, outcome=view.outcome or Outcome.UNKNOWN, status="null")
            view = apply_block_job(view, info)
            on_update(view)
            if view.status == "concluded":
                return await _conclude(client, view, dismiss)
            next_poll = trio.current_time() + interval
        with trio.move_on_at(next_poll):
            try:
                event = await events.receive()
            except trio.EndOfChannel:
                raise ConnectionLost("the daemon closed the connection") from None
            view = apply_event(view, event)
            on_update(view)
            if view.status == "concluded":
                return await _conclude(client, view, dismiss)
            if view.status == "null":
                return replace(view, outcome=view.outcome or Outcome.UNKNOWN)
