"""Socket fuzzing for a running daemon: input generators and a checking client.

Each input is sent on one negotiated connection, followed by a ``0xFF`` byte (QMP's
resync: it ends any half-read message) and a sentinel ``query-version`` with a unique
``id``. Everything the daemon writes before the sentinel's reply is the answer to the
input. :func:`expected_replies` counts, with blockd's own streaming parser used as the
oracle of QEMU's framing, how many complete messages (or parse errors) the input holds;
the daemon must answer each with exactly one ``return`` or ``error``, and every line it
writes must be strict JSON (:func:`strict_json`: no ``NaN``, ``Infinity`` or ``inf``).
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from blockd.qmp.framing import JSONStream

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "schema"
RESYNC: Final = b"\xff\n"
#: Commands never sent whole by the fuzzer: they would end the daemon on purpose.
EXCLUDED: Final = frozenset({"quit"})

WRONG_VALUES: Final[list[Any]] = [
    0, -1, 1 << 63, 1 << 64, -(1 << 63) - 1, 1.5, 1e308, "", "x", "\u0000", True, False, None,
    [], [1, "a"], {}, {"a": {"b": []}}, "a" * 5000,
]  # fmt: skip

_JSON_TYPES: Final[dict[str, Callable[[Any], bool]]] = {
    "string": lambda v: isinstance(v, str),
    # QAPI's int: int64 (blockd's schema has no wider integer members)
    "integer": lambda v: type(v) is int and -(1 << 63) <= v < (1 << 63),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _declared_type(prop: dict[str, Any], where: Path) -> str | None:
    """The JSON type of a schema property (following one ``$ref``); None if it is a
    union, an alternate or otherwise not one plain type."""
    if "$ref" in prop:
        target = (where.parent / prop["$ref"]).resolve()
        prop = json.loads(target.read_text())
    kind = prop.get("type")
    return kind if isinstance(kind, str) else None


def commands(schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Every command schema by name (``quit`` excluded)."""
    out = {}
    for path in sorted((schema_dir / "commands").glob("*.json")):
        if path.stem not in EXCLUDED:
            out[path.stem] = {"path": path, **json.loads(path.read_text())}
    return out


def wrong_type_requests(schema_dir: Path = SCHEMA_DIR) -> Iterator[tuple[dict[str, Any], bool]]:
    """``(request, must_fail)`` for every argument of every command given every value of
    :data:`WRONG_VALUES` not of its declared type; ``must_fail`` is True when the declared
    type is known (the value is certainly wrong). Other arguments get plausible values."""
    for name, spec in commands(schema_dir).items():
        props: dict[str, Any] = spec.get("properties", {})
        base = {key: "fuzz0" for key in spec.get("required", [])}
        for key, prop in props.items():
            kind = _declared_type(prop, spec["path"])
            for value in WRONG_VALUES:
                if kind is not None and _JSON_TYPES.get(kind, lambda v: False)(value):
                    continue
                request = {"execute": name, "arguments": {**base, key: value}}
                yield request, kind is not None and kind in _JSON_TYPES


def valid_corpus(schema_dir: Path = SCHEMA_DIR) -> list[bytes]:
    """Well-formed requests to mutate: every command with plausible arguments."""
    out = []
    for name, spec in commands(schema_dir).items():
        args = {key: "fuzz0" for key in spec.get("required", [])}
        out.append(json.dumps({"execute": name, "arguments": args, "id": 7}).encode())
        out.append(json.dumps({"execute": name}).encode())
    out.append(b'{"execute": "block-stream", "arguments": {"device": "x", "speed": 10}}')
    out.append(b'{"exec-oob": "query-version", "id": [1, {"a": null}]}')
    return out


# -- generators -------------------------------------------------------------------------


def random_bytes(rnd: random.Random) -> bytes:
    return rnd.randbytes(rnd.randrange(1, 300))


def mutate(rnd: random.Random, data: bytes) -> bytes:
    """A few byte-level edits: flip, insert, delete, duplicate a slice, truncate."""
    buf = bytearray(data)
    for _ in range(rnd.randrange(1, 5)):
        op = rnd.randrange(6)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes([rnd.choice(b"{}[]:,\"'\\ \x00\x7f\x80\xc0\xff0-e.")])
        elif op == 2 and buf:
            del buf[pos : pos + rnd.randrange(1, 8)]
        elif op == 3:
            end = min(len(buf), pos + rnd.randrange(1, 40))
            buf[pos:pos] = buf[pos:end] * rnd.randrange(1, 4)
        elif op == 4:
            del buf[pos:]
        else:
            buf[pos:pos] = rnd.choice([b"\\u0000", b"\\ud800", b"\xed\xa0\x80", b"\xc0\x80",
                                       b"1e999", b"-0", b"99999999999999999999999"])  # fmt: skip
    return bytes(buf)


def deep(rnd: random.Random) -> bytes:
    depth = rnd.choice([10, 500, 1023, 1024, 1025, 5000])
    opener = rnd.choice([b"[", b'{"a":'])
    closer = b"]" if opener == b"[" else b"}"
    inner = b"[" * depth + b"]" * depth
    body = {"[": inner, "{": opener * depth + b"1" + closer * depth}[chr(opener[0])]
    if rnd.random() < 0.5:
        return b'{"execute": "query-version", "id": ' + body + b"}"
    return body


#: Number tokens at and past every edge QEMU's parser and visitor have: int64, uint64,
#: the range of a double (where QEMU's value becomes inf, which it echoes as "inf"),
#: underflow, negative zero, exponents, and integers of 400 and 10,000 digits.
ODD_NUMBERS: Final = [
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808",
    b"-9223372036854775809", b"18446744073709551615", b"18446744073709551616",
    b"2147483647", b"2147483648", b"-2147483649", b"4294967296", b"-0", b"-0.0", b"0.0",
    b"1.0", b"1e2", b"1E+2", b"0.1e1", b"1e308", b"1.7976931348623157e308",
    b"1.7976931348623159e308", b"1e309", b"1e999", b"-1e999", b"1e-400", b"-1e-400",
    b"4.9e-324", b"1.5e300", b"1" + b"0" * 400, b"-" + b"9" * 400, b"1" * 10_000,
]  # fmt: skip
#: Integer arguments of the commands blockd has, and blkdebug's int32 options.
NUMBER_SLOTS: Final = [
    b'{"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": %s}}',
    b'{"execute": "block-stream", "arguments": {"device": "x", "speed": %s}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "n", '
    b'"image": "x", "max-transfer": %s}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "blkdebug", "node-name": "n", '
    b'"image": "x", "inject-error": [{"event": "read_aio", "errno": %s}]}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "n", '
    b'"file": "x", "offset": %s}}',
    b'{"execute": "query-version", "id": %s}',
    b'{"execute": "nope", "id": [%s, {"a": %s}]}',
    b'{"id": %s}',
    b'{"execute": "query-jobs", "arguments": {"x": %s}, "id": %s}',
]  # fmt: skip


def number_requests() -> Iterator[bytes]:
    """Every odd number of :data:`ODD_NUMBERS` in every place of :data:`NUMBER_SLOTS`."""
    for slot in NUMBER_SLOTS:
        for number in ODD_NUMBERS:
            yield slot % ((number,) * slot.count(b"%s"))


def odd_number(rnd: random.Random) -> bytes:
    """A request with huge or odd numbers in its id or its integer arguments."""
    slot = rnd.choice(NUMBER_SLOTS)
    return slot % tuple(rnd.choice(ODD_NUMBERS) for _ in range(slot.count(b"%s")))


def deep_arguments(rnd: random.Random) -> bytes:
    """Arguments nested 10 to 1,100 levels deep, with an odd number at the bottom."""
    depth = rnd.choice([10, 63, 64, 65, 300, 1022, 1023, 1100])
    number = rnd.choice(ODD_NUMBERS[:-1])  # 10,000 digits at every level is slow to send
    if rnd.random() < 0.5:  # blockdev-add's file chain: objects all the way down
        body = b'{"driver": "raw", "file": ' * depth + number + b"}" * depth
        return b'{"execute": "blockdev-add", "arguments": ' + body + b"}"
    body = b"[" * depth + number + b"]" * depth
    return b'{"execute": "query-version", "arguments": {"a": ' + body + b'}, "id": ' + body + b"}"


def invalid_utf8(rnd: random.Random) -> bytes:
    bad = rnd.choice([b"\x80", b"\xc3", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xfe", b"\xc0\xaf"])
    return b'{"execute": "query-version", "id": "a' + bad + b'b"}'


def unknown_command(rnd: random.Random) -> bytes:
    name = "".join(rnd.choice("abcdefgh-_x") for _ in range(rnd.randrange(1, 20)))
    return json.dumps({"execute": name, "arguments": {"a": 1}}).encode()


def truncated(rnd: random.Random, corpus: list[bytes]) -> bytes:
    data = rnd.choice(corpus)
    return data[: rnd.randrange(len(data))]


def generate(rnd: random.Random, corpus: list[bytes]) -> bytes:
    """One input of a random kind."""
    kind = rnd.randrange(12)
    if kind == 10:
        return odd_number(rnd)
    if kind == 11:
        return deep_arguments(rnd)
    if kind == 0:
        return random_bytes(rnd)
    if kind == 1:
        return truncated(rnd, corpus)
    if kind == 2:
        return deep(rnd)
    if kind == 3:
        return invalid_utf8(rnd)
    if kind == 4:
        return unknown_command(rnd)
    if kind == 5:
        return b"".join(rnd.choice(corpus) for _ in range(rnd.randrange(2, 6)))
    return mutate(rnd, rnd.choice(corpus))


# -- the oracle and the client ----------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: bytes) -> Any:
    """``raw`` parsed as strict JSON (RFC 8259): ``NaN``, ``Infinity`` and QEMU's ``inf``
    are refused, and so is anything but one JSON text.

    Raises:
        ValueError: ``raw`` is not one strict JSON text.
    """
    # json.loads refuses "inf" already; parse_constant makes NaN/Infinity fail too
    return json.loads(raw, parse_constant=_no_constant)


def expected_replies(payload: bytes) -> int:
    """How many complete messages and parse errors ``payload`` + resync holds."""
    stream = JSONStream()
    stream.feed(payload + RESYNC)
    count = 0
    while stream.next() is not None:
        count += 1
    return count


class FuzzClient:
    """A blocking QMP client that sends raw inputs and collects their answers."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        # ids nested to QEMU's limit (1024) come back echoed: json.loads recurses per level
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.tag = 0
        greeting = self.line()
        assert "QMP" in greeting, greeting
        self.sock.sendall(b'{"execute": "qmp_capabilities"}')
        assert self.line() == {"return": {}}

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(f"daemon closed the connection; pending {self.buf[:200]!r}")
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\n")
        try:
            value: dict[str, Any] = strict_json(raw)
        except ValueError as exc:
            raise ValueError(f"the daemon wrote invalid JSON {raw[:300]!r}: {exc}") from exc
        return value

    def send(self, payload: bytes) -> list[dict[str, Any]]:
        """Send ``payload``; return every reply (events left out) written before the
        sentinel's answer."""
        self.tag += 1
        sentinel = f"sentinel-{self.tag}"
        self.sock.sendall(
            payload + RESYNC + json.dumps({"execute": "query-version", "id": sentinel}).encode()
        )
        replies: list[dict[str, Any]] = []
        while True:
            msg = self.line()
            if msg.get("id") == sentinel:
                assert "return" in msg, msg
                return replies
            if "event" not in msg:
                replies.append(msg)

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self.line()
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.sock.close()


def check_answer(payload: bytes, replies: list[dict[str, Any]]) -> str | None:
    """None when ``replies`` are a proper answer to ``payload``, else what is wrong."""
    want = expected_replies(payload)
    if len(replies) != want:
        return f"{len(replies)} replies, expected {want}: {payload[:200]!r} -> {replies[:3]}"
    for reply in replies:
        if ("return" in reply) == ("error" in reply):
            return f"not a reply: {reply}"
        if "error" in reply:
            err = reply["error"]
            if not isinstance(err.get("class"), str) or not isinstance(err.get("desc"), str):
                return f"malformed error: {reply}"
            if "Internal error" in err["desc"]:
                return f"internal error for {payload[:200]!r}: {reply}"
    return None


def vmrss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
