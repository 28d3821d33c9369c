"""A small QMP client (trio) and the pieces ``blockctl`` is built from.

- :mod:`blockd.client.wire`: framing and message classes, no I/O.
- :mod:`blockd.client.connection`: :func:`connect` → :class:`Client` (execute, listen).
- :mod:`blockd.client.follow`: follow a job to its end (events + polling).
- :mod:`blockd.client.sizes`, :mod:`blockd.client.views`: human sizes, tables and trees.
- :mod:`blockd.client.ctl`: the ``blockctl`` command itself.
- :mod:`blockd.client.lab`: chains and daemons for examples and tests (``make_chain``,
  ``running_daemon``).

It speaks QMP over the socket only, so it drives blockd or any qemu-storage-daemon.
"""

from blockd.client.connection import (
    Client,
    ClientError,
    CommandError,
    ConnectError,
    ConnectionLost,
    connect,
)
from blockd.client.wire import Event, Greeting

__all__ = [
    "Client",
    "ClientError",
    "CommandError",
    "ConnectError",
    "ConnectionLost",
    "Event",
    "Greeting",
    "connect",
]
