"""Power loss during a stream, a non-active and an active commit: the file layer's
writes and flushes are recorded, then crash states are rebuilt (the state after each
flush, every in-order prefix of the writes, random subsets of the writes a flush did not
cover yet, as a disk may reorder them) and each is judged with ``qemu-img check`` and
``compare`` of the top's guest view against the pre-job copy (:mod:`stress.powerloss`).
Long run: ``python -m stress.powerloss --kind commit --replays 2000``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stress.killkit import Kind
from stress.powerloss import Replay, crash_states, epochs, record_job, run


@pytest.mark.parametrize(
    ("kind", "replays"), [(Kind.STREAM, 80), (Kind.COMMIT, 200), (Kind.ACTIVE, 200)]
)
def test_every_crash_state_is_consistent_and_unchanged(kind: Kind, replays: int) -> None:
    """Up to ``replays`` distinct states (a commit's logs are shorter: about all of them)."""
    ops, count, problems = run(replays=replays, seed=1, kind=kind)
    assert problems == []
    assert ops > 30 and count > 25, (ops, count)


@pytest.mark.parametrize("kind", list(Kind))
def test_the_judge_catches_a_broken_order(tmp_path: Path, kind: Kind) -> None:
    """Control: data a header or a table points to, lost, is caught. A stream's and an
    active commit's first copied clusters missing under everything written later (the
    active commit judged as finished: its base alone must hold the view); a commit's
    top header naming the base while none of the base's writes persisted."""
    rec = record_job(tmp_path, kind)
    groups = epochs(rec.log)
    assert sum(1 for g in groups if g) > 5  # several flush epochs: the order is tested
    writes = [i for i, op in enumerate(rec.log) if op.data is not None]
    if kind is Kind.COMMIT:
        broken = [i for i in writes if rec.log[i].path == str(rec.chain.path("top"))]
        assert broken  # the header rewrite
    else:
        broken = [i for i in writes if i not in groups[0]]
    assert Replay(rec).judge(broken, finished=kind is Kind.ACTIVE) != []
    states = list(crash_states(rec.log, random.Random(0), 1))
    assert len(states) > len(groups)
