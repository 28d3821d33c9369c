"""blockd side by side with QEMU's ``qemu-storage-daemon``: the same commands run by both,
and their answers compared field by field.

:func:`compare_with_qsd` runs a command list first on QEMU 10.0's daemon (over its
socket, :func:`kit.daemons.replies`), then on blockd in-process (:func:`blockd_replies`),
never both at once (the image locks would clash), and fails on any difference
(:func:`differences`) once generated names are renamed by position and what QEMU 10.0
lacks is dropped (:func:`normalize_nodes`). :func:`flatten_json_names` makes ``json:``
pseudo-filenames comparable (QEMU writes dotted keys in hash order).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from blockd.commands.registry import load_all
from blockd.daemon import Daemon
from blockd.errors import QMPError
from blockd.qmp.messages import error_response
from kit.daemons import replies
from kit.qemu import QSD_10
from kit.qmp import Reply

Commands = Sequence[tuple[str, Mapping[str, Any]]]


def qsd_replies(sock_dir: Path, commands: Commands, locks_of: Sequence[Path] = ()) -> list[Reply]:
    """:func:`kit.daemons.replies` of QEMU 10.0's daemon (the caller skips without it)."""
    assert QSD_10 is not None
    return replies([QSD_10], sock_dir, commands, locks_of)


async def blockd_replies(commands: Commands) -> list[Reply]:
    """``commands`` run by a fresh in-process daemon's handlers (unvalidated, as the
    server would after validation); the replies as QMP would send them."""
    d = Daemon()
    table = load_all()
    answers: list[Reply] = []
    try:
        for name, arguments in commands:
            try:
                answers.append({"return": await table[name].call(d, arguments)})
            except QMPError as exc:
                answers.append(error_response(exc.error_class, exc.desc))
    finally:
        await d.graph.close_all()
    return answers


def normalize_nodes(reply: Reply) -> Any:
    """A reply's value, node lists with generated names renamed by their position and
    ``children`` (QEMU 10.1) dropped."""
    value = reply.get("return", reply.get("error"))
    if not isinstance(value, list) or not all(isinstance(n, dict) for n in value):
        return value
    names = {
        n["node-name"]: f"#gen{i}" for i, n in enumerate(value) if n["node-name"].startswith("#")
    }
    text = json.dumps(value)
    for old, new in names.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    nodes = json.loads(text)
    for node in nodes:
        node.pop("children", None)
    return nodes


def differences(mine: Any, qemu: Any, where: str = "") -> list[str]:
    """Paths where the two JSON values differ, with both values."""
    if isinstance(mine, dict) and isinstance(qemu, dict):
        return [
            diff
            for key in sorted(set(mine) | set(qemu))
            for diff in differences(
                mine.get(key, "<absent>"), qemu.get(key, "<absent>"), f"{where}.{key}"
            )
        ]
    if isinstance(mine, list) and isinstance(qemu, list) and len(mine) == len(qemu):
        return [
            d
            for i, (a, b) in enumerate(zip(mine, qemu, strict=True))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    return [] if mine == qemu else [f"{where}: blockd {mine!r} != qemu {qemu!r}"]


async def compare_with_qsd(sock_dir: Path, commands: Commands) -> None:
    """``commands`` answered alike by QEMU 10.0's daemon and by blockd; the differences
    of a failing command are printed (pytest shows them with the failure)."""
    theirs = await trio.to_thread.run_sync(qsd_replies, sock_dir, commands)
    ours = await blockd_replies(commands)
    for (name, arguments), qemu, mine in zip(commands, theirs, ours, strict=True):
        found = differences(normalize_nodes(mine), normalize_nodes(qemu))
        print(name, arguments, *found, sep="\n  ")  # shown when the test fails
        assert not found, (name, arguments)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON value as dotted keys (``file.driver``) and list indices (``rules.0``)."""
    if isinstance(value, dict):
        items: list[tuple[str, Any]] = list(value.items())
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def flatten_json_names(value: Any) -> Any:
    """``value`` with every ``json:`` pseudo-filename in it replaced by its flattened
    option set (:func:`flatten`)."""
    if isinstance(value, str) and value.startswith("json:"):
        return {"json": flatten(json.loads(value[5:]))}
    if isinstance(value, dict):
        return {key: flatten_json_names(item) for key, item in value.items()}
    if isinstance(value, list):
        return [flatten_json_names(item) for item in value]
    return value
