"""kill -9 at random moments during block jobs (:mod:`stress.killkit`): streams (one
chain, and two at once) and commits (non-active and active, ten at once): every image
passes ``qemu-img check`` without corruption, the guest view of each chain as it is on
disk (the top through whatever its header names) equals the pre-job copy, and a second
run completes every job. More rounds: ``python -m stress.kill``."""

from __future__ import annotations

import random
import struct
from collections import Counter
from pathlib import Path

import pytest
from kit.qemu import KIB, qemu_img, write

from stress.killkit import Kind, Point, Templates, judge, kill_round

#: kill points the commit test collects, at most in how many rounds
COMMIT_POINTS, COMMIT_ROUNDS = 50, 12
#: an L1 or L2 entry's flag: the cluster is used once (docs/interop/qcow2.txt)
COPIED = 1 << 63


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    """Small chains (4 MiB; 4 KiB clusters in the base, many tables to write): a commit
    round runs ten jobs."""
    return Templates(tmp_path_factory.mktemp("templates"), 4 << 20, cluster=4096)


@pytest.mark.parametrize("chains", [1, 2])
def test_kill_during_stream(tmp_path: Path, chains: int) -> None:
    rnd = random.Random(chains)
    templates = Templates(tmp_path / "templates", 16 << 20)
    interrupted = 0
    for round_ in range(3):
        result = kill_round(tmp_path / f"r{round_}", rnd, [Kind.STREAM] * chains, templates)
        assert result.problems == [], result.problems
        interrupted += result.interrupted
    assert interrupted > 0  # at least one kill hit a running stream


def test_kill_during_commits(tmp_path: Path, templates: Templates) -> None:
    """Rounds of five non-active and five active commits in one daemon, killed three
    times each, until the kills interrupted :data:`COMMIT_POINTS` jobs, half of each."""
    rnd = random.Random(3)
    points: list[Point] = []
    for round_ in range(COMMIT_ROUNDS):
        kinds = [Kind.COMMIT, Kind.ACTIVE] * 5
        rnd.shuffle(kinds)
        result = kill_round(tmp_path / f"r{round_}", rnd, kinds, templates, kills=3)
        assert result.problems == [], result.problems
        points += result.points
        kinds_hit = Counter(p.kind for p in points)
        if min(kinds_hit[Kind.COMMIT], kinds_hit[Kind.ACTIVE]) >= COMMIT_POINTS // 2:
            break
    else:
        raise AssertionError(f"{COMMIT_ROUNDS} rounds interrupted too few jobs: {kinds_hit}")


def test_the_judge_catches_a_corrupt_image_and_a_changed_view(
    tmp_path: Path, templates: Templates
) -> None:
    """Control: what the kill tests accept is not everything. A base whose L1 table
    points an L2 table into its refcount table, a base write that no layer above hides,
    a top header that names the base before the base holds the mid's data."""
    corrupt = templates.chain(Kind.COMMIT, tmp_path / "corrupt", "c")
    data = bytearray(corrupt.path("base").read_bytes())
    (l1,) = struct.unpack_from(">Q", data, 40)
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    struct.pack_into(">Q", data, l1, COPIED | 1 << cluster_bits)
    corrupt.path("base").write_bytes(bytes(data))
    assert any("corruptions" in p for p in judge(corrupt, finished=False))

    shown = templates.chain(Kind.ACTIVE, tmp_path / "shown", "s")
    write(shown.path("base"), 5 * templates.size // 8, 64 * KIB, 0x99)
    assert any("Content mismatch" in p for p in judge(shown, finished=False))

    early = templates.chain(Kind.COMMIT, tmp_path / "early", "e", backing_file="base.qcow2")
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", early.path("top"))
    assert [p for p in judge(early, finished=False) if "Content mismatch" in p]
