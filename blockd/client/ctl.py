"""``blockctl``: drive blockd (or qemu-storage-daemon) from a terminal.

Every subcommand opens one QMP connection, runs a few commands and prints the result for
people (rich tables, trees and a live progress bar) or, with ``--json``, as one JSON
document for scripts. Exit status: 0 success, 1 the daemon refused a command or the job
failed or was cancelled, 2 bad usage, 3 the daemon could not be reached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, Final

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

from blockd import __version__
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
from blockd.client.sizes import format_rate, format_size, parse_size
from blockd.client.views import chain_names, chains, jobs_table, node_tree

PROG: Final = "blockctl"
#: Where blockctl looks when neither ``-s`` nor ``$BLOCKD_SOCKET`` says otherwise.
DEFAULT_SOCKET: Final = "/run/blockd/qmp.sock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

Handler = Callable[[Client, argparse.Namespace, "Output"], Coroutine[Any, Any, int]]


class Output:
    """Where results go: rich consoles for people, or JSON on stdout."""

    def __init__(self, as_json: bool, out: Console, err: Console) -> None:
        self.json = as_json
        self.out = out
        self.err = err

    def emit_json(self, value: Any) -> None:
        self.out.file.write(json.dumps(value, indent=2, sort_keys=True) + "\n")

    def fail(self, message: str) -> None:
        self.err.print(Text(f"{PROG}: {message}", style="bold red"), soft_wrap=True)


# --- argument parsing -----------------------------------------------------------------


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _scalar(text: str) -> Any:
    """qmp-shell's value rules: integers, true/false, JSON objects/arrays, else a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """Build a ``blockdev-add`` argument object from JSON, ``@file.json`` or ``key=value``.

    Dotted keys nest (``file.filename=x`` → ``{"file": {"filename": "x"}}``), as in
    qmp-shell and QEMU's ``--blockdev`` syntax.

    Raises:
        ValueError: the text is neither JSON nor ``key=value`` pairs.
    """
    if len(items) == 1 and items[0].startswith("@"):
        items = [Path(items[0][1:]).read_text()]
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc.msg} at offset {exc.pos}") from exc
        if not isinstance(value, dict):
            raise ValueError("the JSON must be an object")
        return value
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        *path, leaf = key.split(".")
        where = result
        for part in path:
            nxt = where.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"{key!r} conflicts with an earlier value for {part!r}")
            where = nxt
        if leaf in where:
            raise ValueError(f"{key!r} is given twice")
        where[leaf] = _scalar(raw)
    if not result:
        raise ValueError("no options given")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``blockctl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Control blockd (or qemu-storage-daemon) over its QMP socket.",
        epilog="Sizes take binary suffixes: 512K, 50M, 1.5G, 2T. "
        f"The socket defaults to $BLOCKD_SOCKET, then $QMP_SOCKET, then {DEFAULT_SOCKET}.",
    )
    parser.add_argument(
        "-s",
        "--socket",
        default=os.environ.get("BLOCKD_SOCKET") or os.environ.get("QMP_SOCKET") or DEFAULT_SOCKET,
        help="the daemon's QMP UNIX socket",
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"{PROG} (blockd {__version__})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the QMP greeting"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stream", help="stream a backing chain into DEVICE (block-stream)")
    p.add_argument("device", metavar="DEVICE", help="node name of the top of the chain")
    p.add_argument("--job-id", required=True, help="name of the new job")
    p.add_argument("--base-node", help="keep this node and below (default: stream all)")
    p.add_argument("--speed", type=_size, default=0, help="rate limit per second, e.g. 50M")
    p.add_argument("--backing-file", help="backing file name to write into DEVICE's header")
    p.add_argument(
        "--on-error", choices=("report", "ignore", "enospc", "stop", "auto"), default=None
    )
    p.add_argument("--no-wait", action="store_true", help="start the job and return at once")
    p.add_argument(
        "--keep-result",
        action="store_true",
        help="with --no-wait: keep the finished job until 'blockctl wait' collects it",
    )
    p.set_defaults(handler=cmd_stream)

    p = sub.add_parser("wait", help="follow a running job to its end, then dismiss it")
    p.add_argument("id", metavar="ID")
    p.add_argument("--keep", action="store_true", help="do not dismiss the concluded job")
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser("jobs", help="list jobs (query-jobs + query-block-jobs)")
    p.set_defaults(handler=cmd_jobs)

    for name, verb in (("pause", "pause"), ("resume", "resume"), ("dismiss", "dismiss")):
        p = sub.add_parser(name, help=f"{verb} a job (job-{verb})")
        p.add_argument("id", metavar="ID")
        p.set_defaults(handler=cmd_verb, verb=verb)
    p = sub.add_parser("cancel", help="cancel a job (block-job-cancel)")
    p.add_argument("id", metavar="ID")
    p.add_argument("--force", action="store_true", help="also cancel a job paused by the user")
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser("speed", help="change a job's rate limit (0 = unlimited)")
    p.add_argument("id", metavar="ID")
    p.add_argument("speed", metavar="SPEED", type=_size, help="bytes per second, e.g. 50M")
    p.set_defaults(handler=cmd_speed)

    p = sub.add_parser("nodes", help="show the node graph as a tree")
    p.add_argument("node", metavar="NODE", nargs="?", help="only the tree below NODE")
    p.set_defaults(handler=cmd_nodes, roles=None)
    p = sub.add_parser("chain", help="show backing chains as trees")
    p.add_argument("node", metavar="NODE", nargs="?", help="only the chain below NODE")
    p.set_defaults(handler=cmd_nodes, roles=frozenset({"backing"}))

    p = sub.add_parser(
        "add",
        help="add a node (blockdev-add)",
        description="OPTIONS is a JSON object, @file.json, or key=value pairs with "
        "dotted keys: driver=qcow2 node-name=top file.driver=file file.filename=top.qcow2",
    )
    p.add_argument("options", metavar="OPTIONS", nargs="+")
    p.set_defaults(handler=cmd_add)
    p = sub.add_parser("del", help="remove a node added with 'add' (blockdev-del)")
    p.add_argument("node", metavar="NODE")
    p.set_defaults(handler=cmd_del)
    return parser


# --- progress display -------------------------------------------------------------------


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


async def cmd_jobs(client: Client, args: argparse.Namespace, out: Output) -> int:
    jobs = await client.execute("query-jobs")
    block_jobs = await client.execute("query-block-jobs")
    if out.json:
        out.emit_json({"jobs": jobs, "block-jobs": block_jobs})
    elif not jobs:
        out.out.print("no jobs")
    else:
        out.out.print(jobs_table(jobs, block_jobs))
    return EXIT_OK


def _done(out: Output, text: str) -> int:
    if out.json:
        out.emit_json({})
    else:
        out.out.print(text)
    return EXIT_OK


async def cmd_verb(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.execute(f"job-{args.verb}", {"id": args.id})
    past = {"pause": "pause requested for", "resume": "resumed", "dismiss": "dismissed"}
    return _done(out, f"{past[args.verb]} job {args.id}")


async def cmd_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    arguments: dict[str, Any] = {"device": args.id}
    if args.force:
        arguments["force"] = True
    await client.execute("block-job-cancel", arguments)
    return _done(out, f"cancel requested for job {args.id}")


async def cmd_speed(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.execute("block-job-set-speed", {"device": args.id, "speed": args.speed})
    return _done(out, f"job {args.id}: speed limit {format_rate(args.speed)}")


async def cmd_nodes(client: Client, args: argparse.Namespace, out: Output) -> int:
    nodes = await client.execute("query-named-block-nodes")
    if args.node is not None and not any(n.get("node-name") == args.node for n in nodes):
        out.fail(f"no node named '{args.node}'")
        return EXIT_FAILED
    if out.json:
        if args.roles is None:
            out.emit_json(nodes if args.node is None else
                          [n for n in nodes if n.get("node-name") == args.node])  # fmt: skip
        else:
            out.emit_json([chain_names(nodes, args.node)] if args.node else chains(nodes))
        return EXIT_OK
    if not nodes:
        out.out.print("no block nodes")
        return EXIT_OK
    title = "backing chains" if args.roles else "block nodes"
    out.out.print(node_tree(nodes, roles=args.roles, start=args.node, title=title))
    return EXIT_OK


async def cmd_add(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        options = parse_options(args.options)
    except (ValueError, OSError) as exc:
        out.fail(f"add: {exc}")
        return EXIT_USAGE
    await client.execute("blockdev-add", options)
    return _done(out, f"added node {options.get('node-name', '(unnamed)')}")


async def cmd_del(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.execute("blockdev-del", {"node-name": args.node})
    return _done(out, f"removed node {args.node}")


# --- entry point -------------------------------------------------------------------------


async def run(args: argparse.Namespace, out: Output) -> int:
    """Connect, run the chosen subcommand, and map errors to messages and exit codes."""
    handler: Handler = args.handler
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


def _console(stream: IO[str]) -> Console:
    # Piped output is not wrapped at 80 columns, so that scripts can grep whole lines.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS") or 200)
    return Console(file=stream, width=width)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``blockctl`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args.json, _console(sys.stdout), _console(sys.stderr))
    try:
        return trio.run(run, args, out)
    except KeyboardInterrupt:
        out.fail("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
