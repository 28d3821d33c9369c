"""The table of QMP commands and the decorator that fills it.

A handler is an ``async`` function taking the :class:`~blockd.daemon.Daemon` and the
command's arguments as keyword arguments, with the wire names' hyphens turned into
underscores (``job-id`` → ``job_id``); only top-level names are converted. A handler
registered with ``raw=True`` receives the arguments object unchanged as one mapping
instead (``blockdev-add``, whose options are a whole tree of wire names).

Arguments reach a handler only after they were validated against the command's file in
``schema/``, so a handler may trust their types. A handler returns the ``return`` value
(``{}`` for commands without one) or raises :class:`~blockd.errors.QMPError`.

Handlers live in the other modules of :mod:`blockd.commands`, one module per area, listed
in :data:`HANDLER_MODULES` and imported by :func:`load_all` (a listed name, not a scan of
the folder: scanning cost start-up time, and not every module holds handlers).
``tests/test_schema_parity.py`` fails if a schema command has no handler.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from blockd.daemon import Daemon

Handler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class Command:
    """One registered QMP command."""

    name: str
    handler: Handler
    raw: bool = False

    async def call(self, daemon: Daemon, arguments: Mapping[str, Any]) -> Any:
        """Run the handler with already-validated ``arguments``."""
        if self.raw:
            return await self.handler(daemon, dict(arguments))
        kwargs = {key.replace("-", "_"): value for key, value in arguments.items()}
        return await self.handler(daemon, **kwargs)


COMMANDS: Final[dict[str, Command]] = {}


def command(name: str, *, raw: bool = False) -> Callable[[H], H]:
    """Register the decorated coroutine function as the handler of QMP command ``name``."""

    def register(handler: H) -> H:
        if name in COMMANDS:
            raise RuntimeError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, handler, raw)
        return handler

    return register


#: The modules of :mod:`blockd.commands` whose handlers fill the table.
HANDLER_MODULES: Final = ("block", "commit", "control", "jobs", "stream")


def load_all() -> Mapping[str, Command]:
    """Import every handler module of this package and return the full table."""
    for name in HANDLER_MODULES:
        importlib.import_module(f"blockd.commands.{name}")
    return COMMANDS
