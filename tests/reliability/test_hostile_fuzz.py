"""Huge and odd numbers and deep nesting on the QMP socket: every reply is strict JSON
(no ``inf``, ``NaN`` or ``Infinity``), every complete message is answered once, the daemon
keeps serving a second client and its memory stays bounded. The long run of the same
checks is ``python -m stress.fuzz_socket`` (its generator mixes these inputs in).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from blockd.client.lab import DaemonProcess
from blockd.qmp.connection import UNECHOABLE_ID
from stress.fuzzkit import (
    ODD_NUMBERS,
    FuzzClient,
    check_answer,
    deep_arguments,
    number_requests,
    odd_number,
    strict_json,
    vmrss_kib,
)

Connect = Callable[[Path | str], FuzzClient]


def test_every_odd_number_in_every_place(daemon: DaemonProcess, connect: Connect) -> None:
    client, probe = connect(daemon.socket), connect(daemon.socket)
    sent = 0
    for payload in number_requests():
        assert check_answer(payload, client.send(payload)) is None
        sent += 1
    assert sent == 9 * len(ODD_NUMBERS)
    assert "return" in probe.call("query-version")
    # An id is echoed as QEMU parses it, or refused when QEMU would write inf.
    for number in ODD_NUMBERS:
        payload = b'{"execute": "query-version", "id": %s}' % number
        replies = client.send(payload)  # the reply, then the resync byte's parse error
        assert check_answer(payload, replies) is None
        reply = replies[0]
        if math.isinf(float(number)):
            assert reply == {"error": {"class": "GenericError", "desc": UNECHOABLE_ID}}
        else:
            value = strict_json(number)  # as QEMU's QNum: int64, uint64, else a double
            if isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
                value = float(number)
            assert "return" in reply and reply["id"] == value, number


def test_random_odd_numbers_and_deep_arguments(daemon: DaemonProcess, connect: Connect) -> None:
    rnd = random.Random(5)
    client, probe = connect(daemon.socket), connect(daemon.socket)
    for _ in range(50):  # warm-up
        client.send(odd_number(rnd))
    before = vmrss_kib(daemon.process.pid)
    start = time.monotonic()
    problems = []
    for i in range(600):
        payload = deep_arguments(rnd) if i % 3 == 0 else odd_number(rnd)
        problem = check_answer(payload, client.send(payload))
        if problem:
            problems.append(problem)
        if i % 100 == 0:
            assert "return" in probe.call("query-version")
    elapsed = time.monotonic() - start
    print(f"600 inputs in {elapsed:.1f}s")  # the figures, with pytest -s
    assert problems == []
    assert vmrss_kib(daemon.process.pid) - before < 16 * 1024
    assert "return" in probe.call("query-version")
    assert daemon.process.poll() is None
