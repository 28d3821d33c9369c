"""QEMU keyval and JSON option strings (blockd.options), from tables."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest

from blockd.options import (
    OptionError,
    coerce_scalars,
    parse_bool,
    parse_json_or_keyval,
    parse_keyval,
)

KEYVAL_CASES: list[tuple[str, str | None, dict[str, Any]]] = [
    ("", None, {}),
    ("a=1", None, {"a": "1"}),
    ("a=1,", None, {"a": "1"}),
    ("a=1,b=x", None, {"a": "1", "b": "x"}),
    ("a=", None, {"a": ""}),
    ("a=1,a=2", None, {"a": "2"}),  # the last value wins
    ("a=x,,y", None, {"a": "x,y"}),  # ",," is one comma
    ("a=x,,,b=y", None, {"a": "x,", "b": "y"}),
    ("a=b=c", None, {"a": "b=c"}),
    ("a.b=1,a.c=2", None, {"a": {"b": "1", "c": "2"}}),
    ("a.b.c=1", None, {"a": {"b": {"c": "1"}}}),
    ("a.1=y,a.0=x", None, {"a": ["x", "y"]}),
    ("a.0.b=1,a.1.b=2", None, {"a": [{"b": "1"}, {"b": "2"}]}),
    ("qcow2", "driver", {"driver": "qcow2"}),
    ("qcow2,node-name=n", "driver", {"driver": "qcow2", "node-name": "n"}),
    ("driver=raw", "driver", {"driver": "raw"}),
    ("x,,y,a=1", "driver", {"driver": "x,y", "a": "1"}),
    (
        "qcow2,node-name=top,file.driver=file,file.filename=/t/a,,b.qcow2",
        "driver",
        {
            "driver": "qcow2",
            "node-name": "top",
            "file": {"driver": "file", "filename": "/t/a,b.qcow2"},
        },
    ),
]


@pytest.mark.parametrize(("text", "implied", "expected"), KEYVAL_CASES)
def test_parse_keyval(text: str, implied: str | None, expected: dict[str, Any]) -> None:
    assert parse_keyval(text, implied) == expected


KEYVAL_ERRORS: list[tuple[str, str | None, str]] = [
    ("a", None, "Expected '=' after parameter 'a'"),
    ("a=1,b", None, "Expected '=' after parameter 'b'"),
    ("a=1,qcow2", "driver", "Expected '=' after parameter 'qcow2'"),
    ("=1", None, "Invalid parameter ''"),
    ("1a=1", None, "Invalid parameter '1a'"),
    ("a..b=1", None, "Invalid parameter 'a..b'"),
    ("a.b=1,a=2", None, "Parameters 'a.*' used inconsistently"),
    ("a=2,a.b=1", None, "Parameters 'a.*' used inconsistently"),
    ("a.0=1,a.b=2", None, "Parameters 'a.*' used inconsistently"),
    ("a.1=x", None, "Parameter 'a.0' missing"),
    ("a.0=x,a.2=z", None, "Parameter 'a.1' missing"),
    ("x" * 128 + "=1", None, "Parameter '" + "x" * 128 + "' is too long"),
]


@pytest.mark.parametrize(("text", "implied", "message"), KEYVAL_ERRORS)
def test_parse_keyval_errors(text: str, implied: str | None, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_keyval(text, implied)
    assert str(info.value) == message


def test_json_options_keep_their_types() -> None:
    text = '{"driver": "qcow2", "node-name": "q", "read-only": true, "cache": {"direct": false}}'
    assert parse_json_or_keyval(text, "driver") == {
        "driver": "qcow2",
        "node-name": "q",
        "read-only": True,
        "cache": {"direct": False},
    }
    assert parse_json_or_keyval("raw,node-name=r", "driver") == {"driver": "raw", "node-name": "r"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "JSON parse error: Expecting property name enclosed in double quotes"),
        ('{"a": 1} x', "JSON parse error: Extra data"),
    ],
)
def test_json_option_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_json_or_keyval(text)


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("on", True),
        ("yes", True),
        ("true", True),
        ("ON", True),
        ("off", False),
        ("no", False),
        ("false", False),
    ],
)
def test_parse_bool(word: str, value: bool) -> None:
    assert parse_bool("x", word) is value


def test_parse_bool_rejects_other_words() -> None:
    with pytest.raises(OptionError, match="Parameter 'pretty' expects 'on' or 'off'"):
        parse_bool("pretty", "maybe")


def _typed_validator(types: Mapping[str, type]) -> Any:
    """A validator with QEMU's type-error text for a flat path -> type table."""
    names = {int: "integer", bool: "boolean", float: "number", str: "string"}

    def first_error(tree: Mapping[str, Any]) -> str | None:
        for path, want in types.items():
            node: Any = tree
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None and type(node) is not want:
                return f"Invalid parameter type for '{path}', expected: {names[want]}"
        return None

    return first_error


def test_coerce_scalars_follows_the_validator() -> None:
    tree = parse_keyval("driver=qcow2,cache-size=0x10000,file.read-only=on,discard=unmap,x.n=1.5")
    check = _typed_validator(
        {"cache-size": int, "file.read-only": bool, "discard": str, "x.n": float}
    )
    assert coerce_scalars(tree, check) == {
        "driver": "qcow2",
        "cache-size": 65536,
        "file": {"read-only": True},
        "discard": "unmap",
        "x": {"n": 1.5},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("size=big", "Parameter 'size' expects integer"),
        ("size=64k", "Parameter 'size' expects integer"),  # QEMU: suffixes for size only
        ("size=9223372036854775808", "Parameter 'size' expects integer"),
        ("ro=maybe", "Parameter 'ro' expects 'on' or 'off'"),
    ],
)
def test_coerce_scalars_errors(text: str, message: str) -> None:
    check = _typed_validator({"size": int, "ro": bool})
    with pytest.raises(OptionError, match=message):
        coerce_scalars(parse_keyval(text), check)


def test_coerce_scalars_integers() -> None:
    check = _typed_validator({"n": int})
    for text, value in [("0", 0), ("-3", -3), ("0x10", 16), ("010", 8), (" +5", 5)]:
        assert coerce_scalars({"n": text}, check) == {"n": value}


def test_option_parsing_is_pure() -> None:
    """blockd.options and the CLI parser import no trio (they run before any event loop)."""
    code = "import sys, blockd.options, blockd.cli; sys.exit('trio' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
