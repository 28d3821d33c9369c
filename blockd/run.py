"""The daemon process: start-up in option order, readiness, signals, clean shutdown.

Start-up processes the command line's steps in order (``--blockdev`` nodes are added,
``--chardev``/``--monitor`` sockets bound), then starts serving, writes the pidfile and
only then reports ready (``--daemonize``: the parent exits 0). Any error before that is one
line ``blockd: --opt value: message`` and exit status 1, with nothing left behind.

Shutdown (SIGINT, SIGTERM, SIGHUP or QMP ``quit``): stop accepting, flush queued replies,
close connections, cancel jobs, flush and close images, remove sockets and pidfile, exit 0.

Shutdown never hangs. The cancel of the jobs and each image's flush and close are bounded
(:data:`~blockd.jobs.manager.CANCEL_ALL_SECONDS`, :data:`~blockd.block.graph.NODE_CLOSE_SECONDS`);
what misses its deadline is logged as an error naming the job or node, the rest is still
closed, and the exit status is 1. A worker thread stuck in the kernel (``fdatasync`` on
storage that stopped answering) cannot be cancelled at all, so a watchdog ends the process
:data:`SHUTDOWN_SECONDS` after the shutdown began: one error line naming the node being
closed, sockets and pidfile removed, exit status 1. ``BLOCKD_SHUTDOWN_SECONDS`` (a number)
replaces every one of these bounds, e.g. for tests.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import trio

from blockd.commands.registry import Command, load_all
from blockd.config import PROG, BlockdevSpec, CliError, Config, MonitorSpec
from blockd.daemon import Daemon
from blockd.errors import QMPError, RequestError
from blockd.options import OptionError, coerce_scalars
from blockd.pidfile import PidFile, PidFileError, check_pidfile_free
from blockd.server import Endpoint, EndpointError, Server

__all__ = ["add_blockdev", "run_daemon"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: The longest a shutdown may take, from ``quit``/SIGTERM to the exit, before the watchdog
#: ends the process (exit status 1). Above the in-daemon bounds, which report what hung
#: and go on; the watchdog is for what cannot be cancelled (a thread in ``fdatasync``).
SHUTDOWN_SECONDS: Final = 60.0

#: Set to a number of seconds to replace every shutdown bound (tests use a short one).
SHUTDOWN_SECONDS_ENV: Final = "BLOCKD_SHUTDOWN_SECONDS"

log = logging.getLogger("blockd.run")


def _shutdown_seconds() -> float | None:
    value = os.environ.get(SHUTDOWN_SECONDS_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def run_daemon(config: Config) -> int:
    """Run the daemon described by ``config`` in this process; returns the exit status.

    With ``config.daemonize`` the process forks: the caller's process returns 0 once the
    daemon is ready, 1 if it failed to start (its error went to stderr).
    """
    if config.daemonize:
        return _daemonize(config)
    return _run(config, ready_fd=None)


def _run(config: Config, ready_fd: int | None) -> int:
    logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.WARNING)
    try:
        data_safe = trio.run(_main, config, ready_fd)
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if not data_safe:
        log.error("shut down, but not every image could be flushed: exit status 1")
        return 1
    return 0


def _daemonize(config: Config) -> int:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child > 0:
        os.close(write_end)
        os.waitpid(child, 0)  # the intermediate child exits at once
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.read(1) == b"R"
        return 0 if ready else 1
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes; the daemon can never regain a terminal
    return _run(config, ready_fd=write_end)


def _detach(ready_fd: int) -> None:
    """Tell the waiting parent we are ready, then let go of its stdio."""
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


async def add_blockdev(
    daemon: Daemon, commands: Mapping[str, Command], options: dict[str, Any], keyval: bool
) -> None:
    """Add a node as QMP ``blockdev-add`` would, from ``--blockdev`` options.

    Keyval options (all strings) are first converted to the types the schema expects.

    Raises:
        QMPError: the options are invalid or the node cannot be opened (QMP's message).
        OptionError: a keyval value cannot be converted.
    """
    schema = daemon.schema
    if "blockdev-add" not in schema.commands or "blockdev-add" not in commands:
        # The block layer is not there: every driver is unknown.
        if "driver" not in options:
            raise RequestError("Parameter 'driver' is missing")
        raise RequestError(f"Parameter 'driver' does not accept value '{options['driver']}'")

    def first_error(tree: Mapping[str, Any]) -> str | None:
        try:
            schema.validate_arguments("blockdev-add", tree)
        except RequestError as exc:
            return exc.desc
        return None

    if keyval:
        coerce_scalars(options, first_error)
    schema.validate_arguments("blockdev-add", options)
    await commands["blockdev-add"].call(daemon, options)


async def _start(
    config: Config, daemon: Daemon, server: Server, commands: Mapping[str, Command]
) -> None:
    for step in config.steps:
        if isinstance(step, BlockdevSpec):
            try:
                await add_blockdev(daemon, commands, step.options, step.keyval)
            except (QMPError, OptionError) as exc:
                raise CliError("--blockdev", step.text, str(exc)) from exc
        elif isinstance(step, MonitorSpec):
            chardev = step.chardev
            endpoint = Endpoint(chardev.path, chardev.fd, chardev.server, step.pretty)
            try:
                await server.add_endpoint(endpoint)
            except EndpointError as exc:
                option = "--socket" if chardev.id.startswith("#") else "--chardev"
                raise CliError(option, chardev.text, str(exc)) from exc


async def _main(config: Config, ready_fd: int | None) -> bool:
    """Run the daemon; returns :attr:`Daemon.data_safe` after a shutdown."""
    pidfile = PidFile(config.pidfile) if config.pidfile else None
    daemon = Daemon()
    daemon.graph.allow_header_json = config.allow_header_json
    bound = _shutdown_seconds()
    if bound is not None:
        daemon.set_shutdown_seconds(bound)
    commands = load_all()
    server = Server(daemon, commands)
    watchdogs: list[threading.Timer] = []
    with trio.open_signal_receiver(*_SIGNALS) as signals:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                error = await _start_serving(config, daemon, server, commands, nursery, pidfile)
                if error is None:
                    watcher = trio.CancelScope()
                    nursery.start_soon(_watch_signals, signals, daemon, watcher)
                    arm = functools.partial(_arm_watchdog, daemon, server, pidfile)
                    nursery.start_soon(_watchdog_on_shutdown, daemon, arm, bound, watchdogs)
                    if ready_fd is not None:
                        _detach(ready_fd)
                    await daemon.wait_shutdown()
                    watcher.cancel()  # daemon.run ends by itself once jobs and images are closed
                daemon.request_shutdown()
                await server.aclose()
        finally:
            for watchdog in watchdogs:
                watchdog.cancel()
            server.remove_sockets()
            if pidfile is not None:
                pidfile.remove()
    if error is not None:
        raise error
    return daemon.data_safe


async def _watchdog_on_shutdown(
    daemon: Daemon,
    arm: Callable[[float], threading.Timer],
    bound: float | None,
    armed: list[threading.Timer],
) -> None:
    await daemon.wait_shutdown_begun()
    armed.append(arm(bound or SHUTDOWN_SECONDS))


def _arm_watchdog(
    daemon: Daemon, server: Server, pidfile: PidFile | None, seconds: float
) -> threading.Timer:
    """End the process ``seconds`` from now unless the shutdown is over by then.

    Runs in a thread of its own, since the trio thread may be waiting for a worker thread
    that the kernel holds; so it only reads plain attributes and removes files.
    """

    def give_up() -> None:
        node = daemon.graph.closing
        what = f"node '{node}' is still being flushed" if node else "jobs are still running"
        try:
            sys.stderr.write(
                f"{PROG}: shutdown did not finish within {seconds:g}s ({what}; storage not "
                "responding): exiting now, data may not be flushed\n"
            )
            sys.stderr.flush()
            server.remove_sockets()
            if pidfile is not None:
                pidfile.remove()
        finally:
            os._exit(1)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    return timer


async def _start_serving(
    config: Config,
    daemon: Daemon,
    server: Server,
    commands: Mapping[str, Command],
    nursery: trio.Nursery,
    pidfile: PidFile | None,
) -> CliError | None:
    """Everything up to readiness; returns the start-up error instead of raising it (a
    raise would reach the caller wrapped in the nursery's exception group)."""
    try:
        if pidfile is not None:
            try:
                check_pidfile_free(pidfile.path)
            except PidFileError as exc:
                raise CliError("--pidfile", config.pidfile, str(exc)) from exc
        await _start(config, daemon, server, commands)
        await nursery.start(server.run)
        if pidfile is not None:
            try:
                pidfile.write()
            except PidFileError as exc:
                raise CliError("--pidfile", config.pidfile, str(exc)) from exc
    except CliError as exc:
        return exc
    return None


async def _watch_signals(
    signals: AsyncIterator[int], daemon: Daemon, scope: trio.CancelScope
) -> None:
    with scope:
        async for _signum in signals:
            daemon.request_shutdown()
