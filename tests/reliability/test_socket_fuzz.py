"""Bad input on the QMP socket: every complete message is answered, the daemon survives,
a second client keeps being served, memory stays bounded. The long run of the same checks
is ``python -m stress.fuzz_socket --count 100000``."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.client.lab import DaemonProcess
from stress.fuzzkit import (
    FuzzClient,
    check_answer,
    generate,
    valid_corpus,
    vmrss_kib,
    wrong_type_requests,
)

Connect = Callable[[Path | str], FuzzClient]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
COMMANDS = ["block-job-set-speed", "block-stream", "blockdev-add", "blockdev-del",
            "job-cancel", "nope", "query-jobs", "query-version"]  # fmt: skip
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(COMMANDS)},
    optional={"arguments": json_values, "id": json_values, "control": json_values},
)


def assert_served(daemon: DaemonProcess, probe: FuzzClient) -> None:
    assert daemon.process.poll() is None, "daemon died"
    assert "return" in probe.call("query-version")


def test_wrong_type_for_every_argument_of_every_command(
    daemon: DaemonProcess, connect: Connect
) -> None:
    client, probe = connect(daemon.socket), connect(daemon.socket)
    sent = 0
    for request, must_fail in wrong_type_requests():
        payload = json.dumps(request).encode()
        replies = client.send(payload)
        assert check_answer(payload, replies) is None
        if must_fail:
            assert "error" in replies[0], (request, replies)
            assert replies[0]["error"]["class"] == "GenericError"
        sent += 1
    assert sent > 300
    assert_served(daemon, probe)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=400) | requests.map(lambda r: json.dumps(r).encode()))
def test_hypothesis_inputs_are_answered(daemon: DaemonProcess, payload: bytes) -> None:
    client = FuzzClient(daemon.socket)
    try:
        assert check_answer(payload, client.send(payload)) is None
    finally:
        client.close()


def test_mutated_commands_keep_the_daemon_serving(daemon: DaemonProcess, connect: Connect) -> None:
    rnd = random.Random(7)
    corpus = valid_corpus()
    client, probe = connect(daemon.socket), connect(daemon.socket)
    for _ in range(100):  # warm-up: caches, schema, allocator arenas
        client.send(generate(rnd, corpus))
    before = vmrss_kib(daemon.process.pid)
    problems: list[Any] = []
    for i in range(500):
        payload = generate(rnd, corpus)
        problem = check_answer(payload, client.send(payload))
        if problem:
            problems.append(problem)
        if i % 250 == 0:
            assert_served(daemon, probe)
    assert problems == []
    assert vmrss_kib(daemon.process.pid) - before < 16 * 1024
    assert_served(daemon, probe)
