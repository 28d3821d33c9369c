"""kill -9 during block jobs, many rounds: ``python -m stress.kill --rounds 50``.

Each round (see :mod:`stress.killkit`) gives ``--chains`` chains a job each, the kinds
taken in turn from ``--kinds`` (``stream``, ``commit``: non-active, ``active``: active
commit), SIGKILLs blockd at ``--kills`` random moments (the jobs not done start again
after each), checks every image with ``qemu-img check``/``compare`` after each kill, and
runs the jobs to completion. Prints rounds, kills, the kill points per kind and where in
their jobs they fell, and the problems; exits 0 when there were none, 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from stress.killkit import Kind, Point, Templates, kill_round


def summary(points: list[Point]) -> list[str]:
    """One line per kind: the points, by status and by quarter of the job done."""
    lines = []
    for kind in Kind:
        mine = [p for p in points if p.kind is kind]
        if not mine:
            continue
        statuses = Counter(p.status for p in mine)
        quarters = Counter(min(3, int(p.fraction * 4)) for p in mine)
        lines.append(
            f"  {kind}: {len(mine)} points; "
            + ", ".join(f"{s} {n}" for s, n in sorted(statuses.items()))
            + "; done <25% {} <50% {} <75% {} >=75% {}".format(*(quarters[q] for q in range(4)))
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default="stream,commit,active",
                        type=lambda s: [Kind(k) for k in s.split(",")])  # fmt: skip
    parser.add_argument("--chains", type=int, default=6, help="chains (jobs) per round")
    parser.add_argument("--kills", type=int, default=2, help="kills per round")
    parser.add_argument("--mib", type=int, default=16, help="virtual size of each chain")
    parser.add_argument("--cluster", type=int, default=65536,
                        help="cluster size of the image the jobs write")  # fmt: skip
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    problems: list[str] = []
    points: list[Point] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blockd-kill-") as tmp:
        templates = Templates(Path(tmp, "templates"), args.mib << 20, args.cluster)
        for i in range(args.rounds):
            kinds = [args.kinds[(i + j) % len(args.kinds)] for j in range(args.chains)]
            result = kill_round(Path(tmp, f"r{i}"), rnd, kinds, templates, args.kills)
            problems += result.problems
            points += result.points
    elapsed = time.monotonic() - start
    print(f"kill -9: {args.rounds} rounds of {args.chains} jobs, {args.rounds * args.kills} "
          f"kills, {len(points)} kill points (jobs interrupted) in {elapsed:.0f}s; seed "
          f"{args.seed}, chains of {args.mib} MiB, written clusters of {args.cluster}")  # fmt: skip
    print("\n".join(summary(points)))
    print(f"problems: {len(problems)}")
    for problem in problems[:20]:
        print("  FAIL", problem)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
