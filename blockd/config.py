"""The daemon's configuration as its command line gives it: plain frozen values.

:mod:`blockd.cli` builds a :class:`Config` from ``argv``; :mod:`blockd.run` runs the daemon
it describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["PROG", "BlockdevSpec", "ChardevSpec", "CliError", "Config", "MonitorSpec", "Step"]

PROG: Final = "blockd"


class CliError(Exception):
    """A bad option: printed as ``blockd: <option> <value>: <message>``."""

    def __init__(self, option: str | None, value: str | None, message: str) -> None:
        where = option if value is None else f"{option} {value}"
        super().__init__(message if where is None else f"{where}: {message}")
        self.option, self.value, self.message = option, value, message


@dataclass(frozen=True)
class ChardevSpec:
    """A ``--chardev socket,...``: where one monitor listens (or connects)."""

    id: str
    path: str | None
    fd: int | None
    server: bool
    text: str


@dataclass(frozen=True)
class MonitorSpec:
    """A ``--monitor``: QMP on the chardev ``chardev``."""

    chardev: ChardevSpec
    pretty: bool
    text: str


@dataclass(frozen=True)
class BlockdevSpec:
    """A ``--blockdev``: ``options`` as parsed (keyval leaves still strings)."""

    options: dict[str, Any]
    keyval: bool
    text: str


Step = ChardevSpec | MonitorSpec | BlockdevSpec


@dataclass(frozen=True)
class Config:
    """The whole command line, options in the order given."""

    steps: tuple[Step, ...] = ()
    pidfile: str | None = None
    daemonize: bool = False
    help: bool = False
    version: bool = False
    monitors: tuple[MonitorSpec, ...] = field(default=())
    allow_header_json: bool = False
