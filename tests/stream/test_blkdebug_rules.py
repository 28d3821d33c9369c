"""blkdebug's rule engine and config parser (pure;
docs/qemu-behaviour/blockdev.md §3)."""

from __future__ import annotations

import errno

import pytest
from kit.chains import BLKDEBUG_030_CONF

from blockd.block.drivers.blkdebug import (
    InjectRule,
    RuleEngine,
    SetStateRule,
    legacy_options,
    parse_config,
    parse_inject,
    parse_set_state,
)
from blockd.errors import RequestError

KIB = 1024


def test_config_of_iotest_030() -> None:
    injects, set_states = parse_config(BLKDEBUG_030_CONF)
    assert len(injects) == 1
    rule = injects[0]
    assert (rule.event, rule.state, rule.errno, rule.offset) == ("read_aio", 1, 5, 512 * KIB)
    assert rule.once and not rule.immediately
    assert set_states == [SetStateRule("read_aio", 2, 1), SetStateRule("read_aio", 1, 2)]


def test_iotest_030_sequence_fails_second_chunk_once() -> None:
    engine = RuleEngine(*parse_config(BLKDEBUG_030_CONF))
    failures = []
    for offset in range(0, 2048 * KIB, 512 * KIB):
        engine.event("read_aio")
        failures.append(engine.check(offset, 512 * KIB, "read"))
    assert [f is not None for f in failures] == [False, True, False, False]
    # A retry of the failed chunk succeeds: the once rule is gone.
    engine.event("read_aio")
    assert engine.check(512 * KIB, 512 * KIB, "read") is None


@pytest.mark.parametrize(
    ("offset", "length", "hit"),
    [(0, 512, False), (512, 512, True), (0, 1024, True), (1024, 512, False), (512, 0, False)],
)
def test_offset_match_needs_a_non_empty_covering_request(
    offset: int, length: int, hit: bool
) -> None:
    engine = RuleEngine([InjectRule("read_aio", offset=512)], [])
    engine.event("read_aio")
    assert (engine.check(offset, length, "read") is not None) is hit


def test_iotype_filters_and_block_status_needs_asking() -> None:
    engine = RuleEngine([parse_inject({"event": "none", "iotype": "write"})], [])
    engine.event("none")
    assert engine.check(0, 512, "read") is None
    assert engine.check(0, 512, "write") is not None
    default = RuleEngine([parse_inject({"event": "none"})], [])
    default.event("none")
    assert default.check(0, 512, "block-status") is None
    assert default.check(0, 512, "flush") is not None


def test_first_matching_inject_rule_replaces_active_set() -> None:
    first = InjectRule("read_aio", errno=errno.EIO)
    second = InjectRule("write_aio", errno=errno.ENOSPC)
    engine = RuleEngine([first, second], [])
    engine.event("read_aio")
    assert engine.active == [first]
    engine.event("write_aio")
    assert engine.active == [second]
    # An event without matching inject rules keeps the active set.
    engine.event("flush_to_disk")
    assert engine.active == [second]


def test_state_rules_apply_after_all_rules_of_the_event() -> None:
    engine = RuleEngine(
        [InjectRule("read_aio", state=2)],
        [SetStateRule("read_aio", 2, state=1), SetStateRule("read_aio", 3, state=2)],
    )
    engine.event("read_aio")  # state 1: inject rule (state 2) not armed yet; 1 -> 2
    assert engine.state == 2 and engine.active == []
    engine.event("read_aio")  # state 2: inject armed; 2 -> 3 (not 2 -> 3 -> ...)
    assert engine.state == 3 and len(engine.active) == 1


def test_bad_rules_are_refused() -> None:
    with pytest.raises(RequestError, match="'event' is missing"):
        parse_inject({})
    with pytest.raises(RequestError, match="new_state"):
        parse_set_state({"event": "read_aio"})
    with pytest.raises(RequestError, match="iotype"):
        parse_inject({"event": "read_aio", "iotype": "bogus"})
    with pytest.raises(RequestError, match="Could not parse blkdebug config file"):
        parse_config("[inject-error]\nevent read_aio\n")
    with pytest.raises(RequestError, match="Could not parse blkdebug config file"):
        parse_config("[unknown]\n")


def test_legacy_filename() -> None:
    assert legacy_options("plain.img") is None
    assert legacy_options("blkdebug::test.img", "/d") == {
        "driver": "blkdebug",
        "image": {"driver": "file", "filename": "/d/test.img"},
    }
    assert legacy_options("blkdebug:/c/rules.conf:/i/b.img", "/d") == {
        "driver": "blkdebug",
        "config": "/c/rules.conf",
        "image": {"driver": "file", "filename": "/i/b.img"},
    }
    with pytest.raises(RequestError, match="requires both config file and image path"):
        legacy_options("blkdebug:only")
