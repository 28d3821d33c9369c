"""The errors of blockd's QMP clients, shared by the trio and the blocking transport.

Every ``str()`` is meant for people: it says what went wrong and what to try.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "ClientError",
    "CommandError",
    "ConnectError",
    "ConnectionLost",
    "describe_connect_error",
    "no_greeting",
    "unusable_monitor",
]


class ClientError(Exception):
    """Base of every error raised by this client; ``str()`` is meant for people."""


class ConnectError(ClientError):
    """Could not reach a QMP monitor at the given address."""


class ConnectionLost(ClientError):
    """The server closed the connection (or sent garbage) while we were using it."""


class CommandError(ClientError):
    """The server answered a command with ``{"error": ...}``.

    Attributes:
        command: the command name.
        error_class: QMP error class (``GenericError``, ``DeviceNotActive``, ...).
        desc: the server's message, unchanged.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


def describe_connect_error(path: str, exc: OSError) -> str:
    """A one-line explanation of why connecting to the UNIX socket ``path`` failed."""
    code = exc.errno
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        return f"{path}: not a socket; pass the daemon's QMP socket with -s PATH"
    if code == errno.ENOENT:
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"{path}: no such directory; is the socket path right?"
        return f"{path}: no such socket; is the daemon running? (start it, or pass -s PATH)"
    if code == errno.ECONNREFUSED:
        return f"{path}: connection refused; the daemon is not running (stale socket file)"
    if code in (errno.ENOTSOCK, errno.ENOTDIR):
        return f"{path}: not a socket; pass the daemon's QMP socket with -s PATH"
    if code in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied; run as a user that may open the socket"
    return f"{path}: cannot connect: {exc.strerror or exc}"


def no_greeting(path: str, timeout: float) -> ConnectError:
    """The error for a socket that sent no greeting within ``timeout`` seconds."""
    return ConnectError(
        f"{path}: no QMP greeting within {timeout:g}s; is another client holding "
        "the monitor, or is this not a QMP socket?"
    )


def unusable_monitor(path: str, exc: Exception) -> ConnectError:
    """The error for a peer whose greeting or negotiation was not QMP's."""
    return ConnectError(f"{path}: not a usable QMP monitor: {exc}")
