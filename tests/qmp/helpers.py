"""Helpers for the QMP core tests: feeding byte splits, a libvirt-style schema probe."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from blockd.qmp.framing import JSONStream, Message, ParseError


def feed(chunks: Iterable[bytes]) -> list[Message | ParseError]:
    """Feed ``chunks`` one by one into a fresh stream; all items, in order."""
    stream = JSONStream()
    items: list[Message | ParseError] = []
    for chunk in chunks:
        stream.feed(chunk)
        while (item := stream.next()) is not None:
            items.append(item)
    return items


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the (sorted, deduplicated) offsets ``cuts``."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def probe(schema: list[dict[str, Any]], query: str) -> bool:
    """Whether a libvirt-style query path resolves in a ``query-qmp-schema`` answer.

    The language of libvirt's ``virQEMUQAPISchemaPathExists`` (docs/clients.md §2.2): the
    first
    component names a command or event; then ``arg-type``/``ret-type`` follow that member;
    a plain component names an object member (``*name``: it must be optional, i.e. have a
    ``default``), ``+case`` selects a union variant, ``^value`` tests an enum value and
    ``$feature`` a feature. Arrays are looked through to their element type.
    """
    entities = {entity["name"]: entity for entity in schema}
    parts = query.split("/")
    current = entities.get(parts[0])
    for part in parts[1:]:
        while current is not None and current["meta-type"] == "array":
            current = entities.get(current["element-type"])
        if current is None:
            return False
        if part in ("arg-type", "ret-type"):
            current = entities.get(current.get(part, ""))
        elif part.startswith("$"):
            return part[1:] in current.get("features", [])
        elif part.startswith("^"):
            return current["meta-type"] == "enum" and part[1:] in current["values"]
        elif part.startswith("+"):
            variants = {v["case"]: v["type"] for v in current.get("variants", [])}
            current = entities.get(variants.get(part[1:], ""))
        else:
            optional = part.startswith("*")
            name = part.lstrip("*")
            members = {m["name"]: m for m in current.get("members", []) if "name" in m}
            if current["meta-type"] != "object" or name not in members:
                return False
            if optional and "default" not in members[name]:
                return False
            current = entities.get(members[name]["type"])
    return current is not None
