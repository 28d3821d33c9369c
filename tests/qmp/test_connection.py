"""The sans-IO session: negotiation, envelope checks, OOB, events, replies
(docs/qemu-behaviour/qmp-protocol.md §2-§6).

A small schema built in memory keeps these tests independent of ``schema/``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit.qmp import split

from blockd.errors import DeviceNotActive, RequestError
from blockd.events import make_event
from blockd.qdict import qdict_order
from blockd.qmp.connection import NEED_DATA, NO_ID, Connection, Output, Request
from blockd.qmp.framing import JSONStream, Message
from blockd.qmp.messages import encode, version_info
from blockd.qmp.schema import Schema

FILES: dict[str, dict[str, Any]] = {
    "commands": {
        "qmp_capabilities": {
            "type": "object",
            "properties": {
                "enable": {"type": "array", "items": {"$ref": "../types/QMPCapability.json"}}
            },
            "additionalProperties": False,
        },
        "echo": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "count": {"type": "integer"}},
            "required": ["text"],
            "additionalProperties": False,
            "x-qmp-returns": {"type": "string"},
        },
        "ping": {
            "type": "object",
            "properties": {},
            "additionalProperties": False,
            "x-qmp-allow-oob": True,
        },
    },
    "types": {"QMPCapability": {"type": "string", "enum": ["oob"]}},
}


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema(FILES)


def make(schema: Schema, **kwargs: Any) -> Connection:
    return Connection(schema, version=version_info(), **kwargs)


def run(conn: Connection, chunks: list[bytes]) -> list[Any]:
    """Feed ``chunks``; answer every Request with ``{"echo": <request>}``; decoded output."""
    out: list[Any] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, Request):
                data = conn.reply(
                    event, {"ran": event.command, "args": event.arguments, "oob": event.oob}
                )
            else:
                assert isinstance(event, Output)
                data = event.data
            assert data.endswith(b"\r\n") and data.count(b"\n") == 1
            out.append(json.loads(data))
    return out


def err(desc: str, cls: str = "GenericError", **id_: Any) -> dict[str, Any]:
    return {**id_, "error": {"class": cls, "desc": desc}}


NEGOTIATION = "Expecting capabilities negotiation with 'qmp_capabilities'"
CAPS = b'{"execute": "qmp_capabilities"}'
CAPS_OOB = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'

SCRIPTS: list[tuple[str, bytes, list[Any]]] = [
    (
        "negotiate",
        CAPS + b'{"execute": "echo", "arguments": {"text": "hi"}, "id": 1}',
        [
            {"return": {}},
            {"return": {"ran": "echo", "args": {"text": "hi"}, "oob": False}, "id": 1},
        ],
    ),
    (
        "before-negotiation",
        b'{"execute": "echo", "id": "a"}{"execute": "nope", "id": 2}',
        [err(NEGOTIATION, "CommandNotFound", id="a"), err(NEGOTIATION, "CommandNotFound", id=2)],
    ),
    (
        "not-rewritten",
        b'{"id": 3}{"execute": 1}[]',
        [
            err("QMP input lacks member 'execute'", id=3),
            err("QMP input member 'execute' must be a string"),
            err("QMP input must be a JSON object"),
        ],
    ),
    (
        "parse-error-no-id",
        b'{"execute": @}',
        [err("JSON parse error, stray '@'"), err("JSON parse error, expecting value")],
    ),
    (
        "caps-twice",
        CAPS + b'{"execute": "qmp_capabilities", "id": 9}',
        [
            {"return": {}},
            err(
                "Capabilities negotiation is already complete, command ignored",
                "CommandNotFound",
                id=9,
            ),
        ],
    ),
    (
        "caps-bad-enum",
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}' + CAPS,
        [err("Parameter 'null' does not accept value 'x'"), {"return": {}}],
    ),
    (
        "unknown",
        CAPS + b'{"execute": "no-such-cmd", "id": [1]}',
        [
            {"return": {}},
            err("The command no-such-cmd has not been found", "CommandNotFound", id=[1]),
        ],
    ),
    (
        "arguments-default",
        CAPS + b'{"execute": "ping"}',
        [{"return": {}}, {"return": {"ran": "ping", "args": {}, "oob": False}}],
    ),
    (
        "validation",
        CAPS + b'{"execute": "echo", "arguments": {"count": 1.0}, "id": null}'
        b'{"execute": "echo", "arguments": {"text": "x", "count": 1.0}}'
        b'{"execute": "echo", "arguments": {"text": "x", "zz": 1}}',
        [
            {"return": {}},
            err("Parameter 'text' is missing", id=None),
            err("Invalid parameter type for 'count', expected: integer"),
            err("Parameter 'zz' is unexpected"),
        ],
    ),
    (
        "oob-not-negotiated",
        CAPS + b'{"exec-oob": "ping"}',
        [{"return": {}}, err("QMP input member 'exec-oob' is unexpected")],
    ),
    (
        "oob",
        CAPS_OOB + b'{"exec-oob": "ping", "id": 1}{"exec-oob": "echo", "id": 2}',
        [
            {"return": {}},
            {"return": {"ran": "ping", "args": {}, "oob": True}, "id": 1},
            err("The command echo does not support OOB", id=2),
        ],
    ),
    (
        "split-objects",
        CAPS + b'{"execute": "ping"}' * 3,
        [{"return": {}}] + [{"return": {"ran": "ping", "args": {}, "oob": False}}] * 3,
    ),
]


@pytest.mark.parametrize(("name", "script", "expected"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_scripts(schema: Schema, name: str, script: bytes, expected: list[Any]) -> None:
    assert run(make(schema), [script]) == expected


@given(st.sampled_from(SCRIPTS), st.lists(st.integers(0, 300), max_size=10))
def test_scripts_in_random_splits(
    schema: Schema, case: tuple[str, bytes, list[Any]], cuts: list[int]
) -> None:
    _, script, expected = case
    assert run(make(schema), split(script, cuts)) == expected


def test_capability_not_offered(schema: Schema) -> None:
    conn = make(schema, capabilities=())
    assert b'"capabilities": []' in conn.greeting()
    out = run(conn, [CAPS_OOB])
    assert out == [err("Capability oob not available")]
    assert not conn.negotiated
    assert run(conn, [CAPS]) == [{"return": {}}]
    assert conn.negotiated and conn.enabled_capabilities == frozenset()


def test_enabled_capabilities(schema: Schema) -> None:
    conn = make(schema)
    run(conn, [CAPS_OOB])
    assert conn.enabled_capabilities == frozenset({"oob"})


def test_events_dropped_while_negotiating(schema: Schema) -> None:
    conn = make(schema)
    event = make_event("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}, now=1.5)
    assert conn.event(event) is None
    run(conn, [CAPS])
    assert conn.event(event) == (
        b'{"timestamp": {"seconds": 1, "microseconds": 500000}, "event": "JOB_STATUS_CHANGE", '
        b'"data": {"status": "created", "id": "j"}}\r\n'
    )


def test_request_and_replies(schema: Schema) -> None:
    conn = make(schema)
    run(conn, [CAPS])
    conn.receive_data(
        b'{"execute": "echo", "arguments": {"text": "\\u00e9"}, "id": {"b": 1, "a": 2}}'
    )
    request = conn.next_event()
    assert request == Request("echo", {"text": "\u00e9"}, {"a": 2, "b": 1})
    assert isinstance(request, Request)
    assert list(request.id) == qdict_order(["b", "a"])  # echoed in QEMU's member order
    assert conn.next_event() is NEED_DATA
    assert conn.reply(request, "\u00e9") == b'{"return": "\\u00E9", "id": {"a": 2, "b": 1}}\r\n'
    assert conn.error(request, DeviceNotActive("Block job 'x' not found")) == (
        b'{"id": {"a": 2, "b": 1}, "error": {"class": "DeviceNotActive", '
        b'"desc": "Block job \'x\' not found"}}\r\n'
    )
    conn.receive_data(b'{"execute": "ping"}')
    request = conn.next_event()
    assert isinstance(request, Request) and request.id is NO_ID
    assert conn.reply(request, {}) == b'{"return": {}}\r\n'
    assert conn.error(request, RequestError("x")) == (
        b'{"error": {"class": "GenericError", "desc": "x"}}\r\n'
    )


def test_pretty(schema: Schema) -> None:
    conn = make(schema, pretty=True)
    assert conn.greeting().startswith(b'{\r\n    "QMP": {\r\n')
    conn.receive_data(CAPS)
    out = conn.next_event()
    assert isinstance(out, Output) and out.data == b'{\r\n    "return": {\r\n    }\r\n}\r\n'


def test_qdict_order_known_values() -> None:
    # orders observed on QEMU 10 (see test_qemu_differential)
    assert qdict_order(["foo", "bar"]) == ["bar", "foo"]
    assert qdict_order(["b", "a", "zz"]) == ["a", "zz", "b"]
    assert qdict_order(["execute", "exec-oob"]) == qdict_order(["exec-oob", "execute"])


def test_back_to_back_with_a_client_parser(schema: Schema) -> None:
    """A client using the same framing reads what the server core writes."""
    server = make(schema)
    client = JSONStream()
    client.feed(server.greeting())
    greeting = client.next()
    assert isinstance(greeting, Message)
    assert greeting.value["QMP"]["version"] == version_info()
    requests = [{"execute": "qmp_capabilities", "id": 0}] + [
        {"execute": "echo", "arguments": {"text": f"t{i}\u20ac\U0001f600"}, "id": i}
        for i in range(1, 50)
    ]
    wire = b"".join(encode(r) for r in requests)
    for chunk in split(wire, list(range(7, len(wire), 13))):
        server.receive_data(chunk)
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, Request):
                client.feed(server.reply(event, event.arguments["text"]))
            else:
                assert isinstance(event, Output)
                client.feed(event.data)
    replies = []
    while (item := client.next()) is not None:
        assert isinstance(item, Message)
        replies.append(item.value)
    assert replies[0] == {"return": {}, "id": 0}
    assert replies[1:] == [{"return": f"t{i}\u20ac\U0001f600", "id": i} for i in range(1, 50)]


def test_glib_leftover_order_known_values() -> None:
    from blockd.qdict import first_leftover

    # observed on QEMU 10: qmp_capabilities with these (all unknown) arguments
    assert first_leftover(["job-id", "node-name", "base", "zz-bogus"], []) == "base"
    assert first_leftover(["a"], ["a"]) is None
    assert first_leftover(["device", "x"], ["device"]) == "x"
    # many keys: the table grows (and shrinks as visited keys are removed)
    keys = [f"k{i}" for i in range(40)]
    left = first_leftover(keys, keys[:-1])
    assert left == "k39"


def test_nesting_at_the_parser_limit_is_safe(schema: Schema) -> None:
    """Values nested up to QEMU's limit (1024) go through every layer without recursion
    errors: the parser, the id echo and the encoder are iterative."""
    conn = make(schema)
    depth = 1023  # plus the request object: 1024
    conn.receive_data(b'{"execute": "x", "id": ' + b"[" * depth + b"]" * depth + b"}")
    out = conn.next_event()
    assert isinstance(out, Output)
    assert out.data.startswith(b'{"id": ' + b"[" * depth + b"]" * depth + b", ")
    pretty = encode({"a": [[[{"b": [[[]]]}]]] * 2}, pretty=True)
    assert pretty.count(b"\r\n") == 28
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    assert encode(deep) == b"[" * 5001 + b"]" * 5001 + b"\r\n"


def test_arguments_too_deep_for_the_validator() -> None:
    from blockd.qmp.schema import TOO_DEEP

    files = {
        "commands": {
            "nest": {"type": "object", "properties": {"n": {"$ref": "../types/N.json"}},
                     "additionalProperties": False}
        },
        "types": {
            "N": {"type": "object", "properties": {"n": {"$ref": "N.json"}},
                  "additionalProperties": False}
        },
    }  # fmt: skip
    schema = Schema(files)
    value: dict[str, Any] = {}
    for _ in range(20):
        value = {"n": value}
    schema.validate_arguments("nest", value)
    for _ in range(1000):
        value = {"n": value}
    with pytest.raises(RequestError, match=TOO_DEEP):
        schema.validate_arguments("nest", value)
