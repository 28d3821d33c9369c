"""The job state machine as data: statuses, verbs, and which moves each allows.

Pure: no trio, no I/O. Mirrors QEMU's ``JobSTT`` and ``JobVerbTable`` (``job.c``;
docs/qemu-behaviour/jobs.md §2, §3). :func:`check_transition` and :func:`check_verb` are the only
places a move or a verb is judged; ``Job`` calls them and nothing else decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from blockd.errors import RequestError


class JobStatus(StrEnum):
    """QAPI ``JobStatus`` (docs/qemu-behaviour/jobs.md §1); values in QAPI order."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    """QAPI ``JobVerb`` (docs/qemu-behaviour/jobs.md §1); values in QAPI order."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"


S = JobStatus

#: Legal moves (docs/qemu-behaviour/jobs.md §2). A move to the same status is legal only where
#: listed (aborting); it changes nothing and emits no event.
TRANSITIONS: Final[Mapping[JobStatus, frozenset[JobStatus]]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_ACTIVE: Final = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

#: The statuses in which each verb is accepted (docs/qemu-behaviour/jobs.md §3).
VERBS: Final[Mapping[JobVerb, frozenset[JobStatus]]] = {
    JobVerb.CANCEL: _ACTIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.CHANGE: _ACTIVE,
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
}

#: Statuses in which the job's work is over (QEMU ``job_is_completed``).
COMPLETED: Final = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})


class JobStateError(RuntimeError):
    """An illegal status move was attempted: a bug in blockd, never a client's fault."""


def check_transition(old: JobStatus, new: JobStatus) -> None:
    """Accept a move from ``old`` to ``new`` or raise.

    Raises:
        JobStateError: the move is not in :data:`TRANSITIONS`.
    """
    if new not in TRANSITIONS[old]:
        raise JobStateError(f"illegal job status change {old} -> {new}")


def check_verb(job_id: str, status: JobStatus, verb: JobVerb) -> None:
    """Accept ``verb`` on a job in ``status`` or raise QEMU's error
    (docs/qemu-behaviour/jobs.md §3).

    Raises:
        RequestError: ``Job '<id>' in state '<status>' cannot accept command verb '<verb>'``.
    """
    if status not in VERBS[verb]:
        raise RequestError(
            f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'"
        )


def id_wellformed(job_id: str) -> bool:
    """QEMU's ``id_wellformed``: an ASCII letter, then letters, digits, ``-``, ``.``, ``_``."""
    if not job_id or not _is_alpha(job_id[0]):
        return False
    return all(_is_alpha(c) or (c.isascii() and c.isdigit()) or c in "-._" for c in job_id[1:])


def _is_alpha(c: str) -> bool:
    return c.isascii() and c.isalpha()
