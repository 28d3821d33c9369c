"""Monitor control commands: ``query-version``, ``query-commands``, ``query-qmp-schema``,
``quit``. (``qmp_capabilities`` is answered inside the protocol core, which owns the
negotiation state; see :mod:`blockd.qmp.connection`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd import QEMU_VERSION, __version__
from blockd.commands.registry import COMMANDS, command

if TYPE_CHECKING:
    from blockd.daemon import Daemon

#: The commands the protocol core answers itself, without a handler in the registry.
CORE_COMMANDS = frozenset({"qmp_capabilities"})


def version_info() -> dict[str, Any]:
    """The ``VersionInfo`` of ``query-version`` and of the greeting
    (docs/qemu-behaviour/qmp-protocol.md §2).

    ``qemu`` is the QEMU release whose behaviour blockd follows (clients gate features on
    it, e.g. ``backing-mask-protocol`` from 9.0); ``package`` names blockd itself.
    """
    major, minor, micro = QEMU_VERSION
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": f"blockd {__version__}",
    }


@command("query-version")
async def query_version(d: Daemon) -> dict[str, Any]:
    """Return the :func:`version_info`."""
    return version_info()


@command("query-commands")
async def query_commands(d: Daemon) -> list[dict[str, str]]:
    """List every command usable in command mode: those with a schema and a handler."""
    names = set(d.schema.commands) & (set(COMMANDS) | CORE_COMMANDS)
    return [{"name": name} for name in sorted(names)]


@command("query-qmp-schema")
async def query_qmp_schema(d: Daemon) -> list[dict[str, Any]]:
    """Return the introspection of ``schema/`` in QEMU's ``SchemaInfo`` format
    (docs/qemu-behaviour/qmp-protocol.md §9)."""
    return list(d.schema.introspect())


@command("quit")
async def quit_(d: Daemon) -> dict[str, Any]:
    """Shut the daemon down; the reply goes out before the sockets close.

    As qemu-storage-daemon does, running jobs are cancelled (newest first) before the
    reply, so every monitor receives their final events before ``{"return": {}}``.
    """
    await d.jobs.cancel_all()
    d.request_shutdown()
    return {}
