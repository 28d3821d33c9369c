"""Huge and odd numbers: ids that cannot be echoed, integers out of their QAPI range,
output that must stay strict JSON (docs/qemu-behaviour/qmp-protocol.md §1, §5, §6).

What qemu-storage-daemon 10.0 does, observed side by side (the differential tests below
keep checking it when its binaries are installed):

* A number beyond the range of a double (``1e999``, ``1.7976931348623159e308``, an
  integer of 400 or 10,000 digits) is parsed as inf, and an ``id`` holding one is echoed
  as ``inf``, which no JSON parser accepts. blockd refuses such a request before any
  other check, without ``id`` and without running it (:data:`UNECHOABLE_ID`). Every other
  number is echoed as QEMU echoes it (``-0.0`` as ``-0``, ``1e-400`` as ``0``, ``2^64`` as
  ``1.8446744073709552e+19``).
* ``int`` members (int64) refuse ``2^63``, ``2^64 - 1`` and ``-2^63 - 1`` with
  ``Invalid parameter type for 'speed', expected: integer`` (not "expects int64"), and so
  any float, ``1.0``, ``1e2`` and ``-0.0`` included; ``-0`` is the integer 0. ``int32``
  members check int64 first, then ``Parameter 'max-transfer' expects int32_t``. Unsigned
  members say ``Parameter 'x' expects uint64`` for a float or a value outside uint64 and
  take negative int64 values (they wrap), then ``expects uint32_t`` past a narrower range.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit.qemu import QSD10
from kit.repo import load_package
from kit.wire import NEGOTIATE, blockd_replies, qemu_replies

from blockd.qmp.connection import NEED_DATA, UNECHOABLE_ID, Connection, Output, Request
from blockd.qmp.messages import encode, version_info
from blockd.qmp.schema import Schema

load_package("stress")
from stress.fuzzkit import ODD_NUMBERS, strict_json  # noqa: E402

HUGE = [b"1e999", b"-1e999", b"1.7976931348623159e308", b"9" * 400, b"1" * 10_000]
# Numbers QEMU parses to a finite value, which blockd must echo exactly as QEMU does.
FINITE = [n for n in ODD_NUMBERS if not math.isinf(float(n))]


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


def events(conn: Connection, data: bytes) -> list[Output | Request]:
    conn.receive_data(data)
    found: list[Output | Request] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Output | Request)
        found.append(event)
    return found


def negotiated(schema: Schema) -> Connection:
    conn = Connection(schema, version=version_info())
    assert len(events(conn, NEGOTIATE)) == 1
    return conn


# --- output is strict JSON ---------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("pretty", [False, True])
def test_encode_refuses_non_finite_numbers(bad: float, pretty: bool) -> None:
    deep: Any = bad
    for _ in range(2000):  # the encoder is iterative: found at any depth
        deep = [deep]
    for value in ({"id": bad}, {"return": {"a": [1, bad]}}, deep):
        with pytest.raises(ValueError, match="not a finite number"):
            encode(value, pretty=pretty)


@pytest.mark.parametrize("number", HUGE, ids=lambda n: n[:24].decode())
@pytest.mark.parametrize("negotiate", [False, True])
def test_an_id_that_cannot_be_echoed_is_refused(
    schema: Schema, number: bytes, negotiate: bool
) -> None:
    conn = negotiated(schema) if negotiate else Connection(schema, version=version_info())
    for request in (
        b'{"execute": "query-version", "id": %s}' % number,
        b'{"execute": "nope", "id": [1, {"a": %s}], "arguments": {"x": 1}}' % number,
        b'{"id": %s}' % number,
    ):
        (out,) = events(conn, request)  # one reply, and nothing was run
        assert isinstance(out, Output)
        assert strict_json(out.data) == {"error": {"class": "GenericError", "desc": UNECHOABLE_ID}}
    # the session goes on
    (after,) = events(conn, b'{"execute": "qmp_capabilities", "id": 1e308}')
    if negotiate:
        assert strict_json(after.data)["error"]["class"] == "CommandNotFound"
    else:
        assert strict_json(after.data) == {"return": {}, "id": 1e308}


def test_arguments_may_hold_huge_numbers_where_they_are_refused(schema: Schema) -> None:
    conn = negotiated(schema)
    for number in HUGE:
        (out,) = events(conn, b'{"execute": "query-jobs", "arguments": {"x": %s}}' % number)
        assert isinstance(out, Output)
        assert strict_json(out.data)["error"]["desc"] == "Parameter 'x' is unexpected"


json_scalars = st.sampled_from([*ODD_NUMBERS, b"null", b'"s"', b"true"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request with odd numbers in its id and its arguments, nested a little."""
    value = draw(json_scalars)
    for _ in range(draw(st.integers(0, 3))):
        value = draw(st.sampled_from([b"[%s]", b'{"a": %s}', b"[1, %s, {}]"])) % value
    command = draw(st.sampled_from([b"query-version", b"block-job-set-speed", b"nope"]))
    args = draw(st.sampled_from([b'{"device": "j", "speed": %s}', b'{"x": %s}', b"{}"]))
    if b"%s" in args:
        args %= draw(json_scalars)
    return b'{"execute": "%s", "arguments": %s, "id": %s}' % (command, args, value)


@given(st.lists(requests(), min_size=1, max_size=4))
def test_every_message_is_strict_json(schema: Schema, batch: list[bytes]) -> None:
    conn = negotiated(schema)
    out = events(conn, b"".join(batch))
    assert len(out) == len(batch)
    for event in out:
        data = conn.reply(event, {"n": 1}) if isinstance(event, Request) else event.data
        strict_json(data)


# --- integer arguments against their QAPI type ---------------------------------------
SPEED = b'{"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": %s}}'
BLKDEBUG = (
    b'{"execute": "blockdev-add", "arguments": '
    b'{"driver": "blkdebug", "node-name": "d", "image": "x", %s}}'
)
NOT_INT = "Invalid parameter type for '{}', expected: integer"
# (request, desc of QEMU 10.0's reply, observed; None: validation passes)
INTEGER_CASES: list[tuple[bytes, str | None]] = [
    (SPEED % b"9223372036854775807", None),
    (SPEED % b"-9223372036854775808", None),
    (SPEED % b"-0", None),
    (SPEED % b"-1", None),  # the handler refuses it (not the QAPI type)
    *[
        (SPEED % n, NOT_INT.format("speed"))
        for n in [
            b"9223372036854775808",
            b"18446744073709551615",
            b"18446744073709551616",
            b"-9223372036854775809",
            b"1.0",
            b"1e2",
            b"-0.0",
            b"1e999",
            b"1" * 10_000,
        ]
    ],
    (
        b'{"execute": "block-stream", "arguments": {"device": "j", "speed": 9223372036854775808}}',
        NOT_INT.format("speed"),
    ),
    (BLKDEBUG % b'"max-transfer": 2147483647', None),
    (BLKDEBUG % b'"max-transfer": -2147483648', None),
    (BLKDEBUG % b'"max-transfer": 2147483648', "Parameter 'max-transfer' expects int32_t"),
    (BLKDEBUG % b'"opt-discard": -2147483649', "Parameter 'opt-discard' expects int32_t"),
    (BLKDEBUG % b'"max-write-zero": 9223372036854775808', NOT_INT.format("max-write-zero")),
    (BLKDEBUG % b'"max-discard": 1.0', NOT_INT.format("max-discard")),
    (
        BLKDEBUG % b'"inject-error": [{"event": "read_aio", "errno": 9223372036854775808}]',
        NOT_INT.format("inject-error[0].errno"),
    ),
    (
        b'{"execute": "blockdev-add", "arguments": '
        b'{"driver": "raw", "node-name": "d", "file": "x", "size": -1e999}}',
        NOT_INT.format("size"),
    ),
    (
        b'{"execute": "blockdev-add", "arguments": '
        b'{"driver": "qcow2", "node-name": "d", "file": "x", "cache-size": 18446744073709551615}}',
        NOT_INT.format("cache-size"),
    ),
    (
        b'{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "d", '
        b'"filename": "f", "aio-max-batch": 9223372036854775808}}',
        NOT_INT.format("aio-max-batch"),
    ),
]


@pytest.mark.parametrize(("request_", "desc"), INTEGER_CASES, ids=lambda v: str(v)[:60])
def test_integer_arguments_are_checked_against_their_type(
    schema: Schema, request_: bytes, desc: str | None
) -> None:
    (out,) = events(negotiated(schema), request_)
    if desc is None:
        assert isinstance(out, Request)
    else:
        assert isinstance(out, Output)
        assert strict_json(out.data) == {"error": {"class": "GenericError", "desc": desc}}


# --- side by side with QEMU 10.0 ---------------------------------------------------------
needs_qsd = pytest.mark.skipif(not QSD10.exists(), reason="QEMU 10 qemu-storage-daemon missing")

# Commands QEMU has with unsigned members, declared as QEMU declares them, to compare the
# texts of the unsigned checks (blockd's own schema has no unsigned member).
UNSIGNED_FILES: dict[str, dict[str, Any]] = {
    "commands": {
        "qmp_capabilities": {
            "type": "object",
            "properties": {"enable": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False,
        },
        "query-version": {"type": "object", "properties": {}, "additionalProperties": False},
        "block-dirty-bitmap-add": {
            "type": "object",
            "properties": {
                "node": {"type": "string"},
                "name": {"type": "string"},
                "granularity": {"type": "integer", "x-qmp-int": "uint32"},
            },
            "required": ["node", "name"],
            "additionalProperties": False,
        },
        "block-set-write-threshold": {
            "type": "object",
            "properties": {
                "node-name": {"type": "string"},
                "write-threshold": {"type": "integer", "x-qmp-int": "uint64"},
            },
            "required": ["node-name", "write-threshold"],
            "additionalProperties": False,
        },
    }
}
BITMAP = b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n", "name": "b", %s}}'
THRESHOLD = b'{"execute": "block-set-write-threshold", "arguments": {"node-name": "n", %s}}'
UNSIGNED_CASES = [
    *[BITMAP % b'"granularity": ' + n for n in [b"4294967296", b"-1", b"18446744073709551615",
                                                  b"18446744073709551616", b"1.0", b'"x"']],
    *[THRESHOLD % b'"write-threshold": ' + n for n in [b"18446744073709551616",
                                                         b"-9223372036854775809", b"1.0"]],
]  # fmt: skip


@needs_qsd
@pytest.mark.parametrize(
    "data",
    [b'{"execute": "x", "id": %s}' % n for n in FINITE]
    + [b'{"execute": "query-version", "id": [%s, {"a": %s}], "arguments": {"x": 1}}' % (n, n)
       for n in FINITE]
    + [request_ for request_, desc in INTEGER_CASES if desc is not None],
    ids=lambda v: v[:70].decode(),
)  # fmt: skip
def test_same_replies_as_qemu(qsd: str, schema: Schema, data: bytes) -> None:
    expected = qemu_replies(qsd, NEGOTIATE, data)
    assert expected
    assert blockd_replies(schema, NEGOTIATE, data) == expected
    for line in expected:
        strict_json(line)  # where QEMU writes JSON, blockd writes the same bytes


@needs_qsd
@pytest.mark.parametrize("data", UNSIGNED_CASES, ids=lambda v: v[40:110].decode())
def test_unsigned_checks_as_qemu(qsd: str, data: bytes) -> None:
    expected = qemu_replies(qsd, NEGOTIATE, data)
    assert expected
    assert blockd_replies(Schema(UNSIGNED_FILES), NEGOTIATE, data) == expected


@needs_qsd
@pytest.mark.parametrize("number", HUGE, ids=lambda n: n[:24].decode())
def test_where_qemu_writes_inf_blockd_refuses_the_id(
    qsd: str, schema: Schema, number: bytes
) -> None:
    data = b'{"execute": "x", "id": %s}' % number
    (qemu,) = qemu_replies(qsd, NEGOTIATE, data)
    assert qemu.startswith((b'{"id": inf, ', b'{"id": -inf, '))  # QEMU's output, not JSON
    with pytest.raises(ValueError):
        strict_json(qemu)
    (ours,) = blockd_replies(schema, NEGOTIATE, data)
    assert strict_json(ours) == {"error": {"class": "GenericError", "desc": UNECHOABLE_ID}}
