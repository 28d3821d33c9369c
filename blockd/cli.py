"""The ``blockd`` command line: a drop-in for ``qemu-storage-daemon``'s.

Options are processed in the order given, as QEMU does: a ``--monitor`` may only name a
``--chardev`` given before it, and ``--blockdev`` nodes are added in order. Every option
error is one line on stderr, ``blockd: --opt value: message``, and exit status 1.

``blockd demo`` runs the self-contained demo (:mod:`blockd.demo`) instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Final

from blockd import QEMU_VERSION, __version__
from blockd.config import (
    PROG,
    BlockdevSpec,
    ChardevSpec,
    CliError,
    Config,
    MonitorSpec,
    Step,
)
from blockd.options import OptionError, parse_bool, parse_json_or_keyval, parse_keyval

__all__ = ["USAGE", "main", "parse_args", "version_text"]

USAGE: Final = f"""\
Usage: {PROG} [options]
       {PROG} demo [--keep] [--dir DIR]
QMP-compatible block-job daemon (a drop-in for qemu-storage-daemon's block-stream use)

  -h, --help                display this help and exit
  -V, --version             output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,<option>=<value>...]
  --blockdev '{{"driver": ..., "node-name": ..., ...}}'
                            add a block node (same options as QMP blockdev-add)
  --chardev socket,id=<id>,path=<path>,server=on[,wait=off]
                            listen for QMP clients on a UNIX socket
  --chardev socket,id=<id>,path=<path>[,server=off]
                            connect to a listening QMP client instead
  --chardev socket,id=<id>,fd=<fd>,server=on
                            serve on an inherited listening socket
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                            serve QMP on the chardev <id>
  --socket <path>           short for --chardev socket,id=...,path=<path>,server=on,wait=off
                            plus --monitor on it
  --pidfile <path>          write the daemon's pid to <path> once it accepts connections
  --daemonize               run in the background once started
  --allow-header-json       follow json: and protocol-prefixed (nbd:, file: ...) backing
                            names found in image headers (refused by default)

Every socket serves many clients at once. SIGINT, SIGTERM, SIGHUP or the QMP command
'quit' stop the daemon cleanly.
"""


_WITH_VALUE: Final = frozenset(
    {
        "--blockdev",
        "--chardev",
        "--monitor",
        "--socket",
        "--pidfile",
        "--object",
        "--export",
        "--nbd-server",
        "--trace",
        "-T",
    }
)
_FLAGS: Final = frozenset({"--daemonize", "--help", "-h", "--version", "-V", "--allow-header-json"})
_UNSUPPORTED: Final = frozenset({"--object", "--export", "--nbd-server", "--trace", "-T"})
_CHARDEV_KEYS: Final = frozenset({"backend", "id", "path", "server", "wait", "fd"})
_MONITOR_KEYS: Final = frozenset({"chardev", "id", "mode", "pretty"})


def _split_argv(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """Pair each option with its value (``--opt value`` or ``--opt=value``)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, inline = arg.partition("=")
        if arg.startswith("--") and eq and name in _WITH_VALUE | _FLAGS:
            if name in _FLAGS:
                raise CliError(name, None, "option does not take a value")
            out.append((name, inline))
        elif arg in _WITH_VALUE:
            if i >= len(argv):
                raise CliError(arg, None, "option requires an argument")
            out.append((arg, argv[i]))
            i += 1
        elif arg in _FLAGS:
            out.append((arg, None))
        elif arg.startswith("-") and arg != "-":
            raise CliError(arg, None, "unrecognized option")
        else:
            raise CliError(None, None, f"Unexpected argument: {arg}")
    return out


def _chardev(text: str, known: dict[str, ChardevSpec]) -> ChardevSpec:
    opts = parse_keyval(text, implied_key="backend")
    for key in opts:
        if key not in _CHARDEV_KEYS:
            raise OptionError(f"Invalid parameter '{key}'")
    backend = opts.get("backend")
    if backend is None:
        raise OptionError('chardev: "backend" is missing')
    if backend != "socket":
        raise OptionError(f"'{backend}' is not a supported chardev backend (only 'socket')")
    chardev_id = opts.get("id")
    if not isinstance(chardev_id, str) or not chardev_id:
        raise OptionError("chardev: no id specified")
    if chardev_id in known:
        raise OptionError(f"Duplicate ID '{chardev_id}' for chardev")
    server = parse_bool("server", opts["server"]) if "server" in opts else False
    if "wait" in opts:
        parse_bool("wait", opts["wait"])  # accepted; blockd never waits for a client
    path, fd_text = opts.get("path"), opts.get("fd")
    if isinstance(path, dict | list) or isinstance(fd_text, dict | list):
        raise OptionError("Invalid parameter 'path'")
    fd: int | None = None
    if fd_text is not None:
        if path is not None:
            raise OptionError("'path' and 'fd' are mutually exclusive")
        if not fd_text.isdigit():
            raise OptionError(f"Parameter 'fd' expects a file descriptor number, not '{fd_text}'")
        if not server:
            raise OptionError("'fd' needs server=on (an inherited listening socket)")
        fd = int(fd_text)
    elif not path:
        raise OptionError("chardev: socket: 'path' is missing")
    if path is not None:
        path = os.path.abspath(path)
    return ChardevSpec(chardev_id, path, fd, server, text)


def _monitor(text: str, known: dict[str, ChardevSpec], used: set[str]) -> MonitorSpec:
    opts = parse_keyval(text, implied_key="chardev")
    for key in opts:
        if key not in _MONITOR_KEYS:
            raise OptionError(f"Parameter '{key}' is unexpected")
    name = opts.get("chardev")
    if name is None:
        raise OptionError("Parameter 'chardev' is missing")
    mode = opts.get("mode", "control")
    if mode == "readline":
        raise OptionError("Only QMP is supported")
    if mode != "control":
        raise OptionError(f"Parameter 'mode' does not accept value '{mode}'")
    pretty = parse_bool("pretty", opts["pretty"]) if "pretty" in opts else False
    chardev = known.get(name)
    if chardev is None:
        raise OptionError(f'chardev "{name}" not found')
    if name in used:
        raise OptionError(f"Device '{name}' is in use")
    used.add(name)
    return MonitorSpec(chardev, pretty, text)


def parse_args(argv: Sequence[str]) -> Config:
    """Parse the daemon's command line (without the program name).

    Raises:
        CliError: an unknown option, a missing value, or a bad option value.
    """
    steps: list[Step] = []
    monitors: list[MonitorSpec] = []
    chardevs: dict[str, ChardevSpec] = {}
    used: set[str] = set()
    pidfile: str | None = None
    flags: set[str] = set()
    for option, value in _split_argv(argv):
        if value is None:
            flags.add({"-h": "--help", "-V": "--version"}.get(option, option))
            continue
        try:
            if option in _UNSUPPORTED:
                raise OptionError(f"{option} is not supported by blockd")
            if option == "--chardev":
                spec = _chardev(value, chardevs)
                chardevs[spec.id] = spec
                steps.append(spec)
            elif option == "--monitor":
                monitor = _monitor(value, chardevs, used)
                monitors.append(monitor)
                steps.append(monitor)
            elif option == "--socket":
                if not value:
                    raise OptionError("the socket path is empty")
                n = sum(1 for s in steps if isinstance(s, ChardevSpec) and s.id.startswith("#"))
                spec = ChardevSpec(f"#socket{n}", os.path.abspath(value), None, True, value)
                chardevs[spec.id] = spec
                used.add(spec.id)
                monitor = MonitorSpec(spec, False, value)
                monitors.append(monitor)
                steps += [spec, monitor]
            elif option == "--blockdev":
                options = parse_json_or_keyval(value, implied_key="driver")
                steps.append(BlockdevSpec(options, not value.lstrip().startswith("{"), value))
            elif option == "--pidfile":
                if not value:
                    raise OptionError("the pidfile path is empty")
                pidfile = os.path.abspath(value)
        except OptionError as exc:
            raise CliError(option, value, str(exc)) from exc
    return Config(
        steps=tuple(steps),
        pidfile=pidfile,
        daemonize="--daemonize" in flags,
        help="--help" in flags,
        version="--version" in flags,
        monitors=tuple(monitors),
        allow_header_json="--allow-header-json" in flags,
    )


def version_text() -> str:
    """What ``--version`` prints."""
    qemu = ".".join(str(part) for part in QEMU_VERSION)
    return (
        f"{PROG} {__version__}\n"
        f"QMP and block-job behaviour of QEMU {qemu} (qemu-storage-daemon drop-in)\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``blockd`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        from blockd.demo import main as demo_main

        return demo_main(args[1:])
    try:
        config = parse_args(args)
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if config.help:
        sys.stdout.write(USAGE)
        return 0
    if config.version:
        sys.stdout.write(version_text())
        return 0
    from blockd.run import run_daemon

    return run_daemon(config)
