"""The JSON stream: QEMU's framing, lexical, syntax and limit behaviour
(docs/qemu-behaviour/qmp-protocol.md §7).

Every case is also fed split at random byte offsets (and byte by byte): the items must
not depend on how the input was cut.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.qmp import feed, split

from blockd.qmp import framing
from blockd.qmp.framing import JSONStream, Message, ParseError


def feed_slow(chunks: list[bytes]) -> list[Message | ParseError]:
    """Like :func:`feed` with the fast path disabled: the lexer path only."""
    stream = JSONStream()
    stream._try_fast = lambda: None  # type: ignore[method-assign]
    return feed(chunks, stream)


def M(value: Any) -> Message:
    return Message(value)


def E(detail: str) -> ParseError:
    return ParseError(f"JSON parse error, {detail}")


CASES: list[tuple[bytes, list[Message | ParseError]]] = [
    # framing: several values per chunk, no terminator, whitespace ignored
    (b'{"execute": "quit"}', [M({"execute": "quit"})]),
    (b'{"a": 1}{"b": 2}\r\n\n  {"c": 3}', [M({"a": 1}), M({"b": 2}), M({"c": 3})]),
    (b"  \r\n\t ", []),
    (
        b'{"a": [1, 2.5, -0, 1e400, true, false, null, {}], "b": {"c": []}}',
        [M({"a": [1, 2.5, 0, float("inf"), True, False, None, {}], "b": {"c": []}})],
    ),
    # scalars at top level; a number needs the next character
    (b"42", []),
    (b"42 ", [M(42)]),
    (b"42{}", [M(42), M({})]),
    (b'"x"', [M("x")]),
    (b"null ", [M(None)]),
    (b"[1, 2]", [M([1, 2])]),
    # extensions: single quotes, \' escapes
    (b"{'execute': 'a\"b'}", [M({"execute": 'a"b'})]),
    (b"{\"a\": \"it\\'s\", 'b': 'it\\'s'}", [M({"a": "it's", "b": "it's"})]),
    # numbers: int64, uint64, else double
    (
        b'{"a": 9223372036854775807, "b": -9223372036854775808}',
        [M({"a": 2**63 - 1, "b": -(2**63)})],
    ),
    (b'{"a": 18446744073709551615}', [M({"a": 2**64 - 1})]),
    (b'{"a": 18446744073709551616}', [M({"a": 1.8446744073709552e19})]),
    (b'{"a": -9223372036854775809}', [M({"a": -9.223372036854775809e18})]),
    (b'{"a": 1E2, "b": 1.5e-1, "c": -2.0}', [M({"a": 100.0, "b": 0.15, "c": -2.0})]),
    # strings: escapes, modified UTF-8
    (
        b'{"a": "\\u00e9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t\\u0000"}',
        [M({"a": "\u00e9\U0001f600/\b\f\n\r\t\0"})],
    ),
    (b'{"a": "\xc3\xa9\xf0\x9f\x98\x80"}', [M({"a": "\u00e9\U0001f600"})]),
    (b'{"a": "\xc0\x80"}', [M({"a": "\0"})]),
    (b'{"a": "\x7f"}', [M({"a": "\x7f"})]),
    # lexical errors and the resync rule
    (b"@", [E("stray '@'")]),
    (b'{"execute": @}', [E("stray '@'"), E("expecting value")]),
    (b"01 ", [E("stray '01'")]),
    (b"-a", [E("stray '-a'")]),
    (b"1.x", [E("stray '1.x'")]),
    (b"1e+x", [E("stray '1e+x'")]),
    (b"True ", [E("stray 'T'")]),
    # recovery stops at the ':' (a lone ':' is a message of its own), then '2', then '}'
    (
        b'{"a": 1 @ junk "x": 2} {"b": 1}',
        [E("stray '@'"), E("expecting value"), M(2), E("expecting value"), M({"b": 1})],
    ),
    # a control character ends recovery and is itself a stray byte at the start
    (b'{"a": @ skipped\x1b{"b": 1}', [E("stray '@'"), E("stray '\x1b'"), M({"b": 1})]),
    (b'{"a": @ skipped\t{"b": 1}', [E("stray '@'"), M({"b": 1})]),
    (b'{"a": @ x\xff{"b": 1}', [E("stray '@'"), E("stray '\ufffd'"), M({"b": 1})]),
    (b'{"a": @ x\n{"b": 1}', [E("stray '@'"), M({"b": 1})]),
    (b'\x1b{"b": 1}', [E("stray '\x1b'"), M({"b": 1})]),
    (b'\xff{"b": 1}', [E("stray '\ufffd'"), M({"b": 1})]),
    (b'{"a": "x\x01y"} {"b": 1}', [E("stray '\"x\x01'"), E("expecting value"), M({"b": 1})]),
    (b'\x00{"b": 1}', [E("stray ''"), M({"b": 1})]),
    (b'{"a": \xc3\xa9}', [E("stray '\ufffd'"), E("expecting value")]),
    # syntax errors (the first one wins)
    (b'{ "execute": }', [E("expecting value")]),
    (b"tru ", [E("invalid keyword 'tru'")]),
    (b'{"a": nul}', [E("invalid keyword 'nul'")]),
    (b"}", [E("expecting value")]),
    (b"]", [E("expecting value")]),
    (b'{"a": 1}}', [M({"a": 1}), E("expecting value")]),
    (b"[1, ]", [E("expecting value")]),
    (b"[, 1]", [E("expecting value")]),
    (b"[1 2]", [E("expected separator in list")]),
    (b'{"a": 1 "b": 2}', [E("expected separator in dict")]),
    (b'{"a" 1}', [E("missing : in object pair")]),
    (b"{1: 2}", [E("key is not a string in object")]),
    (b'{[1]: 2, "x": tru}', [E("key is not a string in object")]),
    (b'{"a": 1, }', [E("expecting value")]),
    (b'{"a": 1, "a": 2}', [E("duplicate key")]),
    (b'{"a": {"b": 1, "b": 2}}', [E("duplicate key")]),
    (b'{"a": [1}]', [E("expected separator in list")]),
    (b'{"a": "\\x"}', [E("invalid escape sequence in string")]),
    (b'{"a": "\\ud800"}', [E("\\ud800 is not a valid Unicode character")]),
    (b'{"a": "\\ud800\\u0041"}', [E("\\ud800 is not a valid Unicode character")]),
    (b'{"a": "\\udc00"}', [E("\\udc00 is not a valid Unicode character")]),
    (b'{"a": "\\uFFFE"}', [E("\\uFFFE is not a valid Unicode character")]),
    (b'{"a": "\\uzzzz"}', [E("\\uzzzz is not a valid Unicode character")]),
    (b'{"a": "\\u12"}', [E('\\u12" is not a valid Unicode character')]),
    (b'{"a": "\xef\xbf\xbe"}', [E("invalid UTF-8 sequence in string")]),
    (b'{"a": "\xed\xa0\x80"}', [E("invalid UTF-8 sequence in string")]),
    (b'{"a": "\xc0\xaf"}', [E("invalid UTF-8 sequence in string")]),
    (b'{"a": "\x80"}', [E("invalid UTF-8 sequence in string")]),
    (b'{"a": "\\x", "b": "\xff"}', [E("stray '\"\ufffd'"), E("expecting value")]),
    (b'{"a": "\\x", "b": tru}', [E("invalid escape sequence in string")]),
    (b'{"a": NaN}', [E("stray 'N'"), E("expecting value")]),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_cases_whole(data: bytes, expected: list[Message | ParseError]) -> None:
    assert feed([data]) == expected


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_cases_byte_by_byte(data: bytes, expected: list[Message | ParseError]) -> None:
    assert feed([data[i : i + 1] for i in range(len(data))]) == expected


@given(st.sampled_from(CASES), st.lists(st.integers(0, 200), max_size=8))
def test_cases_random_splits(case: tuple[bytes, list[Any]], cuts: list[int]) -> None:
    data, expected = case
    assert feed(split(data, cuts)) == expected


@given(st.lists(st.sampled_from(CASES), min_size=1, max_size=6), st.lists(st.integers(0, 600)))
def test_concatenated_cases(cases: list[tuple[bytes, list[Any]]], cuts: list[int]) -> None:
    # a case may leave the lexer mid-token or recovering; a control char resyncs it
    data = b"\x1b".join(data for data, _ in cases)
    assert feed(split(data, cuts)) == feed([data[i : i + 1] for i in range(len(data))])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60)
@given(
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.booleans(),
    st.lists(st.integers(0, 400)),
)
def test_any_json_object_round_trips(value: dict[str, Any], ascii_: bool, cuts: list[int]) -> None:
    data = json.dumps(value, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
    whole = feed([data])
    assert whole == feed(split(data, cuts))
    if len(whole) == 1 and isinstance(whole[0], Message):
        # the only differences allowed: QEMU's number model
        assert json.dumps(whole[0].value, sort_keys=True) == json.dumps(
            _qemu_numbers(value), sort_keys=True
        )
    else:  # lone surrogates and non-characters are refused, as QEMU does
        assert any(not _valid(s) for s in _strings(value))


def _qemu_numbers(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else float(value)
    if isinstance(value, list):
        return [_qemu_numbers(v) for v in value]
    return {k: _qemu_numbers(v) for k, v in value.items()}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    return []


def _valid(text: str) -> bool:
    return all(framing._valid_codepoint(ord(c)) for c in text)


@given(st.binary(max_size=60), st.lists(st.integers(0, 60)))
def test_arbitrary_bytes_do_not_depend_on_splits(data: bytes, cuts: list[int]) -> None:
    items = feed(split(data, cuts))
    assert items == feed([data[i : i + 1] for i in range(len(data))])
    assert items == feed_slow([data])


@given(
    st.lists(
        st.sampled_from(
            [
                b"{",
                b"}",
                b"[",
                b"]",
                b'"a"',
                b":",
                b",",
                b"1",
                b" ",
                b"'",
                b"\\",
                b"x",
                b"tr",
                b"\x1b",
                b"\xc3",
                b"\xa9",
            ]
        ),
        max_size=30,
    ),
    st.lists(st.integers(0, 100)),
)
def test_token_soup_does_not_depend_on_splits(parts: list[bytes], cuts: list[int]) -> None:
    data = b"{" + b"".join(parts)
    items = feed(split(data, cuts))
    assert items == feed([data[i : i + 1] for i in range(len(data))])
    assert items == feed_slow([data])


# --- limits ------------------------------------------------------------------------------
def test_nesting_limit() -> None:
    ok = b"[" * 1024 + b"]" * 1024
    items = feed([ok])
    assert len(items) == 1 and isinstance(items[0], Message)
    deep = b"[" * 1025 + b"]" * 1025
    items = feed([deep])
    assert items[0] == ParseError("JSON nesting depth limit exceeded")
    # the message is dropped; each closer that follows is a message of its own
    assert items[1:] == [E("expecting value")] * 1025
    mixed = b'{"a": ' * 600 + b"[" * 425
    assert feed([mixed])[0] == ParseError("JSON nesting depth limit exceeded")


def test_token_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, "MAX_TOKEN_COUNT", 100)
    items = feed([b"[" + b"1," * 60 + b"1]"])
    assert items[0] == ParseError("JSON token count limit exceeded")
    items = feed([b"[" + b"1," * 48 + b"1]"])  # 99 tokens
    assert items == [Message([1] * 49)]


def test_token_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, "MAX_TOKEN_SIZE", 100)
    # total size of a message's tokens
    items = feed([b'["' + b"x" * 40 + b'", "' + b"y" * 60 + b'"] {"ok": 1}'])
    assert items[0] == ParseError("JSON token size limit exceeded")
    assert items[-1] == Message({"ok": 1})
    # one long unterminated token is cut at the limit, whatever the split
    data = b'"' + b"z" * 150
    for chunks in ([data], [data[i : i + 7] for i in range(0, len(data), 7)]):
        assert feed(chunks)[0] == ParseError("JSON token size limit exceeded")


def test_real_limits_values() -> None:
    assert framing.MAX_TOKEN_SIZE == 64 * 1024 * 1024
    assert framing.MAX_TOKEN_COUNT == 2 * 1024 * 1024
    assert framing.MAX_NESTING == 1024


def test_huge_string_is_bounded_and_fast() -> None:
    stream = JSONStream()
    stream.feed(b'{"a": "')
    chunk = b"x" * (1 << 20)
    for _ in range(65):
        stream.feed(chunk)
        item = stream.next()
        if item is not None:
            break
    assert item == ParseError("JSON token size limit exceeded")
    assert len(stream._token) <= framing.MAX_TOKEN_SIZE + 1
    assert len(stream._buf) - stream._pos <= len(chunk)


def test_unfinished_value_is_held_then_completed() -> None:
    stream = JSONStream()
    stream.feed(b'{"execute": "qu')
    assert stream.next() is None
    stream.feed(b'it"}{"x"')
    assert stream.next() == Message({"execute": "quit"})
    assert stream.next() is None
    stream.feed(b": 1}")
    assert stream.next() == Message({"x": 1})
    assert stream.next() is None


def test_fast_path_is_fast() -> None:
    command = json.dumps(
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "qcow2",
                "node-name": "n" * 20,
                "file": {"driver": "file", "filename": "/var/lib/images/" + "p" * 800},
            },
            "id": "libvirt-42",
        }
    ).encode()
    assert 900 < len(command) < 1100
    data = command * 2000
    start = time.perf_counter()
    items = feed([data[i : i + 65536] for i in range(0, len(data), 65536)])
    elapsed = time.perf_counter() - start
    assert len(items) == 2000
    assert elapsed < 1.0, f"{elapsed / 2000 * 1e6:.1f} us per 1 KB command"


@given(st.lists(st.sampled_from(CASES), min_size=1, max_size=4))
def test_fast_path_agrees_with_lexer_path(cases: list[tuple[bytes, list[Any]]]) -> None:
    data = b"\x1b".join(data for data, _ in cases)
    assert feed([data]) == feed_slow([data])


@settings(max_examples=60)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.booleans())
def test_fast_path_agrees_on_valid_json(value: dict[str, Any], ascii_: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_).encode("utf-8", "surrogatepass")
    assert feed([data]) == feed_slow([data])


def test_large_object_in_pieces() -> None:
    value = {"execute": "x", "arguments": {f"k{i}": "v" * 100 for i in range(20000)}}
    data = json.dumps(value).encode()
    assert len(data) > 2 * framing.FAST_HOLD_LIMIT
    stream = JSONStream()
    items = []
    for i in range(0, len(data), 65536):
        stream.feed(data[i : i + 65536])
        while (item := stream.next()) is not None:
            items.append(item)
        assert len(stream._buf) - stream._pos <= framing.FAST_HOLD_LIMIT + 65536
    assert items == [Message(value)]
