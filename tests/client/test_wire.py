"""The client's framing and message classes (pure, no trio)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from blockd.client.wire import (
    Decoder,
    Event,
    Greeting,
    ProtocolError,
    Reply,
    classify,
    encode_command,
)

GREETING: dict[str, Any] = {"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
                                "package": "blockd 0.1"}, "capabilities": ["oob"]}}  # fmt: skip
EVENT = {"timestamp": {"seconds": 100, "microseconds": 500000}, "event": "JOB_STATUS_CHANGE",
         "data": {"status": "created", "id": "j0"}}  # fmt: skip
MESSAGES = [GREETING, {"return": {}, "id": "c-1"}, EVENT,
            {"error": {"class": "GenericError", "desc": "Job not found"}, "id": 7},
            {"return": [{"name": "é-unicode ✓"}]}]  # fmt: skip

# (decoded wire message, what classify() gives).
CASES = [
    (GREETING, Greeting(GREETING["QMP"]["version"], ("oob",))),
    ({"return": {}, "id": "c-1"}, Reply("c-1", value={})),
    ({"return": [], "id": {"complex": [1, 2]}}, Reply({"complex": [1, 2]}, value=[])),
    ({"error": {"class": "DeviceNotActive", "desc": "Block job 'x' not found"}},
     Reply(None, error={"class": "DeviceNotActive", "desc": "Block job 'x' not found"})),
    (EVENT, Event("JOB_STATUS_CHANGE", {"status": "created", "id": "j0"}, 100.5)),
    ({"event": "SHUTDOWN", "timestamp": {"seconds": 1, "microseconds": 0}},
     Event("SHUTDOWN", {}, 1.0)),
]  # fmt: skip


@pytest.mark.parametrize(("wire", "message"), CASES)
def test_classify(wire: dict[str, object], message: object) -> None:
    assert classify(wire) == message


@pytest.mark.parametrize(
    "bad",
    [[1, 2], "text", {"QMP": {"capabilities": []}}, {"QMP": {"version": {}}},
     {"error": {"class": "GenericError"}}, {"error": "boom"}, {"unknown": 1}],
)  # fmt: skip
def test_classify_rejects(bad: object) -> None:
    with pytest.raises(ProtocolError):
        classify(bad)


def test_greeting_version_text() -> None:
    greeting = classify(GREETING)
    assert isinstance(greeting, Greeting)
    assert greeting.version_text == "10.0.2"
    assert greeting.package == "blockd 0.1"
    assert Greeting({}, ()).version_text == "?"


@pytest.mark.parametrize("terminator", [b"\r\n", b"\n", b""])
@pytest.mark.parametrize("seed", range(20))
def test_decoder_random_splits(terminator: bytes, seed: int) -> None:
    """Bytes fed in random splits give the same messages, whatever the line ending."""
    wire = b"".join(json.dumps(m, ensure_ascii=False).encode() + terminator for m in MESSAGES)
    rng = random.Random(seed)
    decoder = Decoder()
    got: list[object] = []
    pos = 0
    while pos < len(wire):
        step = rng.randint(1, 7)
        got.extend(decoder.feed(wire[pos : pos + step]))
        pos += step
    assert got == MESSAGES


def test_decoder_pretty_output() -> None:
    """A ``pretty=on`` monitor spreads one object over many lines."""
    wire = b"".join(json.dumps(m, indent=4).replace("\n", "\r\n").encode() + b"\r\n"
                    for m in MESSAGES)  # fmt: skip
    assert list(Decoder().feed(wire)) == MESSAGES


def test_decoder_rejects_garbage_and_oversize() -> None:
    with pytest.raises(ProtocolError, match="invalid JSON"):
        list(Decoder().feed(b'{"return": nope}\r\n'))
    decoder = Decoder(max_message=100)
    with pytest.raises(ProtocolError, match="too large"):
        list(decoder.feed(b'{"return": "' + b"x" * 200))


def test_encode_command() -> None:
    assert encode_command("query-jobs", None) == b'{"execute":"query-jobs"}\r\n'
    assert json.loads(encode_command("job-dismiss", {"id": "j0"}, "c-3")) == {
        "execute": "job-dismiss", "arguments": {"id": "j0"}, "id": "c-3"}  # fmt: skip
