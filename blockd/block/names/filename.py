"""QEMU's names for nodes: plain filenames, ``blkdebug:`` names and ``json:`` filenames.

A node whose options change what data it shows (``STRONG_OPTIONS``), or whose backing link
is not the one its image header names, cannot be named by a path: QEMU then names it by the
options that would reopen it, printed as ``json:{...}`` in its QDict order.

References:
    - qemu/qemu: block.c (``bdrv_refresh_filename``, ``bdrv_backing_overridden``,
      ``bdrv_gather_child_options``); ``strong_runtime_opts`` of each driver.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from blockd.qdict import qdict_order

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

__all__ = ["ALWAYS_JSON", "STRONG_OPTIONS", "full_open_options", "json_filename", "node_filename"]

#: options that change what data a node shows; a node with any of them set is named by a
#: ``json:`` filename, as QEMU's ``bdrv_refresh_filename`` does
STRONG_OPTIONS: dict[str, tuple[str, ...]] = {
    "raw": ("offset", "size"),
    "blkdebug": (
        "config",
        "inject-error",
        "set-state",
        "align",
        "max-transfer",
        "opt-write-zero",
        "max-write-zero",
        "opt-discard",
        "max-discard",
    ),
}
#: drivers that declare no strong options, so QEMU always names their nodes ``json:``
ALWAYS_JSON: frozenset[str] = frozenset({"copy-on-read"})


def json_filename(options: dict[str, Any]) -> str:
    """``json:`` and the options, printed as QEMU prints its options QDict (hash order)."""

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: ordered(value[key]) for key in qdict_order(value)}
        if isinstance(value, list):
            return [ordered(item) for item in value]
        return value

    return "json:" + json.dumps(ordered(options))


#: QAPI member order of BlkdebugInjectErrorOptions / BlkdebugSetStateOptions
_MEMBER_RANK: dict[str, int] = {
    name: i
    for i, name in enumerate(
        ("event", "state", "iotype", "errno", "sector", "once", "immediately", "new_state")
    )
}


def _member_rank(name: str) -> int:
    return _MEMBER_RANK.get(name, len(_MEMBER_RANK))


def _flatten(key: str, value: Any) -> dict[str, Any]:
    """``{key: value}`` with lists and dicts inside ``value`` turned into dotted keys."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        # a list of objects (blkdebug's rules): QEMU's options QDict ends up holding
        # its members grouped by member name, in reverse QDict order of the names, and
        # by list index inside a group (found by comparison with QSD 10.0)
        names = sorted({k for v in value for k in v}, key=_member_rank)
        out: dict[str, Any] = {}
        for name in reversed(qdict_order(names)):
            for i, item in enumerate(value):
                if name in item:
                    out.update(_flatten(f"{key}.{i}.{name}", item[name]))
        return out
    if isinstance(value, list):
        items = [(str(i), item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        # QEMU's QDict of the member was built by the QAPI output visitor (schema member
        # order); its members reach the node's options in reverse hash order (found by
        # comparison with qemu-storage-daemon 10.0)
        keys = sorted(value, key=_member_rank)
        items = [(sub, value[sub]) for sub in reversed(qdict_order(keys))]
    else:
        return {key: value}
    flat: dict[str, Any] = {}
    for sub, item in items:
        flat.update(_flatten(f"{key}.{sub}", item))
    return flat


def full_open_options(node: BlockNode) -> dict[str, Any]:
    """The options that reopen exactly ``node`` (what its ``json:`` filename prints)."""
    if node.implicit and node.file is not None:
        return full_open_options(node.file)
    if node.is_protocol and node.drv == "file":
        return {"driver": "file", "filename": node.driver.filename}
    options: dict[str, Any] = {"driver": node.drv}
    strong: dict[str, Any] = {}
    for key in STRONG_OPTIONS.get(node.drv, ()):
        if key in node.options:
            # list options (blkdebug's rule lists) appear flattened, as QEMU's
            # options QDict holds them: inject-error.0.event
            strong.update(_flatten(key, node.options[key]))
    # QEMU copies them by walking its flattened options QDict, which reverses the
    # order inside a hash bucket once more
    for key in reversed(strong):
        options[key] = strong[key]
    overridden = node.backing_overridden
    for role, child in node.children.items():
        if role != "backing" or overridden or node.is_filter:
            options[role] = full_open_options(child)
    if overridden and node.backing is None:
        options["backing"] = None
    return options


def node_filename(node: BlockNode, known: dict[BlockNode, str] | None = None) -> str:
    """QEMU's filename of ``node``: the driver's, ``blkdebug:<config>:<image>``, or
    ``json:{...}`` when options or an overridden backing link make a plain path ambiguous
    (``bdrv_refresh_filename``).

    Whether a backing link is overridden depends on the backing node's filename, which
    depends on its own backing link: the names are worked out from the bottom of the
    backing chain up, in a loop, so that a chain of any length is named without
    recursion (and each image once). ``known``: names of nodes whose subtree has not
    changed since, kept by a caller that names a chain level by level (and filled in).
    """
    names = {} if known is None else known
    chain = [node]
    below = node.backing if node.driver.supports_backing else None
    while below is not None and below not in names:
        chain.append(below)
        below = below.backing if below.driver.supports_backing else None
    for image in reversed(chain):
        names[image] = _filename(image, _overridden(image, names))
    return names[node]


def _overridden(node: BlockNode, names: dict[BlockNode, str]) -> bool:
    """:attr:`BlockNode.backing_overridden`, with the backing node's name from ``names``
    when it is there."""
    backing = node.backing
    if not node.driver.supports_backing or backing is None or backing not in names:
        return node.backing_overridden
    return node.auto_backing_file != names[backing]


def _filename(node: BlockNode, overridden: bool) -> str:
    if (node.implicit or node.driver.names_as_child) and node.file is not None:
        return node.file.filename
    strong = [key for key in STRONG_OPTIONS.get(node.drv, ()) if key in node.options]
    if node.drv in ALWAYS_JSON or overridden:
        return json_filename(full_open_options(node))
    if node.drv == "blkdebug" and node.file is not None:
        image = node.file.filename
        if (strong and strong != ["config"]) or image.startswith("json:"):
            return json_filename(full_open_options(node))
        return f"blkdebug:{node.options.get('config', '')}:{image}"
    if strong:
        return json_filename(full_open_options(node))
    name = node.driver.filename
    if name.startswith("json:") and node.file is not None and not node.is_protocol:
        # the child has no plain name: QEMU names this node by its own options
        return json_filename(full_open_options(node))
    return name
