"""The error tree of blockd.

Every error that reaches a QMP client is a :class:`QMPError`: it carries the QMP error
class and the human-readable ``desc`` that the reply needs. Only the protocol core
(:meth:`blockd.qmp.connection.Connection.error`) turns one into ``{"error": {...}}``. The
subclasses say whose fault the error is::

    BlockdError
    ├── QMPError                 anything a client may see as {"error": ...};    GenericError
    │   │                        raised as such only for blockd's own bugs
    │   │                        ("Internal error: ...", blockd.server)
    │   ├── RequestError         the request is wrong (bad arguments, bad state)  GenericError
    │   │   ├── CommandNotFound  unknown command, wrong negotiation mode         CommandNotFound
    │   │   ├── DeviceNotActive  block-job-* on an unknown job                    DeviceNotActive
    │   │   └── DeviceNotFound   block-commit on an unknown device                DeviceNotFound
    │   ├── ImageError           an image's contents are corrupt or unsupported  GenericError
    │   └── HostError            the host failed us (I/O error, no space)        GenericError
    └── SchemaError              a file in schema/ is broken: the installation's
                                 fault, raised at load (blockd.qmp.schema); never sent

Input that is not JSON is no exception: :mod:`blockd.qmp.framing` yields a ``ParseError``
value, answered as GenericError without ``id``. QEMU sends DeviceNotFound for few
commands: of blockd's, ``block-commit`` with an unknown ``device`` (``block-stream``
reports one as GenericError; docs/qemu-behaviour/block-stream.md §3).

I/O failures inside the block layer stay ``OSError`` with their ``errno`` (the
``on-error: enospc`` policy needs it); code that reports them to a client wraps them in
:class:`HostError` ``from`` the original.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import ClassVar


class BlockdError(Exception):
    """Base class of every error blockd raises on purpose."""


class QMPError(BlockdError):
    """An error a QMP client may receive.

    Args:
        desc: the human-readable text sent as ``error.desc``; clients match on it, so it
            follows QEMU's wording exactly where QEMU has one.
    """

    error_class: ClassVar[str] = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class RequestError(QMPError):
    """The client asked for something invalid; nothing was changed."""


class CommandNotFound(RequestError):
    error_class = "CommandNotFound"


class DeviceNotActive(RequestError):
    error_class = "DeviceNotActive"


class DeviceNotFound(RequestError):
    error_class = "DeviceNotFound"


class ImageError(QMPError):
    """An image file is corrupt, truncated or uses a feature blockd does not support."""


class HostError(QMPError):
    """The host failed an operation: an ``OSError`` shown to a client.

    Args:
        desc: the text for the client, in QEMU's wording.
        errno: the errno value, kept for error policies.
    """

    def __init__(self, desc: str, *, errno: int = _errno.EIO) -> None:
        super().__init__(desc)
        self.errno = errno

    @classmethod
    def from_oserror(cls, exc: OSError) -> HostError:
        """Wrap ``exc``: its strerror text, as QEMU prints it (EIO when it has no errno)."""
        code = exc.errno if exc.errno is not None else _errno.EIO
        return cls(os.strerror(code), errno=code)
