"""Power loss during a stream: the file layer's writes and flushes are recorded, then
crash states are rebuilt (every flush boundary, in-order prefixes and random subsets of
the writes between two flushes, as a disk may reorder them) and each is judged with
``qemu-img check`` and ``compare`` against the pre-stream copy. Long run:
``python -m stress.powerloss --replays 2000``."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from stress.powerloss import crash_image, crash_states, epochs, judge, record_stream, run


def test_every_crash_state_is_consistent_and_unchanged() -> None:
    ops, count, problems = run(replays=80, seed=1)
    assert problems == []
    assert ops > 50 and count == 80


def test_the_judge_catches_a_broken_order(tmp_path: Path) -> None:
    """Control: metadata persisted without the data it points to is caught."""
    top, initial, log = record_stream(tmp_path)
    groups = epochs(log)
    assert sum(1 for g in groups if g) > 5  # several flush epochs: the order is tested
    replay = tmp_path / "replay" / top.name
    replay.parent.mkdir()
    for name in ("mid.qcow2", "base.qcow2"):
        shutil.copy(tmp_path / name, replay.parent / name)
    # everything except the first epoch's writes (the first copied data clusters)
    broken = crash_image(initial, [[], *groups[1:]], len(groups), [])
    assert judge(broken, replay, tmp_path / "before.qcow2") != []
    states = list(crash_states(initial, log, random.Random(0), 1))
    assert len(states) > len(groups)
