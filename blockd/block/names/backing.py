"""Backing file names as image headers record them: where a name points, and the
blockdev options that open it.

A qcow2 header names its backing file as a string. Relative names are relative to the
image's directory; ``json:{...}`` pseudo-filenames and protocol prefixes are data from
the image that could point the daemon at any host file or service, so they are followed
only on the daemon's opt-in. The legacy ``blkdebug:<config>:<image>`` form opens a
``blkdebug`` node over the image.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Final

from blockd.block.drivers import DRIVERS
from blockd.block.host import files
from blockd.block.node import BlockNode
from blockd.errors import RequestError

_PROTOCOL_PREFIX: Final = re.compile(r"[A-Za-z0-9_+.-]+:")
QCOW2_MAGIC: Final = b"QFI\xfb"


def resolve_backing_path(image_filename: str, backing: str) -> str:
    """The backing file name ``backing`` as seen from the image ``image_filename``:
    relative names are relative to the image's directory (QEMU's ``path_combine``)."""
    if os.path.isabs(backing) or _PROTOCOL_PREFIX.match(backing) or not image_filename:
        return backing
    return os.path.join(os.path.dirname(image_filename), backing)


def recorded_format(node: BlockNode, mask_protocol: bool) -> str:
    """The format name an overlay's header records for ``node`` as its backing file:
    the node's driver, or ``raw`` for a protocol node when ``mask_protocol`` (QEMU's
    ``backing-mask-protocol`` of ``block-stream`` and ``block-commit``)."""
    if mask_protocol and node.is_protocol:
        return "raw"
    return node.drv


def image_path(node: BlockNode) -> str:
    """The path of the file under ``node`` (its protocol node's): relative backing names
    are resolved against its directory even when ``node`` has a ``json:`` filename."""
    below = node
    while not below.is_protocol and below.file is not None:
        below = below.file
    return below.driver.filename


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        where = tree
        for part in parts[:-1]:
            where = where.setdefault(part, {})
        where[parts[-1]] = _unflatten(value) if isinstance(value, dict) else value
    return tree


async def _probe_format(path: str) -> str:
    """qcow2 or raw, from the first bytes of ``path``: read off the event loop, only from
    a regular file (a FIFO named by a header must not block the daemon); anything else
    probes as raw and the open proper reports why it cannot be used."""
    magic = await files.read_prefix(path, len(QCOW2_MAGIC))
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def check_header_name_passes(options: Mapping[str, Any]) -> None:
    """QEMU opens an inline backing node whose options lack ``file.filename`` with the
    header's backing file name as its filename (block.c, ``bdrv_open_backing_file``).
    The name travels down the data children (``file``, blkdebug's ``image``) until a
    node takes it: one that also has an explicit ``filename`` or is a reference to an
    existing node refuses it. Raise the error QEMU raises there, if any.

    Raises:
        RequestError: ``Can't specify 'file' and 'filename' options at the same time``
            or ``Cannot reference an existing block device with additional options or
            a new filename``.
    """
    first = options.get("file")
    if isinstance(first, Mapping) and "filename" in first:
        return  # file.filename given: the header name is not used
    node: Mapping[str, Any] = options
    while True:
        child = node.get("image" if node.get("driver") == "blkdebug" else "file")
        if isinstance(child, str):
            raise RequestError(
                "Cannot reference an existing block device with additional options "
                "or a new filename"
            )
        if not isinstance(child, Mapping):
            return
        if "filename" in child:
            raise RequestError("Can't specify 'file' and 'filename' options at the same time")
        node = child


async def header_backing_options(
    node: BlockNode, name: str, fmt: str | None, *, allow_json: bool
) -> dict[str, Any]:
    """The blockdev options that open the backing file ``name`` recorded in the
    header of ``node`` with format ``fmt`` (probed as qcow2 or raw when ``None``).

    A header name is data from the image: a ``json:`` pseudo-filename or a protocol
    prefix (``nbd:``, ``blkdebug:``, ``file:`` ...) could make the daemon open any
    host file or service, so it is refused unless ``allow_json`` is set (the daemon's
    ``--allow-header-json``). Plain relative and absolute paths are followed as QEMU
    follows them.

    Raises:
        RequestError: such a name without the opt-in, or a malformed ``json:`` name.
    """
    if not allow_json and _PROTOCOL_PREFIX.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise RequestError(
            f"The backing file name '{shown}' in the header of '{image_path(node)}' "
            "is a json: or protocol name, which blockd follows only when started "
            "with --allow-header-json (or give 'backing' explicitly)"
        )
    if name.startswith("json:"):
        try:
            parsed = json.loads(name[5:])
        except ValueError as exc:
            raise RequestError(f"Could not parse the JSON options: {exc}") from exc
        if not isinstance(parsed, dict):
            raise RequestError("Invalid JSON object given")
        opts = _unflatten(parsed)
        if fmt and "driver" not in opts:
            opts["driver"] = fmt
        return opts
    legacy = _legacy_options(name, os.path.dirname(image_path(node)))
    if legacy is not None:  # blkdebug:<config>:<image>, under the recorded format
        image = legacy["image"]["filename"]
        return {"driver": fmt or await _probe_format(image), "file": legacy}
    path = resolve_backing_path(image_path(node), name)
    if fmt is None:
        fmt = await _probe_format(path)
    cls = DRIVERS.get(fmt)
    if cls is not None and cls.protocol_name is not None:
        return {"driver": fmt, "filename": path}
    return {"driver": fmt, "file": {"driver": "file", "filename": path}}


def _legacy_options(name: str, base_dir: str) -> dict[str, Any] | None:
    """The options of a legacy ``<prefix>:...`` filename a driver understands, if any."""
    for cls in DRIVERS.values():
        if cls.filename_prefix is not None and name.startswith(cls.filename_prefix):
            return cls.parse_filename(name, base_dir)
    return None
