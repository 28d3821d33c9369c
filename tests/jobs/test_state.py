"""The job state tables, checked in both directions against the tables of
docs/qemu-behaviour/jobs.md §2, §3."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from blockd.errors import RequestError
from blockd.jobs.state import (
    TRANSITIONS,
    VERBS,
    JobStateError,
    JobStatus,
    JobVerb,
    check_transition,
    check_verb,
    id_wellformed,
)

# Written out again from docs/qemu-behaviour/jobs.md §2 / §3, independently of the module.
SPEC_TRANSITIONS = {
    "undefined": {"created"},
    "created": {"running", "aborting", "null"},
    "running": {"paused", "ready", "waiting", "aborting"},
    "paused": {"running"},
    "ready": {"standby", "waiting", "aborting"},
    "standby": {"ready"},
    "waiting": {"pending", "aborting"},
    "pending": {"aborting", "concluded"},
    "aborting": {"aborting", "concluded"},
    "concluded": {"null"},
    "null": set(),
}
ACTIVE = {"created", "running", "paused", "ready", "standby"}
SPEC_VERBS = {
    "cancel": ACTIVE | {"waiting", "pending"},
    "pause": ACTIVE,
    "resume": ACTIVE,
    "set-speed": ACTIVE,
    "change": ACTIVE,
    "complete": {"ready", "standby"},
    "finalize": {"pending"},
    "dismiss": {"concluded"},
}


def test_enums_are_qapi_order() -> None:
    assert [s.value for s in JobStatus] == list(SPEC_TRANSITIONS)
    assert [v.value for v in JobVerb] == [
        "cancel", "pause", "resume", "set-speed", "complete", "dismiss", "finalize", "change",
    ]  # fmt: skip


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobStatus, JobStatus)))
def test_transition_table_both_directions(old: JobStatus, new: JobStatus) -> None:
    allowed = new.value in SPEC_TRANSITIONS[old.value]
    assert (new in TRANSITIONS[old]) == allowed
    if allowed:
        check_transition(old, new)
    else:
        with pytest.raises(JobStateError):
            check_transition(old, new)


@pytest.mark.parametrize(("verb", "status"), list(itertools.product(JobVerb, JobStatus)))
def test_verb_table_both_directions(verb: JobVerb, status: JobStatus) -> None:
    allowed = status.value in SPEC_VERBS[verb.value]
    assert (status in VERBS[verb]) == allowed
    if allowed:
        check_verb("job0", status, verb)
    else:
        with pytest.raises(RequestError) as info:
            check_verb("job0", status, verb)
        assert info.value.desc == (
            f"Job 'job0' in state '{status.value}' cannot accept command verb '{verb.value}'"
        )
        assert info.value.error_class == "GenericError"


def test_verb_error_example_from_spec() -> None:
    with pytest.raises(RequestError) as info:
        check_verb("job0", JobStatus.RUNNING, JobVerb.COMPLETE)
    assert info.value.desc == "Job 'job0' in state 'running' cannot accept command verb 'complete'"


@pytest.mark.parametrize(
    ("job_id", "ok"),
    [
        ("job0", True),
        ("a", True),
        ("A-b.c_d9", True),
        ("stream-node4", True),
        ("x" * 500, True),  # no length limit
        ("", False),
        ("0job", False),
        ("-job", False),
        ("_job", False),
        ("job 0", False),
        ("job/0", False),
        ("jöb", False),  # QEMU's ctype checks are ASCII
        ("éjob", False),
        ("job#1", False),
    ],
)
def test_id_wellformed(job_id: str, ok: bool) -> None:
    assert id_wellformed(job_id) is ok


def test_pure_modules_do_not_import_trio() -> None:
    code = (
        "import sys; import blockd.jobs.state, blockd.jobs.ratelimit, blockd.jobs.policy; "
        "assert 'trio' not in sys.modules, 'trio imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
