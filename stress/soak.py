"""Soak: rounds of many clients and many streams: ``python -m stress.soak --minutes 5``.

Each round is :func:`stress.loadkit.run_load` (default 50 clients, 16 streams of a 32 MiB
chain). Prints per-round and total figures (commands, commands/s, events per client,
longest time a job went without progress); exits 0 when every check of every round held.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

from stress.loadkit import run_load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--size", default="32M")
    parser.add_argument("--speed", type=int, default=8 << 20)
    parser.add_argument("--pause", type=float, default=0.01)
    args = parser.parse_args()
    end = time.monotonic() + args.minutes * 60
    rounds = commands = 0
    elapsed = worst = 0.0
    failed = False
    while time.monotonic() < end or rounds == 0:
        with tempfile.TemporaryDirectory(prefix="blockd-soak-") as tmp:
            result = trio.run(lambda: run_load(Path(tmp), args.clients, args.streams, args.size,
                                               args.speed, pause=args.pause))  # fmt: skip
        rounds += 1
        commands += result.commands
        elapsed += result.elapsed
        worst = max(worst, result.max_no_progress)
        print(f"round {rounds}: {result.commands} commands in {result.elapsed:.1f}s "
              f"({result.commands / result.elapsed:.0f}/s), {result.events_per_client} events "
              f"per client, longest no-progress {result.max_no_progress:.2f}s, "
              f"problems {len(result.problems)}", flush=True)  # fmt: skip
        for problem in result.problems[:10]:
            print("  FAIL", problem)
        failed |= bool(result.problems)
    verdict = "FAILED" if failed else "all checks held"
    print(f"soak: {rounds} rounds, {args.clients} clients x {args.streams} streams of "
          f"{args.size}; {commands} commands in {elapsed:.0f}s ({commands / elapsed:.0f}/s); "
          f"longest no-progress {worst:.2f}s; {verdict}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
