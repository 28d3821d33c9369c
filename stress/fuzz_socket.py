"""Fuzz a blockd daemon's QMP socket: ``python -m stress.fuzz_socket --count 100000``.

Sends seeded inputs (random bytes, mutated and truncated valid commands, deep nesting,
invalid UTF-8, unknown commands, huge and odd numbers in ids and integer arguments,
deeply nested arguments, wrong argument types for every command) on one
connection; checks each gets exactly its replies (see :mod:`stress.fuzzkit`), that a
second client connected alongside is served every ``--probe-every`` inputs, that the
daemon stays alive, and that its VmRSS grows by less than ``--rss-slack-mib`` after the
warm-up. Prints inputs/s, RSS figures and failures; exits 0 when all held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from blockd.client.lab import running_daemon
from stress.fuzzkit import (
    FuzzClient,
    check_answer,
    generate,
    number_requests,
    valid_corpus,
    vmrss_kib,
    wrong_type_requests,
)


def _answer(fuzz: FuzzClient, path: Path, payload: bytes) -> tuple[FuzzClient, str | None]:
    """Send ``payload``; the client to go on with and what was wrong with the answer. A
    lost connection or a line that is not strict JSON is a problem; a new client follows."""
    try:
        return fuzz, check_answer(payload, fuzz.send(payload))
    except (EOFError, OSError, ValueError) as exc:
        return FuzzClient(path), f"no proper answer to {payload[:200]!r}: {exc}"


def run(count: int, seed: int, probe_every: int, rss_slack_mib: int, program: str | None) -> int:
    rnd = random.Random(seed)
    corpus = valid_corpus()
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="blockd-fuzz-") as tmp,
        running_daemon(Path(tmp), program) as daemon,
    ):
        pid = daemon.process.pid
        fuzz, probe = FuzzClient(daemon.socket), FuzzClient(daemon.socket)
        wrong = 0
        for request, must_fail in wrong_type_requests():
            payload = json.dumps(request).encode()
            replies = fuzz.send(payload)
            problem = check_answer(payload, replies)
            if problem is None and must_fail and "error" not in replies[0]:
                problem = f"wrong type accepted: {request} -> {replies[0]}"
            if problem:
                failures.append(problem)
            wrong += 1
        numbers = 0
        for payload in number_requests():
            fuzz, problem = _answer(fuzz, daemon.socket, payload)
            if problem:
                failures.append(problem)
            numbers += 1
        warm = min(1000, count // 10)
        rss_start = 0
        start = time.monotonic()
        for i in range(count):
            if i == warm:
                rss_start = vmrss_kib(pid)
            payload = generate(rnd, corpus)
            fuzz, problem = _answer(fuzz, daemon.socket, payload)
            if problem:
                failures.append(problem)
                if len(failures) > 20:
                    break
            if i % probe_every == 0:
                if daemon.process.poll() is not None:
                    failures.append(f"daemon died (status {daemon.process.returncode})")
                    break
                reply = probe.call("query-version")
                if "return" not in reply:
                    failures.append(f"second client not served: {reply}")
        elapsed = time.monotonic() - start
        rss_end = vmrss_kib(pid)
        alive = daemon.process.poll() is None
        fuzz.close()
        probe.close()
    growth = (rss_end - rss_start) / 1024
    print(f"wrong-type requests: {wrong}; odd-number requests: {numbers}")
    print(f"fuzz inputs: {count} in {elapsed:.1f}s = {count / elapsed:.0f} inputs/s (seed {seed})")
    print(f"daemon VmRSS: {rss_start / 1024:.1f} MiB after warm-up, {rss_end / 1024:.1f} MiB "
          f"at the end (growth {growth:+.1f} MiB, allowed {rss_slack_mib})")  # fmt: skip
    print(f"daemon alive: {alive}; failures: {len(failures)}")
    for failure in failures[:20]:
        print("  FAIL", failure)
    return 0 if alive and not failures and growth < rss_slack_mib else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe-every", type=int, default=500)
    parser.add_argument("--rss-slack-mib", type=int, default=32)
    parser.add_argument("--program", default=None, help="blockd (default) or a QSD binary")
    args = parser.parse_args()
    return run(args.count, args.seed, args.probe_every, args.rss_slack_mib, args.program)


if __name__ == "__main__":
    sys.exit(main())
