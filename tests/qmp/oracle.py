"""jsonschema as the oracle for blockd's own validator (tests only).

blockd validates with a walk of its own (``blockd.qmp.validate``); the files in ``schema/``
stay standard draft 2020-12 JSON Schema, and here jsonschema judges them as such: the
metaschema check of every file, and what a value of a command, event or return type must
be. Two readings of the README are spelled out for jsonschema: ``"integer"`` is a JSON
integer (never ``1.0`` or ``true``: jsonschema's own ``integer`` takes ``1.0``, QEMU does
not), and its range, int64 or the one its ``x-qmp-int`` names, is a ``minimum``/``maximum``
pair. An unsigned type's range starts at -2^63, as QEMU wraps negative int64 values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.resources.abc import Traversable
from typing import Any, Final

import jsonschema
import referencing
import referencing.jsonschema
from jsonschema import Draft202012Validator

#: The URI the schema directory is mounted at inside the registry.
BASE_URI: Final = "https://blockd.invalid/schema/"
KINDS: Final = ("commands", "events", "types")
INT64: Final = (-(1 << 63), (1 << 63) - 1)
INT_RANGES: Final = {
    "int64": INT64,
    "uint64": (-(1 << 63), (1 << 64) - 1),
    "size": (-(1 << 63), (1 << 64) - 1),
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
}
Files = Mapping[str, Mapping[str, Any]]


def read_files(directory: Traversable) -> dict[str, dict[str, Any]]:
    """The parsed ``<kind>/<name>.json`` files under ``directory``."""
    files: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        files[kind] = {}
        for entry in (directory / kind).iterdir():
            if entry.name.endswith(".json"):
                files[kind][entry.name.removesuffix(".json")] = json.loads(entry.read_text())
    return files


def metaschema_errors(files: Files) -> list[str]:
    """``<kind>/<name>.json: <message>`` for every file that is no draft 2020-12 schema."""
    errors = []
    for kind, table in files.items():
        for name, contents in sorted(table.items()):
            try:
                Draft202012Validator.check_schema(contents)
            except jsonschema.SchemaError as exc:
                errors.append(f"{kind}/{name}.json: {exc.message}")
    return errors


def _is_integer(checker: Any, instance: object) -> bool:
    return type(instance) is int


Validator: Final = jsonschema.validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def spelled_out(node: Any) -> Any:
    """A copy of ``node`` with each integer's range also written as ``minimum``/``maximum``."""
    if isinstance(node, list):
        return [spelled_out(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: spelled_out(value) for key, value in node.items()}
    if node.get("type") == "integer":
        copy["minimum"], copy["maximum"] = INT_RANGES[node.get("x-qmp-int", "int64")]
    return copy


class Oracle:
    """What jsonschema accepts for the files ``files`` (kind -> name -> contents)."""

    def __init__(self, files: Files) -> None:
        resources = [
            (
                f"{BASE_URI}{kind}/{name}.json",
                referencing.jsonschema.DRAFT202012.create_resource(spelled_out(contents)),
            )
            for kind, table in files.items()
            for name, contents in table.items()
        ]
        self.registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources)
        self._validators: dict[str, Any] = {}

    def validator(self, kind: str, name: str, pointer: str = "") -> Any:
        """The validator of ``<kind>/<name>.json`` (or of the JSON pointer in it)."""
        uri = f"{BASE_URI}{kind}/{name}.json" + (f"#{pointer}" if pointer else "")
        if uri not in self._validators:
            self._validators[uri] = Validator({"$ref": uri}, registry=self.registry)
        return self._validators[uri]

    def accepts(self, kind: str, name: str, instance: Any) -> bool:
        """Whether ``instance`` is valid for the file ``<kind>/<name>.json``."""
        return bool(self.validator(kind, name).is_valid(instance))
