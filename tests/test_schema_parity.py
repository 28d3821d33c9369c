"""Every command in ``schema/commands`` has a handler and every handler a schema file, and
each handler's keyword parameters are exactly the command's arguments."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from kit.repo import SCHEMA

from blockd.commands.control import CORE_COMMANDS
from blockd.commands.registry import load_all

SCHEMA_DIR = SCHEMA
COMMAND_FILES = {path.stem: path for path in (SCHEMA_DIR / "commands").glob("*.json")}
HANDLERS = load_all()


def test_every_schema_command_has_a_handler() -> None:
    missing = set(COMMAND_FILES) - set(HANDLERS) - CORE_COMMANDS
    assert not missing, f"schema files without a handler: {sorted(missing)}"


def test_every_handler_has_a_schema_file() -> None:
    missing = set(HANDLERS) - set(COMMAND_FILES)
    assert not missing, f"handlers without a schema file: {sorted(missing)}"


def test_core_commands_have_schema_files_and_no_handler() -> None:
    assert set(COMMAND_FILES) >= CORE_COMMANDS
    assert not CORE_COMMANDS & set(HANDLERS)


def _properties(name: str) -> tuple[dict[str, Any], set[str]] | None:
    """The top-level properties and required names, or None for a boxed ($ref) file."""
    schema = json.loads(COMMAND_FILES[name].read_text())
    if "$ref" in schema:
        return None
    return schema.get("properties", {}), set(schema.get("required", []))


@pytest.mark.parametrize("name", sorted(set(HANDLERS) & set(COMMAND_FILES)))
def test_handler_parameters_match_the_schema(name: str) -> None:
    command = HANDLERS[name]
    found = _properties(name)
    if command.raw or found is None:
        assert command.raw, f"{name}: a boxed schema needs a raw=True handler"
        return
    properties, required = found
    params = list(inspect.signature(command.handler).parameters.values())[1:]  # after daemon
    by_name = {p.name: p for p in params}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
    assert set(by_name) == {key.replace("-", "_") for key in properties}, name
    for key in properties:
        param = by_name[key.replace("-", "_")]
        has_default = param.default is not inspect.Parameter.empty
        assert has_default == (key not in required), f"{name}: {key}"
