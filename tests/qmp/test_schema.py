"""Schema loading, validation texts (docs/qemu-behaviour/qmp-protocol.md §6) and introspection
(§9) on small schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kit.schema import Oracle, metaschema_errors, probe

from blockd.errors import RequestError
from blockd.qmp.schema import Schema, SchemaError

TYPES: dict[str, Any] = {
    "Driver": {"type": "string", "enum": ["file", "qcow2", "null-co"]},
    "Aio": {
        "type": "string",
        "enum": ["threads", "native"],
        "x-qmp-value-features": {"native": ["unstable"]},
    },
    "FileOpts": {
        "type": "object",
        "properties": {"filename": {"type": "string"}, "aio": {"$ref": "Aio.json"}},
        "required": ["filename"],
    },
    "Generic": {
        "type": "object",
        "properties": {"file": {"$ref": "Ref.json"}},
        "required": ["file"],
    },
    "Qcow2Opts": {
        "type": "object",
        "allOf": [{"$ref": "Generic.json"}],
        "properties": {
            "backing": {"$ref": "RefOrNull.json"},
            "sizes": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "Options": {
        "type": "object",
        "x-qmp-union": "driver",
        "properties": {
            "driver": {"$ref": "Driver.json"},
            "node-name": {"type": "string"},
            "read-only": {"type": "boolean", "x-qmp-features": ["deprecated"]},
        },
        "required": ["driver"],
        "allOf": [
            {
                "if": {"properties": {"driver": {"const": "file"}}, "required": ["driver"]},
                "then": {"$ref": "FileOpts.json"},
            },
            {
                "if": {"properties": {"driver": {"const": "qcow2"}}, "required": ["driver"]},
                "then": {"$ref": "Qcow2Opts.json"},
            },
        ],
        "unevaluatedProperties": False,
    },
    "Ref": {"x-qmp-alternate": "Ref", "oneOf": [{"$ref": "Options.json"}, {"type": "string"}]},
    "RefOrNull": {
        "x-qmp-alternate": "RefOrNull",
        "oneOf": [{"$ref": "Options.json"}, {"type": "string"}, {"type": "null"}],
    },
    "Info": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "len": {"type": "integer"},
            "error": {"type": "string"},
        },
        "required": ["id", "len"],
        "additionalProperties": False,
    },
}
COMMANDS: dict[str, Any] = {
    "add": {"$ref": "../types/Options.json", "x-qmp-since": "2.9"},
    "stream": {
        "type": "object",
        "properties": {
            "job-id": {"type": "string"},
            "device": {"type": "string"},
            "speed": {"type": "integer"},
            "mask": {"type": "boolean", "x-qmp-since": "9.0"},
            "ratio": {"type": "number"},
            "on-error": {"type": "string", "enum": ["report", "ignore"]},
            "opaque": {},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "nested": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "string"}},
                "required": ["x"],
                "additionalProperties": False,
            },
        },
        "required": ["device"],
        "additionalProperties": False,
        "x-qmp-features": ["deprecated"],
    },
    "query": {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
        "x-qmp-returns": {"type": "array", "items": {"$ref": "../types/Info.json"}},
        "x-qmp-allow-oob": True,
    },
}
EVENTS: dict[str, Any] = {
    "DONE": {
        "type": "object",
        "properties": {"id": {"type": "string"}, "info": {"$ref": "../types/Info.json"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "PING": {"type": "object", "properties": {}, "additionalProperties": False},
}


def write(root: Path, files: dict[str, dict[str, Any]]) -> Path:
    for kind, table in files.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for name, contents in table.items():
            (root / kind / f"{name}.json").write_text(json.dumps(contents))
    return root


FILES: dict[str, dict[str, Any]] = {"commands": COMMANDS, "events": EVENTS, "types": TYPES}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    return Schema.load(write(tmp_path_factory.mktemp("schema"), FILES))


def test_files_are_draft_2020_12_schemas() -> None:
    assert metaschema_errors(FILES) == []
    assert metaschema_errors(INT_FILES) == []


OK: list[tuple[str, dict[str, Any]]] = [
    ("stream", {"device": "d"}),
    (
        "stream",
        {
            "device": "d",
            "speed": 2**63 - 1,
            "ratio": 1,
            "opaque": [None, {}],
            "tags": ["a", "b"],
            "nested": {"x": -(2**63)},
            "on-error": "ignore",
        },
    ),
    ("add", {"driver": "null-co", "node-name": "n"}),
    ("add", {"driver": "file", "filename": "f", "aio": "native", "read-only": True}),
    ("add", {"driver": "qcow2", "file": "node", "backing": None}),
    (
        "add",
        {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": "f"},
            "backing": {"driver": "qcow2", "file": "x", "backing": "y", "sizes": [1]},
        },
    ),
]


@pytest.mark.parametrize(("command", "arguments"), OK)
def test_valid(schema: Schema, command: str, arguments: dict[str, Any]) -> None:
    schema.validate_arguments(command, arguments)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("stream", {}, "Parameter 'device' is missing"),
    ("stream", {"device": 1}, "Invalid parameter type for 'device', expected: string"),
    (
        "stream",
        {"device": "d", "speed": 1.0},
        "Invalid parameter type for 'speed', expected: integer",
    ),
    (
        "stream",
        {"device": "d", "speed": True},
        "Invalid parameter type for 'speed', expected: integer",
    ),
    (
        "stream",
        {"device": "d", "speed": None},
        "Invalid parameter type for 'speed', expected: integer",
    ),
    (
        "stream",
        {"device": "d", "speed": 2**63},
        "Invalid parameter type for 'speed', expected: integer",
    ),
    (
        "stream",
        {"device": "d", "speed": -(2**63) - 1},
        "Invalid parameter type for 'speed', expected: integer",
    ),
    ("stream", {"device": "d", "mask": 1}, "Invalid parameter type for 'mask', expected: boolean"),
    (
        "stream",
        {"device": "d", "ratio": "1"},
        "Invalid parameter type for 'ratio', expected: number",
    ),
    ("stream", {"device": "d", "tags": "a"}, "Invalid parameter type for 'tags', expected: array"),
    (
        "stream",
        {"device": "d", "nested": []},
        "Invalid parameter type for 'nested', expected: object",
    ),
    ("stream", {"device": "d", "on-error": "x"}, "Parameter 'on-error' does not accept value 'x'"),
    (
        "stream",
        {"device": "d", "on-error": 1},
        "Invalid parameter type for 'on-error', expected: string",
    ),
    ("stream", {"device": "d", "tags": ["a", "c"]}, "Parameter 'null' does not accept value 'c'"),
    (
        "stream",
        {"device": "d", "tags": ["a", 1]},
        "Invalid parameter type for 'tags[1]', expected: string",
    ),
    ("stream", {"device": "d", "nested": {}}, "Parameter 'nested.x' is missing"),
    ("stream", {"device": "d", "nested": {"x": 1, "z": 2}}, "Parameter 'nested.z' is unexpected"),
    (
        "stream",
        {"device": "d", "nested": {"x": 1, "y": 2}},
        "Invalid parameter type for 'nested.y', expected: string",
    ),
    ("stream", {"device": "d", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    # schema order decides; unknown keys come last
    (
        "stream",
        {"speed": "x", "device": 1},
        "Invalid parameter type for 'device', expected: string",
    ),
    ("stream", {"bogus": 1, "speed": "x"}, "Parameter 'device' is missing"),
    (
        "stream",
        {"bogus": 1, "device": "d", "speed": "x"},
        "Invalid parameter type for 'speed', expected: integer",
    ),
    (
        "stream",
        {"zz": 1, "device": "d", "nested": {"x": "1"}},
        "Invalid parameter type for 'nested.x', expected: integer",
    ),
    (
        "stream",
        {"device": "d", "nested": {"q": 1}, "tags": 5},
        "Invalid parameter type for 'tags', expected: array",
    ),
    (
        "stream",
        {"device": "d", "nested": {"q": 1, "x": 1}, "zz": 1},
        "Parameter 'nested.q' is unexpected",
    ),
    ("stream", {"device": "d", "b": 1, "a": 2}, "Parameter 'b' is unexpected"),
    # flat union
    ("add", {}, "Parameter 'driver' is missing"),
    ("add", {"node-name": 1}, "Parameter 'driver' is missing"),
    ("add", {"driver": "nbd", "filename": "x"}, "Parameter 'driver' does not accept value 'nbd'"),
    ("add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
    ("add", {"driver": "file"}, "Parameter 'filename' is missing"),
    (
        "add",
        {"driver": "file", "filename": "f", "backing": "x"},
        "Parameter 'backing' is unexpected",
    ),
    (
        "add",
        {"driver": "file", "filename": "f", "aio": "x"},
        "Parameter 'aio' does not accept value 'x'",
    ),
    (
        "add",
        {"driver": "file", "filename": 1, "node-name": 2},
        "Invalid parameter type for 'node-name', expected: string",
    ),
    ("add", {"driver": "null-co", "filename": "f"}, "Parameter 'filename' is unexpected"),
    ("add", {"driver": "qcow2"}, "Parameter 'file' is missing"),
    ("add", {"driver": "qcow2", "backing": 1}, "Parameter 'file' is missing"),
    (
        "add",
        {"driver": "qcow2", "file": "f", "sizes": [1, 1.5]},
        "Invalid parameter type for 'sizes[1]', expected: integer",
    ),
    # alternates: the JSON type picks the branch; errors inside it have the full path
    ("add", {"driver": "qcow2", "file": 3}, "Invalid parameter type for 'file', expected: Ref"),
    ("add", {"driver": "qcow2", "file": None}, "Invalid parameter type for 'file', expected: Ref"),
    (
        "add",
        {"driver": "qcow2", "file": "f", "backing": 1},
        "Invalid parameter type for 'backing', expected: RefOrNull",
    ),
    ("add", {"driver": "qcow2", "file": {}}, "Parameter 'file.driver' is missing"),
    (
        "add",
        {"driver": "qcow2", "file": {"driver": "file"}},
        "Parameter 'file.filename' is missing",
    ),
    (
        "add",
        {"driver": "qcow2", "file": {"driver": "file", "filename": "x", "foo": 1}},
        "Parameter 'file.foo' is unexpected",
    ),
    (
        "add",
        {
            "driver": "qcow2",
            "file": "f",
            "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": 5}},
        },
        "Invalid parameter type for 'backing.file.filename', expected: string",
    ),
    (
        "add",
        {"driver": "qcow2", "file": "f", "backing": {"driver": "x"}},
        "Parameter 'driver' does not accept value 'x'",
    ),
    (
        "add",
        {"driver": "qcow2", "file": "f", "backing": [1]},
        "Invalid parameter type for 'backing', expected: RefOrNull",
    ),
    (
        "add",
        {"driver": "qcow2", "file": "f", "backing": None, "x": 1},
        "Parameter 'x' is unexpected",
    ),
]


@pytest.mark.parametrize(("command", "arguments", "desc"), BAD)
def test_invalid(schema: Schema, command: str, arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(RequestError) as info:
        schema.validate_arguments(command, arguments)
    assert info.value.desc == desc
    assert info.value.error_class == "GenericError"


def test_returns_and_events(schema: Schema) -> None:
    schema.validate_return("query", [{"id": "a", "len": 1}])
    with pytest.raises(ValueError, match=r"'\[0\].len' is missing"):
        schema.validate_return("query", [{"id": "a"}])
    schema.validate_return("stream", {})
    with pytest.raises(ValueError):
        schema.validate_return("stream", [])
    schema.validate_event("DONE", {"id": "x", "info": {"id": "x", "len": 2, "error": "e"}})
    with pytest.raises(ValueError, match=r"info\.error"):
        schema.validate_event("DONE", {"id": "x", "info": {"id": "x", "len": 2, "error": 1}})
    assert schema.events == frozenset({"DONE", "PING"})
    assert schema.commands == frozenset({"add", "stream", "query"})
    assert schema.allow_oob("query") and not schema.allow_oob("stream")
    assert schema.members("stream")[:3] == ["job-id", "device", "speed"]
    assert schema.members("add") == ["driver", "node-name", "read-only"]


# --- introspection -----------------------------------------------------------------------
def entities(schema: Schema) -> dict[str, dict[str, Any]]:
    info = schema.introspect()
    names = [e["name"] for e in info]
    assert len(names) == len(set(names)), "names must be unique"
    return {e["name"]: e for e in info}


def test_introspection_shapes(schema: Schema) -> None:
    e = entities(schema)
    for name, json_type in [
        ("str", "string"),
        ("int", "int"),
        ("bool", "boolean"),
        ("number", "number"),
        ("null", "null"),
        ("any", "value"),
    ]:
        assert e[name] == {"name": name, "meta-type": "builtin", "json-type": json_type}
    stream = e["stream"]
    assert stream["meta-type"] == "command" and stream["features"] == ["deprecated"]
    assert "allow-oob" not in stream
    args = e[stream["arg-type"]]
    assert args["meta-type"] == "object"
    assert [m["name"] for m in args["members"]] == list(COMMANDS["stream"]["properties"])
    members = {m["name"]: m for m in args["members"]}
    assert members["device"] == {"name": "device", "type": "str"}
    assert members["job-id"] == {"name": "job-id", "type": "str", "default": None}
    assert members["speed"]["type"] == "int" and members["ratio"]["type"] == "number"
    assert members["opaque"]["type"] == "any"
    assert members["tags"]["type"].startswith("[")
    tags = e[members["tags"]["type"]]
    assert tags["meta-type"] == "array" and e[tags["element-type"]]["values"] == ["a", "b"]
    on_error = e[members["on-error"]["type"]]
    assert on_error == {
        "name": on_error["name"],
        "meta-type": "enum",
        "members": [{"name": "report"}, {"name": "ignore"}],
        "values": ["report", "ignore"],
    }
    # masked names are decimal strings; the shared empty object
    for entity in e.values():
        if entity["meta-type"] in ("object", "enum", "alternate"):
            assert entity["name"].isdigit()
    query = e["query"]
    assert query["allow-oob"] is True
    assert e[query["arg-type"]] == {"name": query["arg-type"], "meta-type": "object", "members": []}
    assert stream["ret-type"] == query["arg-type"]
    assert e[query["ret-type"]]["meta-type"] == "array"
    assert e["PING"]["arg-type"] == query["arg-type"]
    assert e["DONE"]["meta-type"] == "event"


def test_introspection_union_and_alternate(schema: Schema) -> None:
    e = entities(schema)
    union = e[e["add"]["arg-type"]]
    assert union["tag"] == "driver"
    assert [m["name"] for m in union["members"]] == ["driver", "node-name", "read-only"]
    assert union["members"][2]["features"] == ["deprecated"]
    cases = {v["case"]: e[v["type"]] for v in union["variants"]}
    assert list(cases) == ["file", "qcow2", "null-co"]  # every tag value is a case
    assert cases["null-co"]["members"] == []
    assert [m["name"] for m in cases["qcow2"]["members"]] == ["file", "backing", "sizes"]
    assert "default" not in cases["qcow2"]["members"][0]
    assert cases["qcow2"]["members"][1]["default"] is None
    ref = e[cases["qcow2"]["members"][0]["type"]]
    assert ref["meta-type"] == "alternate"
    assert [
        e[m["type"]]["meta-type"] if m["type"].isdigit() else m["type"] for m in ref["members"]
    ] == ["object", "str"]
    ref_or_null = e[cases["qcow2"]["members"][1]["type"]]
    assert [m["type"] for m in ref_or_null["members"]][1:] == ["str", "null"]
    aio = e[cases["file"]["members"][1]["type"]]
    assert aio["members"] == [{"name": "threads"}, {"name": "native", "features": ["unstable"]}]


def test_libvirt_style_probes(schema: Schema) -> None:
    info = schema.introspect()
    assert probe(info, "stream/arg-type/mask")
    assert probe(info, "stream/arg-type/*mask")
    assert not probe(info, "stream/arg-type/*device")
    assert probe(info, "stream/arg-type/device")
    assert not probe(info, "stream/arg-type/nonexistent")
    assert probe(info, "stream/$deprecated")
    assert probe(info, "add/arg-type/+qcow2/backing")
    assert not probe(info, "add/arg-type/+file/backing")
    assert probe(info, "query/ret-type/len")
    assert probe(info, "stream/arg-type/on-error/^ignore")
    assert not probe(info, "stream/arg-type/on-error/^stop")
    assert probe(info, "DONE/arg-type/info/error")
    assert not probe(info, "nope/arg-type/x")


def test_introspect_returns_a_fresh_copy(schema: Schema) -> None:
    first = schema.introspect()
    first.clear()
    assert schema.introspect()


# --- loader errors -----------------------------------------------------------------------
LOAD_ERRORS: list[tuple[dict[str, Any], str]] = [
    (
        {
            "commands": {
                "x": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}
            }
        },
        "unsupported keyword 'minimum'",
    ),
    (
        {"commands": {"x": {"type": "object", "properties": {"a": {"$ref": "../types/No.json"}}}}},
        "cannot resolve",
    ),
    ({"commands": {"x": {"type": "string"}}}, "must describe an object"),
    ({"commands": {"x": {"type": "object", "additionalProperties": True}}}, "must be false"),
    ({"commands": {"x": {"type": "object", "$id": "urn:x"}}}, "do not write $id"),
    ({"commands": {"x": {"type": "nope"}}}, "commands/x.json"),
    (
        {
            "types": {
                "A": {"x-qmp-alternate": "A", "oneOf": [{"type": "string"}, {"type": "string"}]}
            }
        },
        "distinct JSON types",
    ),
    (
        {
            "types": {
                "A": {"x-qmp-alternate": "A", "oneOf": [{"type": "string"}]},
                "B": {"x-qmp-alternate": "A", "oneOf": [{"type": "integer"}]},
            }
        },
        "another alternate is named 'A'",
    ),
    (
        {"types": {"U": {"type": "object", "x-qmp-union": "kind", "properties": {}}}},
        "union tag 'kind' must be a required member",
    ),
]


def _command(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


_OPEN: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}}
_TAG: dict[str, Any] = {"type": "string", "enum": ["a", "b"]}


def _union(*branches: Any, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "x-qmp-union": "t",
        "properties": {"t": {"$ref": "Tag.json"}},
        "required": ["t"],
        "allOf": list(branches),
        "unevaluatedProperties": False,
        **extra,
    }


def _branch(case: Any, then: Any = None) -> dict[str, Any]:
    return {
        "if": {"properties": {"t": {"const": case}}, "required": ["t"]},
        "then": {"$ref": "Open.json"} if then is None else then,
    }


# The README's rules that keep blockd's reading of a file the same as jsonschema's.
RULE_ERRORS: list[tuple[dict[str, Any], str]] = [
    (
        {"commands": {"x": _command({"a": {"$ref": "../types/T.json", "type": "string"}})},
         "types": {"T": {"type": "string"}}},
        "only annotations may stand beside \\$ref, not 'type'",
    ),
    ({"commands": {"x": _command({"a": {"const": "v"}})}}, "'const' belongs in a union branch"),
    ({"commands": {"x": _command({"a": {"oneOf": [{"type": "string"}]}})}}, "x-qmp-alternate"),
    ({"commands": {"x": _command({"a": {"items": {}}})}}, 'items needs "type": "array"'),
    ({"commands": {"x": _command({"a": {"properties": {}}})}}, 'needs "type": "object"'),
    ({"commands": {"x": _command({"a": {"type": ["string", "null"]}})}}, "is not one of"),
    ({"commands": {"x": _command({"a": {"enum": ["v", 1]}})}}, "distinct strings"),
    ({"commands": {"x": _command({"a": _OPEN})}}, "close the object"),
    (
        {"commands": {"x": _command({"a": {"$ref": "../types/Open.json"}})},
         "types": {"Open": _OPEN}},
        "Open.json is open",
    ),
    (
        {"commands": {"x": _command({}, allOf=[{"$ref": "../types/Open.json"}])},
         "types": {"Open": _OPEN}},
        "closed by unevaluatedProperties",
    ),
    (
        {"types": {"Closed": {**_OPEN, "additionalProperties": False},
                   "D": {"type": "object", "allOf": [{"$ref": "Closed.json"}],
                         "unevaluatedProperties": False}}},
        "a base or union variant is an open object",
    ),
    (
        {"types": {"Open": _OPEN, "D": {"type": "object", "allOf": [{"$ref": "Open.json"}],
                                        "properties": {"a": {}}, "unevaluatedProperties": False}}},
        "member 'a' is declared twice",
    ),
    ({"commands": {"x": _command({}, required=["a"])}}, "required 'a' is not a member"),
    (
        {"types": {"Tag": {"type": "string"}, "Open": _OPEN, "U": _union()}},
        "union tag 't' must be an enum",
    ),
    (
        {"types": {"Tag": _TAG, "Open": _OPEN, "U": _union(_branch("c"))}},
        "'c' is no value of 't'",
    ),
    (
        {"types": {"Tag": _TAG, "Open": _OPEN, "U": _union(_branch("a"), _branch("a"))}},
        "a second branch for 'a'",
    ),
    (
        {"types": {"Tag": _TAG, "Open": _OPEN,
                   "U": _union({"if": {"properties": {"t": {"const": "a"}}}, "then": {}})}},
        "branch must test 't' with const",
    ),
    ({"types": {"Tag": _TAG, "U": _union(_branch("a", {}))}}, "must be an object"),
    (
        {"types": {"Tag": _TAG, "Open": _OPEN, "U": _union(),
                   "V": _union(_branch("a", {"$ref": "U.json"}))}},
        "an open object, not a union",
    ),
    (
        {"types": {"A": {"x-qmp-alternate": "A", "oneOf": [{"type": "integer"},
                                                            {"type": "number"}]}}},
        "distinct JSON types",
    ),
    ({"types": {"A": {"x-qmp-alternate": "A", "oneOf": [{}, {"type": "null"}]}}},
     "distinct JSON types"),
    (
        {"types": {"A": {"type": "object", "allOf": [{"$ref": "B.json"}]},
                   "B": {"type": "object", "allOf": [{"$ref": "A.json"}]}}},
        "its own base",
    ),
    (
        {"commands": {"x": {"$ref": "../types/A.json"}},
         "types": {"A": {"$ref": "B.json"}, "B": {"$ref": "A.json"}}},
        "a cycle of \\$refs",
    ),
    ({"commands": {"x": {"$ref": "../commands/y.json"}, "y": _command({})}}, "cannot resolve"),
    ({"commands": {"x": {"$ref": "../types/T.json#/properties"}}, "types": {"T": _OPEN}},
     "cannot resolve"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "message"), RULE_ERRORS)
def test_rule_errors(tmp_path: Path, files: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Schema.load(write(tmp_path, files))


def test_an_alternate_takes_its_branch_by_qtype(tmp_path: Path) -> None:
    """As QEMU: one QType for every number, so a float goes to an integer branch."""
    files = {
        "commands": {"x": _command({"a": {"$ref": "../types/A.json"}})},
        "types": {"A": {"x-qmp-alternate": "IntOrStr",
                        "oneOf": [{"type": "integer"}, {"type": "string"}]}},
    }  # fmt: skip
    schema = Schema.load(write(tmp_path, files))
    schema.validate_arguments("x", {"a": 1})
    schema.validate_arguments("x", {"a": "1"})
    for value, desc in [
        (1.5, "Invalid parameter type for 'a', expected: integer"),
        (None, "Invalid parameter type for 'a', expected: IntOrStr"),
        ([1], "Invalid parameter type for 'a', expected: IntOrStr"),
    ]:
        with pytest.raises(RequestError) as info:
            schema.validate_arguments("x", {"a": value})
        assert info.value.desc == desc
        assert not Oracle(files).accepts("commands", "x", {"a": value})


@pytest.mark.parametrize(("files", "message"), LOAD_ERRORS)
def test_load_errors(tmp_path: Path, files: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message.replace("$", r"\$")):
        Schema.load(write(tmp_path, files))


def test_load_missing_directory_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="not found"):
        Schema.load(tmp_path / "nope")
    (tmp_path / "commands").mkdir()
    (tmp_path / "commands" / "x.json").write_text("{")
    with pytest.raises(SchemaError, match=r"commands/x\.json"):
        Schema.load(tmp_path)


@pytest.mark.parametrize(
    ("command", "arguments"), [(c, a) for c, a in OK] + [(c, a) for c, a, _ in BAD]
)
def test_agrees_with_jsonschema(schema: Schema, command: str, arguments: dict[str, Any]) -> None:
    """blockd's validator accepts exactly what jsonschema accepts for the files."""
    original = Oracle(FILES).validator("commands", command)
    try:
        schema.validate_arguments(command, arguments)
        valid = True
    except RequestError:
        valid = False
    assert original.is_valid(arguments) == valid


def test_nested_blockdev_options_validate_fast(schema: Schema) -> None:
    import time

    options: dict[str, Any] = {"driver": "file", "filename": "base"}
    for i in range(6):
        options = {"driver": "qcow2", "node-name": f"n{i}", "file": "f", "backing": options}
    start = time.perf_counter()
    schema.validate_arguments("add", options)
    assert time.perf_counter() - start < 0.5


def test_nesting_limit(tmp_path: Path) -> None:
    """Objects and lists count as levels, the arguments object the first."""
    from blockd.qmp.validate import MAX_DEPTH, TOO_DEEP

    node = {
        "type": "object",
        "properties": {"n": {"$ref": "N.json"}, "l": {"$ref": "L.json"}},
        "additionalProperties": False,
    }
    files = {
        "commands": {"nest": {"$ref": "../types/N.json"}},
        "types": {"N": node, "L": {"type": "array", "items": {"$ref": "N.json"}}},
    }  # fmt: skip
    schema = Schema.load(write(tmp_path, files))

    def nested(levels: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        count = 1
        while count < levels:
            if count % 3 == 0 and count + 2 <= levels:
                value, count = {"l": [value]}, count + 2  # an object and a list
            else:
                value, count = {"n": value}, count + 1
        return value

    schema.validate_arguments("nest", nested(MAX_DEPTH))
    schema.validate_arguments("nest", {"l": [nested(MAX_DEPTH - 2)]})
    for deep in (nested(MAX_DEPTH + 1), {"l": [nested(MAX_DEPTH - 1)]}):
        with pytest.raises(RequestError, match=TOO_DEEP):
            schema.validate_arguments("nest", deep)


INT_FILES: dict[str, Any] = {
    "commands": {
        "ints": {
            "type": "object",
            "properties": {
                name: {"type": "integer", "x-qmp-int": name}
                for name in ("int8", "int32", "uint8", "uint32", "uint64", "size", "int64")
            }
            | {"list": {"type": "array", "items": {"type": "integer", "x-qmp-int": "int16"}}},
            "additionalProperties": False,
        }
    }
}
INTS: list[tuple[dict[str, Any], str | None]] = [
    (
        {
            "int8": -128,
            "uint8": 255,
            "int32": 2**31 - 1,
            "uint32": 0,
            "uint64": -1,
            "size": 2**64 - 1,
        },
        None,
    ),
    ({"int8": 128}, "Parameter 'int8' expects int8_t"),
    ({"int32": -(2**31) - 1}, "Parameter 'int32' expects int32_t"),
    ({"int32": "1"}, "Invalid parameter type for 'int32', expected: integer"),
    ({"uint8": -1}, "Parameter 'uint8' expects uint8_t"),
    ({"uint32": 2**32}, "Parameter 'uint32' expects uint32_t"),
    ({"uint32": "1"}, "Parameter 'uint32' expects uint64"),
    ({"uint64": 1.5}, "Parameter 'uint64' expects uint64"),
    ({"size": "1"}, "Parameter 'size' expects uint64"),
    ({"int64": 2**63}, "Invalid parameter type for 'int64', expected: integer"),
    ({"int32": 2**63}, "Invalid parameter type for 'int32', expected: integer"),
    ({"uint32": 2**64 - 1}, "Parameter 'uint32' expects uint32_t"),
    ({"uint64": 2**64}, "Parameter 'uint64' expects uint64"),
    ({"size": -(2**63) - 1}, "Parameter 'size' expects uint64"),
    ({"int64": True}, "Invalid parameter type for 'int64', expected: integer"),
    ({"list": [1, 40000]}, "Parameter 'null' expects int16_t"),
]


@pytest.mark.parametrize(("arguments", "desc"), INTS)
def test_integer_widths(tmp_path: Path, arguments: dict[str, Any], desc: str | None) -> None:
    schema = Schema.load(write(tmp_path, INT_FILES))
    if desc is None:
        schema.validate_arguments("ints", arguments)
    else:
        with pytest.raises(RequestError) as info:
            schema.validate_arguments("ints", arguments)
        assert info.value.desc == desc
    entity = {e["name"]: e for e in schema.introspect()}
    members = entity[entity["ints"]["arg-type"]]["members"]
    assert {m["type"] for m in members} == {"int", "[int]"}


def test_x_qmp_int_checked(tmp_path: Path) -> None:
    bad = {
        "commands": {
            "x": {"type": "object", "properties": {"a": {"type": "string", "x-qmp-int": "int32"}}}
        }
    }
    with pytest.raises(SchemaError, match="x-qmp-int"):
        Schema.load(write(tmp_path, bad))
