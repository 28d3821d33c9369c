"""kill -9 during block-stream, many rounds: ``python -m stress.kill_stream --rounds 50``.

Each round (see :mod:`stress.killkit`) streams one chain or two chains at once, SIGKILLs
blockd at a random moment, checks every image with ``qemu-img check``/``compare`` and
streams again to completion. Prints rounds, interrupted streams and problems; exits 0
when there were none, 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from stress.killkit import kill_round


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", default="32M")
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    problems: list[str] = []
    streams = interrupted = 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blockd-kill-") as tmp:
        for i in range(args.rounds):
            chains = 1 + i % 2
            result = kill_round(Path(tmp, f"r{i}"), rnd, chains, args.size)
            problems += result.problems
            streams += chains
            interrupted += result.interrupted
    elapsed = time.monotonic() - start
    print(f"kill -9 rounds: {args.rounds} ({streams} streams, {interrupted} interrupted "
          f"mid-stream) in {elapsed:.0f}s; seed {args.seed}, chains of {args.size}")  # fmt: skip
    print(f"problems: {len(problems)}")
    for problem in problems[:20]:
        print("  FAIL", problem)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
