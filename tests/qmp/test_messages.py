"""Output encoding (docs/qemu-behaviour/qmp-protocol.md §1): ASCII only, uppercase \\uXXXX, CRLF,
compact and pretty forms."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd import QEMU_VERSION, __version__
from blockd.qmp.messages import (
    NO_ID,
    encode,
    error_response,
    greeting,
    success_response,
    version_info,
)

COMPACT: list[tuple[Any, bytes]] = [
    ({"return": {}}, b'{"return": {}}\r\n'),
    ({"return": []}, b'{"return": []}\r\n'),
    ({"a": 1, "b": [1, 2], "c": None}, b'{"a": 1, "b": [1, 2], "c": null}\r\n'),
    ({"t": True, "f": False}, b'{"t": true, "f": false}\r\n'),
    ({"n": -5, "big": 2**64 - 1}, b'{"n": -5, "big": 18446744073709551615}\r\n'),
    ({"x": 0.1}, b'{"x": 0.10000000000000001}\r\n'),
    ({"x": 1.0}, b'{"x": 1}\r\n'),
    ({"x": 1e20}, b'{"x": 1e+20}\r\n'),
    ({"s": "a/b"}, b'{"s": "a/b"}\r\n'),
    ({"s": '"\\\b\f\n\r\t'}, b'{"s": "\\"\\\\\\b\\f\\n\\r\\t"}\r\n'),
    ({"s": "\x00\x01\x1f"}, b'{"s": "\\u0000\\u0001\\u001F"}\r\n'),
    ({"s": "\x7f\x80\u00e9\u20ac\uffff"}, b'{"s": "\\u007F\\u0080\\u00E9\\u20AC\\uFFFF"}\r\n'),
    ({"s": "\U0001f600"}, b'{"s": "\\uD83D\\uDE00"}\r\n'),
    ({"s": "\U0010ffff"}, b'{"s": "\\uDBFF\\uDFFF"}\r\n'),
    ({"s": "bad\udcff"}, b'{"s": "bad\\uFFFD"}\r\n'),
    ({"\u00e9": "k"}, b'{"\\u00E9": "k"}\r\n'),
    ("top", b'"top"\r\n'),
]


@pytest.mark.parametrize(("value", "expected"), COMPACT)
def test_compact(value: Any, expected: bytes) -> None:
    assert encode(value) == expected


PRETTY: list[tuple[Any, str]] = [
    ({"return": {}}, '{\n    "return": {\n    }\n}\n'),
    ({"return": [], "id": 1}, '{\n    "return": [\n    ],\n    "id": 1\n}\n'),
    (
        {"a": [1, {"b": None}]},
        '{\n    "a": [\n        1,\n        {\n            "b": null\n        }\n    ]\n}\n',
    ),
]


@pytest.mark.parametrize(("value", "expected"), PRETTY)
def test_pretty(value: Any, expected: str) -> None:
    assert encode(value, pretty=True) == expected.replace("\n", "\r\n").encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, st.booleans())
def test_output_is_ascii_one_line_and_round_trips(value: Any, pretty: bool) -> None:
    data = encode(value, pretty=pretty)
    assert data.isascii()
    assert data.endswith(b"\r\n")
    text = data.decode()
    if not pretty:
        assert "\n" not in text[:-2] and "\r" not in text[:-2]
    assert "\n" not in text.replace("\r\n", "")
    expected = json.loads(
        json.dumps(value).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    )
    assert json.loads(text) == expected


@pytest.mark.parametrize("pretty", [False, True])
def test_unencodable_value_is_a_type_error(pretty: bool) -> None:
    for value in ({"x": object()}, {1: 2}, [{"a": {None: 1}}]):
        with pytest.raises(TypeError):
            encode(value, pretty=pretty)


def test_greeting_shape_and_order() -> None:
    info = version_info()
    major, minor, micro = QEMU_VERSION
    assert encode(greeting(info, ["oob"])) == (
        b'{"QMP": {"version": {"qemu": {"micro": %d, "minor": %d, "major": %d}, '
        b'"package": "blockd %s"}, "capabilities": ["oob"]}}\r\n'
        % (micro, minor, major, __version__.encode())
    )
    assert greeting(info, [])["QMP"]["capabilities"] == []


def test_responses_member_order_and_id() -> None:
    assert encode(success_response({}, 1)) == b'{"return": {}, "id": 1}\r\n'
    assert encode(success_response([], NO_ID)) == b'{"return": []}\r\n'
    assert encode(success_response(1, None)) == b'{"return": 1, "id": null}\r\n'
    assert encode(error_response("GenericError", "x", {"a": [1]})) == (
        b'{"id": {"a": [1]}, "error": {"class": "GenericError", "desc": "x"}}\r\n'
    )
    assert encode(error_response("CommandNotFound", "y")) == (
        b'{"error": {"class": "CommandNotFound", "desc": "y"}}\r\n'
    )
