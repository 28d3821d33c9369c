"""The ``blockctl`` commands that follow a job to its end: ``stream`` and ``wait``.

They need the job's events, so they run on the trio client
(:mod:`blockd.client.connection`) with a live progress bar; every other subcommand is one
request and one reply (:mod:`blockd.client.ctl`, on the blocking client). Ctrl-C while
following cancels the job; a second Ctrl-C leaves it running.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final

import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from blockd.client.connection import (
    Client,
    ClientError,
    CommandError,
    ConnectError,
    ConnectionLost,
    connect,
    single,
)
from blockd.client.follow import JOB_EVENTS, JobView, Outcome, follow_job
from blockd.client.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    PROG,
    Output,
)
from blockd.client.sizes import format_rate, format_size

__all__ = ["HANDLERS", "run"]

Handler = Callable[[Client, argparse.Namespace, Output], Coroutine[Any, Any, int]]


class RateColumn(ProgressColumn):
    """The measured copy rate in binary units."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else format_rate(speed), style="progress.data.speed")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        RateColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
        disable=not (enabled and console.is_terminal),
    )


def _summary(view: JobView, elapsed: float) -> tuple[str, str]:
    size = format_size(view.offset)
    match view.outcome:
        case Outcome.COMPLETED:
            rate = f", {format_rate(view.offset / elapsed)}" if elapsed > 0 and view.offset else ""
            return "green", f"✔ job {view.id} completed: {size} streamed in {elapsed:.1f}s{rate}"
        case Outcome.FAILED:
            return (
                "red",
                f"✘ job {view.id} failed at {size} of {format_size(view.len)}: {view.error}",
            )
        case Outcome.CANCELLED:
            return "yellow", f"✘ job {view.id} was cancelled at {size} of {format_size(view.len)}"
        case _:
            return "yellow", f"? job {view.id} is gone; its result was not seen (auto-dismissed)"


def _exit_for(view: JobView) -> int:
    return EXIT_OK if view.outcome is Outcome.COMPLETED else EXIT_FAILED


async def _follow(client: Client, job_id: str, events: Any, out: Output, dismiss: bool) -> int:
    """Follow ``job_id`` with a progress bar; Ctrl-C cancels the job (twice: leave it)."""
    start = trio.current_time()
    interrupted = False
    view: JobView | None = None

    async def on_sigint(cancel_scope: trio.CancelScope) -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if interrupted:
                    cancel_scope.cancel()
                    return
                interrupted = True
                out.err.print(f"interrupted: cancelling job {job_id} (Ctrl-C again to leave it)")
                try:
                    await client.execute("block-job-cancel", {"device": job_id, "force": True})
                except CommandError as exc:
                    out.fail(f"cancel: {exc.desc}")

    async def watch(nursery: trio.Nursery) -> None:
        nonlocal view
        progress = _progress(out.err, enabled=not out.json)
        task = progress.add_task(job_id, total=None, status="starting")

        def update(v: JobView) -> None:
            status = "paused" if v.paused and v.status == "running" else v.status
            progress.update(task, completed=v.offset, total=v.len or None, status=status)

        with progress:
            view = await follow_job(client, job_id, events, on_update=update, dismiss=dismiss)
            update(view)
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(on_sigint, nursery.cancel_scope)
            nursery.start_soon(watch, nursery)
    except BaseExceptionGroup as group:
        raise single(group) from None
    if view is None:  # left with a second Ctrl-C
        out.fail(f"left job {job_id} running")
        return EXIT_INTERRUPTED
    elapsed = trio.current_time() - start
    if out.json:
        out.emit_json(
            {
                "id": view.id,
                "outcome": str(view.outcome),
                "status": view.status,
                "offset": view.offset,
                "len": view.len,
                "error": view.error,
                "seconds": round(elapsed, 3),
            }
        )
    else:
        style, line = _summary(view, elapsed)
        out.out.print(Text(line, style=f"bold {style}"))
    return EXIT_INTERRUPTED if interrupted else _exit_for(view)


# --- subcommands -------------------------------------------------------------------------


async def cmd_stream(client: Client, args: argparse.Namespace, out: Output) -> int:
    arguments: dict[str, Any] = {"job-id": args.job_id, "device": args.device}
    if args.base_node:
        arguments["base-node"] = args.base_node
    if args.backing_file:
        arguments["backing-file"] = args.backing_file
    if args.speed:
        arguments["speed"] = args.speed
    if args.on_error:
        arguments["on-error"] = args.on_error
    if args.no_wait:
        if args.keep_result:
            arguments["auto-dismiss"] = False
        await client.execute("block-stream", arguments)
        if out.json:
            out.emit_json({"id": args.job_id, "started": True})
        else:
            out.out.print(
                f"started job {args.job_id}; follow it with: {PROG} -s {args.socket} wait "
                f"{args.job_id}"
            )
        return EXIT_OK
    # Keep the concluded job until we have read its result (docs/clients.md §6.1).
    arguments["auto-dismiss"] = False
    with client.listen(*JOB_EVENTS) as events:
        await client.execute("block-stream", arguments)
        return await _follow(client, args.job_id, events, out, dismiss=True)


async def cmd_wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    with client.listen(*JOB_EVENTS) as events:
        jobs = await client.execute("query-jobs")
        if not any(j.get("id") == args.id for j in jobs):
            out.fail(f"wait: no job '{args.id}' (it may have finished and been dismissed)")
            return EXIT_FAILED
        return await _follow(client, args.id, events, out, dismiss=not args.keep)


#: The subcommands this module runs, by the name ``blockctl``'s parser gives them.
HANDLERS: Final[dict[str, Handler]] = {"stream": cmd_stream, "wait": cmd_wait}


async def run(args: argparse.Namespace, out: Output) -> int:
    """Connect, run ``args.follow``'s subcommand, map errors to messages and exit codes."""
    handler = HANDLERS[args.follow]
    try:
        async with connect(args.socket, timeout=args.timeout) as client:
            return await handler(client, args, out)
    except ConnectError as exc:
        out.fail(str(exc))
        return EXIT_UNREACHABLE
    except CommandError as exc:
        out.fail(f"{exc.command}: {exc.desc}")
        return EXIT_FAILED
    except (ConnectionLost, ClientError) as exc:
        out.fail(str(exc))
        return EXIT_UNREACHABLE
